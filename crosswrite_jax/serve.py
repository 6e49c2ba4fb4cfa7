"""`crosswrite serve`: a run's checkpoint behind HTTP (FastAPI + uvicorn), with dynamic batching.

Requests' texts wait in one queue served by a worker thread. Static batching (`Batcher`) takes up to --max-batch
texts that share decoding settings (waiting at most --max-wait-ms after the oldest arrived), pads them to one of
a few (rows, width) shapes compiled at start-up, runs them through `Predictor.outputs` (the function
`crosswrite predict` uses) and hands each request its outputs. Continuous batching (`SlotBatcher`, the default for
greedy encoder-decoder runs) lets each text join a decoding row between steps and leave it when its output ends.
"""

import asyncio
import collections
import contextlib
import dataclasses
import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from crosswrite_jax.decode import describe
from crosswrite_jax.errors import UserError
from crosswrite_jax.models.transformer import PAD_ID
from crosswrite_jax.predict import Predictor, load_predictor
from crosswrite_jax.slots import SlotDecoder, SlotState

log = logging.getLogger("crosswrite")

OVERLONG = ("truncate", "refuse")
BATCHING = ("continuous", "static")


@dataclass(frozen=True)
class ServeOptions:
    """How `crosswrite serve` listens, batches and limits requests."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # texts run together at most
    max_wait_ms: float = 5.0  # how long the oldest waiting text may wait for others to join its batch
    batch_sizes: tuple[int, ...] = ()  # compiled batch rows; () = 1, 2, 4, 8, ... below max_batch, and max_batch
    overlong: str = "truncate"  # a text over the longest input: 'truncate' it (as predict does) or 'refuse' it
    max_texts: int = 64  # texts in one request
    max_chars: int = 10_000  # characters in one text
    max_queue: int = 256  # texts waiting for a batch; more gets 503
    batching: str = "continuous"  # 'continuous' where the run decodes greedily with an encoder-decoder, else 'static'

    def check(self) -> None:
        """Raises UserError naming the first bad option."""
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535, got {self.port}")
        for name in ("max_batch", "max_texts", "max_chars", "max_queue"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise UserError(f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        if self.batching not in BATCHING:
            raise UserError(f"--batching is 'continuous' or 'static', got {self.batching!r}")
        if self.overlong not in OVERLONG:
            raise UserError(f"--overlong is 'truncate' or 'refuse', got {self.overlong!r}")
        if any(b < 1 for b in self.batch_sizes):
            raise UserError(f"--batch-sizes must be positive, got {','.join(map(str, self.batch_sizes))}")

    def rows(self) -> tuple[int, ...]:
        """The batch sizes to compile: always ending with max_batch."""
        sizes = self.batch_sizes or tuple(2 ** k for k in range(16) if 2 ** k < self.max_batch)
        return tuple(sorted({b for b in sizes if b < self.max_batch} | {self.max_batch}))


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class _Request:
    """One HTTP request's texts in the queue: outputs fill in as batches finish."""

    count: int
    done: Callable[[list | None, BaseException | None], None]
    outputs: list = field(default_factory=list)
    remaining: int = 0
    failed: bool = False

    def __post_init__(self):
        self.outputs, self.remaining = [None] * self.count, self.count


@dataclass
class _Item:
    request: _Request
    index: int
    text: str
    key: Any  # decoding settings: texts batch together only with equal keys
    arrived: float


class Batcher:
    """Gathers queued texts into batches (by decoding settings) and runs them on a worker thread."""

    mode = "static"

    def __init__(self, predictor: Predictor, options: ServeOptions):
        self.predictor, self.options = predictor, options
        self.rows = tuple(predictor.batch_rows(r) for r in options.rows())
        self._queue: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="crosswrite-batcher", daemon=True)
        self._rng = jax.random.key(predictor.restored.run.config.decode.seed)
        self.counters = {"requests": 0, "texts": 0, "batches": 0, "batched_texts": 0, "filler_rows": 0,
                         "largest_batch": 0, "multi_request_batches": 0, "queue_full": 0, "truncated": 0,
                         "refused_overlong": 0, "bad_requests": 0, "errors": 0}
        self.batch_sizes: collections.Counter = collections.Counter()  # texts per batch -> batches

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finishes what is queued, then ends the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, texts: list[str], key: Any,
               done: Callable[[list | None, BaseException | None], None]) -> None:
        """Queues a request's texts; `done(outputs, error)` is called from the worker when all are through."""
        request = _Request(len(texts), done)
        now = time.perf_counter()
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down")
            if len(self._queue) + len(texts) > self.options.max_queue:
                self.counters["queue_full"] += 1
                raise RequestError(503, f"server busy: {len(self._queue)} texts queued and --max-queue is "
                                        f"{self.options.max_queue}; retry later")
            self._queue.extend(_Item(request, i, text, key, now) for i, text in enumerate(texts))
            self.counters["requests"] += 1
            self.counters["texts"] += len(texts)
            self._cond.notify_all()

    def _take(self) -> list[_Item] | None:
        """The next batch: the oldest text and up to max_batch - 1 later ones with its key (None: stopped).

        Gathering starts when the worker is free and a text waits (texts that came while a batch ran have waited
        already, but the callers just answered are about to send more): it ends after max_wait_ms or when full.
        """
        limit, wait = self.options.max_batch, self.options.max_wait_ms / 1000
        free = time.perf_counter()
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue[0]
            start = max(first.arrived, free)
            while not self._stopping:
                if sum(item.key == first.key for item in self._queue) >= limit:
                    break
                left = start + wait - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, rest = [], collections.deque()
            for item in self._queue:
                (batch if len(batch) < limit and item.key == first.key else rest).append(item)
            self._queue = rest
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        rows = next(r for r in self.rows if r >= len(batch))
        number = self.counters["batches"]
        decode, max_length = batch[0].key if batch[0].key is not None else (None, None)
        # Sampling: a request's own seed gives its own key; otherwise each batch folds its number into decode.seed.
        seeded = decode is not None and decode.seed != self.predictor.restored.run.config.decode.seed
        try:
            outputs = self.predictor.outputs([item.text for item in batch], rows=rows, decode=decode,
                                             max_length=max_length,
                                             rng=None if seeded else jax.random.fold_in(self._rng, number))
            error = None
        except Exception as exc:  # noqa: BLE001 - every caller gets the one-line error; the server keeps serving
            log.exception("batch of %d texts failed", len(batch))
            outputs, error = [None] * len(batch), exc
        self._count_batch(len(batch), rows)
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(batch))
        self.counters["multi_request_batches"] += len({id(item.request) for item in batch}) > 1
        self._deliver(batch, outputs, error)

    def _count_batch(self, texts: int, rows: int) -> None:
        self.counters["batches"] += 1
        self.counters["batched_texts"] += texts
        self.counters["filler_rows"] += rows - texts
        self.batch_sizes[texts] += 1

    def _deliver(self, items: list[_Item], outputs: list, error: BaseException | None) -> None:
        """Hands each item its output; a request is answered when its last text is through (or fails at once)."""
        for item, output in zip(items, outputs):
            request = item.request
            if error is not None:
                if not request.failed:
                    request.failed = True
                    self.counters["errors"] += 1
                    request.done(None, error)
                continue
            request.outputs[item.index] = output
            request.remaining -= 1
            if request.remaining == 0 and not request.failed:
                request.done(request.outputs, None)


class SlotBatcher(Batcher):
    """Continuous batching: a text joins a free decoding slot at the next step boundary and leaves it when its
    output ends (crosswrite_jax.slots), so short outputs do not wait for the longest one of their batch.

    For encoder-decoder runs that decode greedily. Texts that ask for other decoding settings run as Batcher's
    batches between decoding calls. With every slot free, the first text waits up to max_wait_ms for others
    to join it (as Batcher gathers a batch).
    """

    mode = "continuous"

    def __init__(self, predictor: Predictor, options: ServeOptions):
        super().__init__(predictor, options)
        r = predictor.restored
        self.slots, self.width = self.rows[-1], max(predictor.widths())
        self.decoder = SlotDecoder(r.model, r.params, self.slots, self.width, r.run.config.eval.max_decode_length,
                                   r.run.tokenizer.eos_id)
        self._occupants: list[_Item | None] = [None] * self.slots
        self._state: SlotState | None = None
        self._idle_since = time.perf_counter()  # when the last text left the slots
        self.counters.update(decode_calls=0, decode_steps=0, slot_steps=0)

    @staticmethod
    def supports(predictor: Predictor) -> bool:
        d = predictor.restored.run.config.decode
        return predictor.family == "encoder_decoder" and predictor.generates and d.beam_size == 1 and not d.sample

    def compile(self) -> list[tuple[int, int]]:
        """Compiles (and runs once) joining A texts of width w for every A in rows and w in the input widths, and
        the decoding loop; returns the (A, w) shapes."""
        shapes = [(a, w) for a in self.rows for w in self.predictor.widths()]
        with self.predictor.restored.context():
            state = self.decoder.start()
            for a, w in shapes:  # filler rows only: slot index `slots` is dropped
                state = self.decoder.join(state, np.full((a, w), PAD_ID, np.int32), np.full((a,), self.slots, np.int32))
            self._state = jax.block_until_ready(self.decoder.advance(state, 1)[0])
        return shapes

    @property
    def queued(self) -> int:
        return len(self._queue) + sum(item is not None for item in self._occupants)

    def _busy(self) -> bool:
        return any(item is not None for item in self._occupants)

    def _next(self) -> tuple[list[_Item], list[_Item]] | None:
        """(texts to join free slots, a batch of texts with other decoding settings); None once stopped and done."""
        with self._cond:
            while not self._queue and not self._busy():
                if self._stopping:
                    return None
                self._cond.wait()
            free = self._occupants.count(None)
            if not self._busy():  # gather concurrent callers for max_wait_ms, as Batcher does
                start = max(self._queue[0].arrived, self._idle_since)
                while not self._stopping and sum(item.key is None for item in self._queue) < free:
                    left = start + self.options.max_wait_ms / 1000 - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            joining, rest = [], collections.deque()
            for item in self._queue:
                (joining if item.key is None and len(joining) < free else rest).append(item)
            batch, others = [], collections.deque()
            for item in rest:
                (batch if len(batch) < self.options.max_batch and item.key == rest[0].key else others).append(item)
            self._queue = others
            return joining, batch

    def _work(self) -> None:
        while (work := self._next()) is not None:
            joining, batch = work
            if joining:
                self._join(joining)
            if batch:
                self._run(batch)
            if self._busy():
                self._advance()
                if not self._busy():
                    self._idle_since = time.perf_counter()

    def _join(self, items: list[_Item]) -> None:
        rows = next(r for r in self.rows if r >= len(items))
        free = [s for s, item in enumerate(self._occupants) if item is None]
        slots = np.full((rows,), self.slots, np.int32)
        slots[:len(items)] = free[:len(items)]
        try:
            ids = self.predictor.source_ids([item.text for item in items])  # at their bucket width
        except Exception as exc:  # noqa: BLE001 - the callers get the error; the server keeps serving
            log.exception("%d texts failed to tokenize", len(items))
            self._deliver(items, [None] * len(items), exc)
            return
        ids = np.pad(ids, ((0, rows - len(items)), (0, 0)), constant_values=PAD_ID)
        try:
            with self.predictor.restored.context():
                self._state = self.decoder.join(self._state, ids, slots)
        except Exception as exc:  # noqa: BLE001
            self._fail_all(items, exc, "joining")
            return
        for slot, item in zip(slots, items):
            self._occupants[slot] = item
        self._count_batch(len(items), rows)

    def _advance(self) -> None:
        """Decodes until a text ends (or the longest output's steps), then answers the texts that ended."""
        occupied = [item for item in self._occupants if item is not None]
        try:
            with self.predictor.restored.context():
                self._state, taken = self.decoder.advance(self._state, self.decoder.max_new)
                running, out = self.decoder.outputs(self._state)
        except Exception as exc:  # noqa: BLE001
            self._fail_all([], exc, "decoding")
            return
        steps = int(taken)
        self.counters["decode_calls"] += 1
        self.counters["decode_steps"] += steps
        self.counters["slot_steps"] += steps * len(occupied)
        self.counters["largest_batch"] = max(self.counters["largest_batch"], len(occupied))
        self.counters["multi_request_batches"] += len({id(item.request) for item in occupied}) > 1
        ended = [s for s, item in enumerate(self._occupants) if item is not None and not running[s]]
        if ended:
            items = [self._occupants[s] for s in ended]
            for s in ended:
                self._occupants[s] = None
            self._deliver(items, self.predictor.generated_outputs(out[ended]), None)

    def _fail_all(self, items: list[_Item], exc: BaseException, doing: str) -> None:
        """After a device call failed (the donated state may be gone): `items` and every text in the slots get the
        error, and the slots start empty."""
        failed = items + [item for item in self._occupants if item is not None]
        log.exception("%s failed; %d texts get the error", doing, len(failed))
        self._deliver(failed, [None] * len(failed), exc)
        self._occupants = [None] * self.slots
        with self.predictor.restored.context():
            self._state = self.decoder.start()


def make_batcher(predictor: Predictor, options: ServeOptions) -> Batcher:
    """A SlotBatcher for --batching continuous where the run supports it (it says so when not), else a Batcher."""
    if options.batching == "continuous":
        if SlotBatcher.supports(predictor):
            return SlotBatcher(predictor, options)
        log.info("continuous batching is for greedy encoder-decoder runs; this %s %s run batches statically",
                 predictor.family, predictor.task)
    return Batcher(predictor, options)


def compile_shapes(predictor: Predictor, rows: tuple[int, ...]) -> list[tuple[int, int]]:
    """Compiles (and runs once) the run's step for every (rows, width) a batch can take; returns the shapes."""
    shapes = [(r, w) for r in rows for w in predictor.widths()]
    for r, w in shapes:
        predictor.warm_up(r, w)
    return shapes


def model_info(predictor: Predictor, batcher: Batcher, shapes: list[tuple[int, int]],
               options: ServeOptions) -> dict[str, Any]:
    """What GET /v1/model reports."""
    restored = predictor.restored
    c = restored.run.config
    info = {"task": c.task, "family": predictor.family, "step": restored.step,
            "checkpoint": str(predictor.folder) if predictor.folder else None, "workdir": str(restored.run.workdir),
            "labels": list(predictor.labels), "parameters": int(sum(np.prod(x.shape)
                                                                       for x in jax.tree.leaves(restored.params))),
            "tokenizer_fingerprint": restored.run.tokenizer.fingerprint, "devices": jax.device_count(),
            "max_input_tokens": predictor.input_limit(), "overlong": options.overlong,
            "compiled_shapes": [list(s) for s in shapes], "max_batch": options.max_batch,
            "max_wait_ms": options.max_wait_ms, "max_texts": options.max_texts, "max_chars": options.max_chars,
            "max_queue": options.max_queue, "queued": batcher.queued, "batching_mode": batcher.mode,
            "batching": dict(batcher.counters, batch_sizes={str(k): v for k, v in sorted(batcher.batch_sizes.items())})}
    if predictor.generates:
        info["decoding"] = {"method": describe(c.decode), **dataclasses.asdict(c.decode),
                            "max_length": c.eval.max_decode_length}
    return info


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_texts(predictor: Predictor, texts: list[str], options: ServeOptions,
                counters: dict[str, int] | None = None) -> list[int]:
    """Refuses bad texts with RequestError; returns each text's token count."""
    if len(texts) > options.max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; at most {options.max_texts} (--max-texts)")
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(422, f"texts[{i}] is empty; send text to predict from")
        if "\n" in text or "\r" in text:
            raise RequestError(422, f"texts[{i}] holds a line break; send one line per text, as predict reads them")
        if len(text) > options.max_chars:
            raise RequestError(413, f"texts[{i}] has {len(text)} characters; at most {options.max_chars} "
                                    f"(--max-chars)")
    lengths = predictor.input_lengths(texts)
    limit = predictor.input_limit()
    if options.overlong == "refuse":
        for i, n in enumerate(lengths):
            if n > limit:
                if counters is not None:
                    counters["refused_overlong"] += 1
                raise RequestError(413, f"texts[{i}] takes {n} tokens, more than the {limit} this run reads "
                                        f"(--overlong refuse); shorten it")
    return lengths


SETTINGS = ("beam_size", "max_length", "length_penalty", "sample", "temperature", "top_k", "top_p", "seed")


def decoding_key(predictor: Predictor, settings: dict[str, Any]) -> Any:
    """The (decode config, max length) the settings ask for; None for the run's defaults and labeling runs."""
    given = {k: v for k, v in settings.items() if v is not None}
    if not given:
        return None
    if not predictor.generates:
        raise RequestError(422, f"a {predictor.task} run takes no decoding settings (got {', '.join(given)})")
    try:
        key = predictor.decode_config(given)
    except UserError as error:
        raise RequestError(422, _one_line(error)) from None
    default = predictor.decode_config(None)
    return None if key == default else key


def _request_model():
    """The pydantic schema of POST /v1/predict."""
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    class PredictRequest(BaseModel):
        """Texts to predict from, one line each, and optional decoding settings (generating runs only)."""

        model_config = ConfigDict(extra="forbid")
        texts: list[StrictStr] = Field(min_length=1, description="one input per text, as predict reads lines")
        beam_size: StrictInt | None = Field(None, ge=1, le=16)
        max_length: StrictInt | None = Field(None, ge=1, description="at most the run's eval.max_decode_length")
        length_penalty: float | None = Field(None, ge=0)
        sample: StrictBool | None = None
        temperature: float | None = Field(None, gt=0)
        top_k: StrictInt | None = Field(None, ge=0)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: StrictInt | None = Field(None, ge=0, lt=2 ** 31)

    return PredictRequest


def _error(status: int, message: str):
    """A one-line JSON error response (503s say when to retry)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": _one_line(message)}, status_code=status,
                        headers={"Retry-After": "1"} if status == 503 else None)


def _add_error_handlers(app, batcher: Batcher, body_limit: int) -> None:
    """Oversized bodies, malformed or invalid requests, unknown endpoints and refusals: one-line JSON errors."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def refuse_large_bodies(asgi_app):  # plain ASGI: no per-request cost beyond reading one header
        async def middleware(scope, receive, send):
            if scope["type"] == "http":
                length = dict(scope["headers"]).get(b"content-length", b"")
                if length.isdigit() and int(length) > body_limit:
                    batcher.counters["bad_requests"] += 1
                    response = _error(413, f"request body of {int(length)} bytes; at most {body_limit}")
                    return await response(scope, receive, send)
            await asgi_app(scope, receive, send)
        return middleware

    app.add_middleware(_Wrap, wrap=refuse_large_bodies)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        batcher.counters["bad_requests"] += 1
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "malformed JSON in the request body; send {\"texts\": [\"...\"]}")
        described = []
        for p in problems[:3]:
            where = ".".join(str(part) for part in p.get("loc", ()) if part != "body") or "body"
            described.append(f"{where}: {p.get('msg', 'invalid')}")
        return _error(422, "; ".join(described) + " (expected {\"texts\": [\"...\"], ...}; see GET /docs)")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        batcher.counters["bad_requests"] += 1
        if exc.status_code == 404:
            return _error(404, f"no endpoint {request.url.path}; the endpoints are POST /v1/predict, GET /v1/model, "
                               f"GET /healthz, GET / and GET /docs")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        if exc.status != 503:  # a full queue is counted as queue_full
            batcher.counters["bad_requests"] += 1
        return _error(exc.status, exc.message)


def _add_routes(app, predictor: Predictor, batcher: Batcher, options: ServeOptions,
                shapes: list[tuple[int, int]]) -> None:
    """GET /, /healthz, /v1/model; POST /v1/predict (texts wait in the batcher, answers come back per request)."""
    from fastapi.responses import HTMLResponse

    PredictRequest = _request_model()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    async def healthz():
        """Ready to serve (the server listens only after compiling)."""
        return {"status": "ok", "step": predictor.restored.step}

    @app.get("/v1/model")
    async def model():
        """The run, the checkpoint, the limits and the batching counters."""
        return model_info(predictor, batcher, shapes, options)

    @app.post("/v1/predict")
    async def predict(request: PredictRequest):
        """One output per text: what `crosswrite predict` prints for it ("output") and the task's details."""
        lengths = check_texts(predictor, request.texts, options, batcher.counters)
        key = decoding_key(predictor, {name: getattr(request, name) for name in SETTINGS})
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(outputs, exc):
            def settle():
                if not future.done():
                    future.set_exception(exc) if exc is not None else future.set_result(outputs)
            loop.call_soon_threadsafe(settle)

        batcher.submit(request.texts, key, done)
        try:
            outputs = await future
        except Exception as exc:  # noqa: BLE001
            return _error(500, f"prediction failed: {type(exc).__name__}: {exc}")
        limit = predictor.input_limit()
        truncated = [n > limit for n in lengths]
        batcher.counters["truncated"] += sum(truncated)
        return {"outputs": [dict(o, input_tokens=n, truncated=t) for o, n, t in zip(outputs, lengths, truncated)],
                "step": predictor.restored.step}


def build_app(predictor: Predictor, batcher: Batcher, options: ServeOptions, shapes: list[tuple[int, int]]):
    """The FastAPI app: GET /, /healthz, /v1/model; POST /v1/predict."""
    from fastapi import FastAPI

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.stop()  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="crosswrite serve", lifespan=lifespan,
                  description=f"{predictor.task} run {predictor.restored.run.workdir}, step {predictor.restored.step}")
    body_limit = options.max_texts * (options.max_chars * 6 + 16) + 4096  # UTF-8 / JSON escapes at worst
    _add_error_handlers(app, batcher, body_limit)
    _add_routes(app, predictor, batcher, options, shapes)
    return app


class _Wrap:
    """An ASGI middleware class (as Starlette's add_middleware takes) around a function that wraps an ASGI app."""

    def __init__(self, app, wrap):
        self.call = wrap(app)

    async def __call__(self, scope, receive, send):
        await self.call(scope, receive, send)


def _check_port(host: str, port: int) -> None:
    """Fails early (before restoring and compiling) when the address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host '{host}' does not resolve: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}; pick another --port") from None


def _ready_server(uvicorn):
    """uvicorn's Server class, logging one 'ready' line once it listens (uvicorn is an optional dependency)."""

    class Server(uvicorn.Server):
        def __init__(self, config, ready: str):
            super().__init__(config)
            self.ready = ready

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started and not self.should_exit:
                log.info("%s", self.ready)

    return Server


def serve(workdir: str | Path, options: ServeOptions, *, checkpoint: str | None = None,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restores the run, compiles its batch shapes, serves HTTP until SIGTERM / SIGINT; returns a summary."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("crosswrite serve needs FastAPI and uvicorn; pip install -e '.[serve]'") from None
    options.check()
    _check_port(options.host, options.port)
    predictor = load_predictor(workdir, overrides=overrides, checkpoint=checkpoint)
    batcher = make_batcher(predictor, options)
    started = time.perf_counter()
    shapes = batcher.compile() if isinstance(batcher, SlotBatcher) else compile_shapes(predictor, batcher.rows)
    log.info("compiled %d (batch, length) shapes %s in %.1fs (%s batching)", len(shapes),
             " ".join(f"{r}x{w}" for r, w in shapes), time.perf_counter() - started, batcher.mode)
    app = build_app(predictor, batcher, options, shapes)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=None)
    restored = predictor.restored
    ready = (f"ready: step {restored.step} of {restored.run.workdir} ({predictor.task}) on "
             f"http://{options.host}:{options.port}: POST /v1/predict, GET /v1/model, GET /healthz, page at /, "
             f"docs at /docs")
    server = _ready_server(uvicorn)(config, ready)
    batcher.start()
    # uvicorn re-raises the SIGTERM / SIGINT it shut down on once it is done; a no-op handler then lets us exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        batcher.stop()
    if not server.started:
        raise UserError(f"could not serve on {options.host}:{options.port}; see the log above")
    log.info("stopped after %d requests (%d texts in %d batches)", batcher.counters["requests"],
             batcher.counters["texts"], batcher.counters["batches"])
    return {"command": "serve", "step": predictor.restored.step, **{k: v for k, v in batcher.counters.items()}}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>crosswrite serve</title>
<style>body{font-family:sans-serif;max-width:50em;margin:2em auto}textarea{width:100%}
pre{background:#f4f4f4;padding:.5em;white-space:pre-wrap}</style></head>
<body><h1>crosswrite serve</h1><p id="about">loading the model description...</p>
<form id="form"><textarea id="text" rows="5" placeholder="One text per line"></textarea>
<p><button id="submit" type="submit">Predict</button></p></form>
<h2>Output</h2><pre id="output" data-state="idle"></pre>
<details><summary>Details (JSON)</summary><pre id="details"></pre></details>
<script>
fetch('/v1/model').then(r => r.json()).then(m => {
  document.getElementById('about').textContent = `${m.task} (${m.family}), step ${m.step} of ${m.workdir}`;
});
document.getElementById('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const out = document.getElementById('output'), details = document.getElementById('details');
  const texts = document.getElementById('text').value.split('\\n').filter(t => t.trim());
  out.dataset.state = 'busy'; out.textContent = '...';
  try {
    const r = await fetch('/v1/predict', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                          body: JSON.stringify({texts})});
    const body = await r.json();
    out.textContent = r.ok ? body.outputs.map(o => o.output).join('\\n') : 'error: ' + body.error;
    details.textContent = JSON.stringify(body, null, 2);
    out.dataset.state = r.ok ? 'done' : 'error';
  } catch (e) { out.textContent = 'error: ' + e; out.dataset.state = 'error'; }
});
</script></body></html>
"""
