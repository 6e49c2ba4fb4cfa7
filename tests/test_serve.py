"""`crosswrite serve`: a real uvicorn server in a subprocess, called over HTTP with httpx. It answers what `predict`
prints for the same inputs (translation, classification, tagging), batches concurrent requests together, refuses
bad input with one-line 4xx errors and keeps serving, and finishes requests in flight on SIGTERM."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import tiny_config
from test_finetune import _entities, _recipe, _sentiment

from crosswrite_jax import cli
from crosswrite_jax.data.tokenizer import Tokenizer
from crosswrite_jax.predict import predict

CROSSWRITE = shutil.which("crosswrite") or str(Path(sys.executable).parent / "crosswrite")
SOURCES = ["A man rides a bike.", "Two dogs play in the snow near a red house.", "A woman sings.", "Hello",
           "Children are running.", "A boat.", "The sun sets over the sea.", "A cat sleeps on a chair."]
LONG = " ".join(["A very long sentence about a man who walks his dog along the river"] * 4)  # > 32 tokens
REVIEWS = ["the film was good", "awful plot and very dull", "a lovely story", "the movie was quite poor"]
SENTENCES = ["alice was in new paris", "the plot", "bob and carol went to rome", "dave"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`crosswrite serve` in a subprocess; its log goes to a file."""

    def __init__(self, workdir: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir.parent / f"serve-{self.port}.log"
        env = dict(os.environ, JAX_PLATFORMS="cpu", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen([CROSSWRITE, "serve", "--workdir", str(workdir), "--port",
                                             str(self.port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self.log()}"
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"serve did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def predict(self, texts: list[str], **settings) -> httpx.Response:
        return self.client.post("/v1/predict", json={"texts": texts, **settings})

    def stop(self) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _predict_lines(workdir: Path, texts: list[str], **overrides) -> list[str]:
    """What `crosswrite predict` writes for the texts (in this process: 8 devices, eval.batch_size rows)."""
    out = io.StringIO()
    predict(workdir, input_path=_write(workdir.parent / "in.txt", texts), out=out, overrides=overrides or None)
    return out.getvalue().splitlines()


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(f"{t}\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def translator(tmp_path_factory):
    """A tiny translation run trained so slowly that it writes long random translations (as test_predict's)."""
    from crosswrite_jax.train import train

    workdir = tmp_path_factory.mktemp("serve_mt") / "run"
    train(tiny_config(train__steps=2, checkpoint__every=2, optimizer__learning_rate=1e-6,
                      model__tie_output_embedding=False), workdir)
    server = Server(workdir, "--max-wait-ms", "300", "--max-chars", "400", "--max-texts", "12")
    yield workdir, server
    server.stop()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from crosswrite_jax.train import train

    folder = tmp_path_factory.mktemp("serve_cls")
    train(_recipe("finetune_sst2.py", _sentiment(folder / "data"), train__steps=8, train__eval_every=4,
                  checkpoint__every=8), folder / "run")
    server = Server(folder / "run", "--max-batch", "4")
    yield folder / "run", server
    server.stop()


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    from crosswrite_jax.train import train

    folder = tmp_path_factory.mktemp("serve_tag")
    train(_recipe("finetune_ner_wnut17.py", _entities(folder / "data"), train__steps=8, train__eval_every=0,
                  train__best_metric="", train__early_stopping_patience=0, checkpoint__every=8,
                  model__num_labels=5), folder / "run")
    server = Server(folder / "run", "--max-batch", "4", "--max-wait-ms", "400", "--max-queue", "3",
                    "--overlong", "refuse")
    yield folder / "run", server
    server.stop()


def _concurrently(server: Server, payloads: list[list[str]]) -> list[httpx.Response]:
    """One request per payload, all at once from threads."""
    responses: list = [None] * len(payloads)
    start = threading.Barrier(len(payloads))

    def call(i):
        start.wait()
        responses[i] = server.predict(payloads[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


def test_translations_equal_predict_and_concurrent_requests_share_batches(translator):
    workdir, server = translator
    expected = _predict_lines(workdir, SOURCES + [LONG])
    assert len(set(expected)) > 4  # distinct, non-trivial translations

    responses = _concurrently(server, [[text] for text in SOURCES])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [r.json()["outputs"][0]["output"] for r in responses] == expected[:len(SOURCES)]
    model = server.client.get("/v1/model").json()
    assert model["batching"]["multi_request_batches"] >= 1 and model["batching"]["largest_batch"] > 1
    assert model["batching"]["requests"] == len(SOURCES) and model["batching"]["batches"] < len(SOURCES)

    whole = server.predict(SOURCES + [LONG]).json()["outputs"]  # one request, one batch
    assert [o["output"] for o in whole] == expected
    assert whole[0]["translation"] == expected[0] and not whole[0]["truncated"]
    assert whole[-1]["truncated"] and whole[-1]["input_tokens"] > model["max_input_tokens"] == 32

    assert model["task"] == "translation" and model["family"] == "encoder_decoder" and model["step"] == 2
    assert model["tokenizer_fingerprint"] == Tokenizer.load(workdir / "tokenizer").fingerprint
    assert model["parameters"] > 10_000 and model["checkpoint"].endswith("checkpoints")
    # Continuous batching: 1, 2, 4, 8 or 16 texts join at their width; rows decode at their own positions.
    assert model["batching_mode"] == "continuous"
    assert model["compiled_shapes"] == [[a, w] for a in (1, 2, 4, 8, 16) for w in (16, 32)]
    assert model["batching"]["slot_steps"] > model["batching"]["decode_steps"] > 0
    assert "ready: step 2" in server.log() and "compiled 10 (batch, length) shapes" in server.log()


def test_static_batching_equals_predict_and_compiles_every_bucket(translator):
    workdir, _ = translator
    server = Server(workdir, "--batching", "static", "--max-batch", "4", "--max-wait-ms", "300")
    try:
        expected = _predict_lines(workdir, SOURCES[:4])
        responses = _concurrently(server, [[text] for text in SOURCES[:4]])
        assert [r.json()["outputs"][0]["output"] for r in responses] == expected
        model = server.client.get("/v1/model").json()
        assert model["batching_mode"] == "static" and model["batching"]["largest_batch"] > 1
        assert model["compiled_shapes"] == [[r, w] for r in (1, 2, 4) for w in (16, 32)]
    finally:
        assert server.stop() == 0


def test_decoding_settings_per_request_equal_predict_with_the_same_config(translator):
    workdir, server = translator
    expected = _predict_lines(workdir, SOURCES[:3], **{"decode.beam_size": "2", "eval.max_decode_length": "8"})
    greedy = _predict_lines(workdir, SOURCES[3:6])
    answers: dict = {}
    calls = [threading.Thread(target=lambda: answers.update(beam=server.predict(SOURCES[:3], beam_size=2,
                                                                                 max_length=8))),
             threading.Thread(target=lambda: answers.update(greedy=server.predict(SOURCES[3:6])))]
    for call in calls:  # a beam-search batch runs between the decoding calls of the greedy slots
        call.start()
    for call in calls:
        call.join()
    assert answers["beam"].status_code == 200, answers["beam"].text
    assert [o["output"] for o in answers["beam"].json()["outputs"]] == expected
    assert [o["output"] for o in answers["greedy"].json()["outputs"]] == greedy
    sampled = server.predict(SOURCES[:2], sample=True, temperature=0.7, top_k=5, seed=3)
    assert sampled.status_code == 200 and len(sampled.json()["outputs"]) == 2
    too_long = server.predict(SOURCES[:1], max_length=500)
    assert too_long.status_code == 422 and "eval.max_decode_length" in too_long.json()["error"]
    both = server.predict(SOURCES[:1], sample=True, beam_size=2)
    assert both.status_code == 422 and "exclude each other" in both.json()["error"]


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"content": b'{"texts": ["a",', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ({"json": {"text": ["a"]}}, 422, "texts"),
    ({"json": {"texts": "a man"}}, 422, "texts"),
    ({"json": {"texts": [1, 2]}}, 422, "texts.0"),
    ({"json": {"texts": []}}, 422, "texts"),
    ({"json": {"texts": ["a"], "beam_size": "two"}}, 422, "beam_size"),
    ({"json": {"texts": ["a"], "colour": "red"}}, 422, "colour"),
    ({"json": {"texts": ["a", "  "]}}, 422, "texts[1] is empty"),
    ({"json": {"texts": ["a\nb"]}}, 422, "line break"),
    ({"json": {"texts": ["word " * 100]}}, 413, "--max-chars"),
    ({"json": {"texts": ["a"] * 13}}, 413, "--max-texts"),
])
def test_bad_requests_get_one_line_4xx_errors_and_the_server_keeps_serving(translator, request_kwargs, status,
                                                                           words):
    _, server = translator
    response = server.client.post("/v1/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["error"] and "\n" not in response.text
    assert server.predict(["A dog."]).status_code == 200


def test_unknown_endpoints_and_methods_get_404_and_405_and_the_page_is_served(translator):
    _, server = translator
    missing = server.client.get("/v2/translate")
    assert missing.status_code == 404 and "POST /v1/predict" in missing.json()["error"]
    assert server.client.get("/v1/predict").status_code == 405
    assert server.client.get("/healthz").json()["status"] == "ok"
    assert server.client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="text"' in page.text and 'id="output"' in page.text and "fetch('/v1/predict'" in page.text


def test_classification_equals_predict_with_probabilities_from_the_best_checkpoint(classifier, capsys):
    workdir, server = classifier
    texts = REVIEWS * 2
    path = _write(workdir.parent / "reviews.txt", texts)
    assert cli.main(["predict", "--workdir", str(workdir), "--input", str(path)]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.err.strip().splitlines()[-1])
    assert summary["checkpoint"].endswith("best")  # predict takes the best checkpoint by default
    outputs = [r.json()["outputs"][0] for r in _concurrently(server, [[t] for t in texts])]
    assert [o["output"] for o in outputs] == printed.out.splitlines()
    for o in outputs:
        assert o["label"] == o["output"] and set(o["probabilities"]) == {"0", "1"}
        assert abs(sum(o["probabilities"].values()) - 1) < 1e-4
        assert max(o["probabilities"], key=o["probabilities"].get) == o["label"]
    model = server.client.get("/v1/model").json()
    assert model["step"] == summary["step"] and model["checkpoint"].endswith("best") and model["labels"] == ["0", "1"]
    assert f"using step {summary['step']} from {workdir / 'best'}" in server.log()
    refused = server.predict(["a fine film"], beam_size=2)
    assert refused.status_code == 422 and "takes no decoding settings" in refused.json()["error"]


def test_tagging_equals_predict_with_words_and_entity_spans(tagger):
    workdir, server = tagger
    expected = _predict_lines(workdir, SENTENCES)
    responses = [server.predict(SENTENCES[:3]), server.predict(SENTENCES[3:])]  # --max-queue 3
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    outputs = [o for r in responses for o in r.json()["outputs"]]
    assert [o["output"] for o in outputs] == expected
    for text, o in zip(SENTENCES, outputs):
        assert [w["word"] for w in o["words"]] == text.split() and [w["tag"] for w in o["words"]] == o["output"].split()
        for entity in o["entities"]:
            assert entity["text"] == " ".join(text.split()[entity["start"]:entity["end"]])
            assert o["words"][entity["start"]]["tag"].endswith(entity["type"])
    overlong = server.predict(["alice " * 40])  # more than 32 tokens with --overlong refuse
    assert overlong.status_code == 413 and "--overlong refuse" in overlong.json()["error"]


def test_a_full_queue_answers_503(tagger):
    _, server = tagger  # --max-queue 3, --max-wait-ms 400, --max-batch 4: the first two texts wait in the queue
    responses = _concurrently(server, [SENTENCES[:2], SENTENCES[2:]])
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 503], [r.text for r in responses]
    busy = next(r for r in responses if r.status_code == 503)
    assert "--max-queue" in busy.json()["error"] and busy.headers["retry-after"] == "1"
    assert server.client.get("/v1/model").json()["batching"]["queue_full"] >= 1
    assert server.predict(SENTENCES[:1]).status_code == 200


def test_serve_refuses_runs_it_cannot_restore_with_one_line_and_exit_2(tmp_path, translator, capsys):
    workdir, _ = translator
    assert cli.main(["serve", "--workdir", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert cli.main(["serve", "--workdir", str(workdir), "--checkpoint", "best", "--port", "0"]) == 2
    assert cli.main(["serve", "--workdir", str(workdir), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("crosswrite: error: ") for line in err)
    assert "config.json" in err[0] and "no best/ checkpoint" in err[1] and "--max-batch" in err[2]


def test_sigterm_finishes_requests_in_flight_and_exits_0(translator):
    """Last in this module: it stops the translation server."""
    _, server = translator  # --max-wait-ms 300: requests sit in the queue when the signal comes
    finished: list[float] = []
    responses: list = []

    def call(text):
        response = httpx.post(f"{server.url}/v1/predict", json={"texts": [text]}, timeout=120)
        finished.append(time.monotonic())
        responses.append(response)

    before = server.client.get("/v1/model").json()["batching"]["requests"]
    threads = [threading.Thread(target=call, args=(text,)) for text in SOURCES[:4]]
    for t in threads:
        t.start()
    while server.client.get("/v1/model").json()["batching"]["requests"] < before + 4:  # all four queued
        time.sleep(0.01)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert server.process.wait(timeout=60) == 0, server.log()
    assert [r.status_code for r in responses] == [200] * 4 and max(finished) > signalled
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=5)
    assert '"command": "serve"' in server.log()


@pytest.mark.slow
def test_the_page_translates_a_sentence_in_headless_chromium(translator_page):
    """Types a sentence into the page, submits it and reads the output off the page (selenium + chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = translator_page
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(options=options,
                              service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "text").send_keys(SOURCES[1])
        driver.find_element(By.ID, "submit").click()
        output = driver.find_element(By.ID, "output")
        WebDriverWait(driver, 60).until(lambda _: output.get_attribute("data-state") in ("done", "error"))
        assert output.get_attribute("data-state") == "done", output.text
        shown = output.text
    finally:
        driver.quit()
    assert shown == server.predict([SOURCES[1]]).json()["outputs"][0]["output"]


@pytest.fixture(scope="module")
def translator_page(tmp_path_factory):
    """A server of its own for the slow page test (the default tests stop theirs)."""
    from crosswrite_jax.train import train

    workdir = tmp_path_factory.mktemp("serve_page") / "run"
    train(tiny_config(train__steps=2, checkpoint__every=2), workdir)
    server = Server(workdir, "--batch-sizes", "1")
    yield server
    server.stop()
