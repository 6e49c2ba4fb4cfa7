"""Evaluation: restore a checkpoint's params onto the devices present (in `state.build_layout`'s shards), the
teacher-forced eval steps, scoring (decoded splits, labeled splits, held-out loss) and training's periodic
validation. Never imports the training modules."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax.batches import validation_batches
from crosswrite_jax.data import labeled, pipeline, prompts
from crosswrite_jax.decode import describe, make_decoder
from crosswrite_jax.errors import UserError
from crosswrite_jax.losses import SUMS, summarize, task_losses, token_losses
from crosswrite_jax.preflight import check_params
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.state import StateLayout, build_layout
from crosswrite_jax.tasks import Task, get_task
from crosswrite_jax.workdir import Run, check_tokenizer, load_run, locate_checkpoint

log = logging.getLogger("crosswrite")


@dataclass
class Restored:
    """A run's model with the parameters of one checkpoint, sharded over the devices present."""

    run: Run
    mesh: Mesh
    rules: Any
    model: nn.Module
    param_shardings: Any
    params: Any
    step: int

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh and logical rules in force while tracing."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def decoder(self, max_length: int):
        """The jitted decoder `run.config.decode` describes, sharded like training."""
        return make_decoder(self.model, self.run.config.decode, max_length, self.run.tokenizer.eos_id,
                            self.param_shardings, sharding.batch_sharding(self.mesh),
                            prefix_lm=get_task(self.run.config.task).bidirectional_prompt)


def resolve(workdir: str | Path | None, checkpoint_path: str | Path | None,
            step: int | None) -> tuple[Path, int | None, Path | None]:
    """(run directory, step, checkpoints folder or None for the run's own) of `--workdir [--step]` or
    `--checkpoint PATH` (a run dir, its checkpoints/ or best/, or one step inside them)."""
    if (workdir is None) == (checkpoint_path is None):
        raise UserError("pass exactly one of --workdir DIR and --checkpoint PATH")
    if checkpoint_path is None:
        return Path(workdir), step, None
    run_dir, folder, found = locate_checkpoint(checkpoint_path)
    if step is not None and found is not None and step != found:
        raise UserError(f"--checkpoint '{checkpoint_path}' is step {found} but --step is {step}; drop --step")
    return run_dir, step if step is not None else found, folder


def restore(workdir: str | Path, step: int | None = None, overrides: dict[str, Any] | None = None,
            checkpoint_dir: str | Path | None = None) -> Restored:
    """The checkpoint at `step` (newest intact one if None) of a run, on a mesh of the devices present.

    `checkpoint_dir` reads another folder of the run than checkpoints/ (e.g. best/).
    """
    overrides = dict(overrides or {})
    overrides.setdefault("mesh.shape", (-1, 1, 1))  # the devices present, whatever mesh trained it
    if jax.devices()[0].platform != "gpu":  # a run trained with cuDNN attention evaluates anywhere: same math
        overrides.setdefault("model.attention_kernel", "xla")
    run = load_run(workdir, overrides)
    layout = build_layout(run.config, sharding.make_mesh(run.config.mesh.shape))
    abstract = layout.abstract_with_shardings().params
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else run.checkpoint_dir
    manager = checkpoint.open_manager(folder, read_only=True)
    try:
        newest = manager.latest_step()
        if newest is None:
            raise UserError(f"--workdir '{run.workdir}' has no checkpoint under {folder}; train it first")
        check_params(folder / str(step if step is not None else newest), abstract)
        params, metadata, step = checkpoint.restore_params(manager, abstract, step)
    finally:
        manager.close()
    check_tokenizer(metadata, run.tokenizer, folder)
    return Restored(run, layout.mesh, layout.rules, layout.model, layout.shardings.params, params, step)


def evaluate(workdir: str | Path | None = None, *, step: int | None = None, split: str | None = None,
             overrides: dict[str, Any] | None = None, checkpoint_path: str | Path | None = None) -> dict[str, Any]:
    """Decodes `split` (as config.decode says) with a checkpoint and returns its scores.

    The checkpoint is `workdir` at `step` (newest if None), or `checkpoint_path`: a run directory, its
    checkpoints/ or one checkpoints/STEP.
    """
    workdir, step, folder = resolve(workdir, checkpoint_path, step)
    overrides = dict(overrides or {})
    if split is not None:
        overrides["eval.split"] = split
    restored = restore(workdir, step, overrides, folder)
    scores = _scores(restored)
    newest = max((int(p.name) for p in (Path(folder) if folder else restored.run.checkpoint_dir).iterdir()
                  if p.name.isdigit()), default=restored.step)
    scores.update(step=restored.step, fell_back=restored.step != newest and step is None)
    if scores["fell_back"]:  # the newest step did not verify or restore: say so where the scores are read
        scores["newest_step"] = newest
        log.warning("scored step %d, NOT the newest step %d, which is damaged (see above)", restored.step, newest)
    return scores


def _scores(restored: Restored) -> dict[str, Any]:
    """The task's scores of a restored checkpoint on its eval split."""
    run = restored.run
    task = get_task(run.config.task)
    if task.pretraining:
        return held_out_scores(restored)
    if task.labeled:
        return labeled_scores(restored)
    if not task.generates:
        raise UserError(f"crosswrite eval scores generated text, but this run's task '{task.name}' generates none; "
                        f"use `crosswrite predict` to generate from it")
    hypotheses, references = translate_split(restored)
    scores = task.generation_scores(hypotheses, references, run.config)
    scores.update(step=restored.step, split=run.config.eval.split, examples=len(references),
                  decoding=describe(run.config.decode), beam_size=run.config.decode.beam_size,
                  devices=jax.device_count())
    if jax.process_index() == 0:
        out = run.workdir / "eval"
        out.mkdir(exist_ok=True)
        beam = run.config.decode.beam_size
        stem = f"{run.config.eval.split}-step{restored.step}" + (f"-beam{beam}" if beam > 1 else "")
        (out / f"{stem}.hyp.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        (out / f"{stem}.ref.txt").write_text("\n".join(" ||| ".join(refs) for refs in references) + "\n",
                                             encoding="utf-8")
        scores["hypotheses_file"] = str(out / f"{stem}.hyp.txt")
        _record(restored, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return scores


def _record(restored: Restored, scores: dict[str, float]) -> None:
    writer = MetricsWriter(restored.run.workdir)
    writer.write(restored.step, restored.run.config.eval.split, scores)
    writer.close()


def labeled_scores(restored: Restored) -> dict[str, Any]:
    """Classification (accuracy, macro-F1) or tagging (seqeval entity P/R/F1 per type) scores of eval.split;
    predictions are written next to the gold labels."""
    run, c = restored.run, restored.run.config
    task = get_task(c.task)
    split = LabeledSplit.read(run, c.eval.split, padded_batch_size(restored, c.eval.batch_size), c.eval.max_examples)
    eval_step = jit_labeled_eval_step(restored.model, task, 0.0, restored.param_shardings, restored.mesh)
    with restored.context():
        scores, predicted = score_labeled(split, task, c.data.labels, restored.mesh, eval_step, restored.params)
    scores.update(step=restored.step, split=c.eval.split, task=task.name, devices=jax.device_count())
    if jax.process_index() == 0:
        out = run.workdir / "eval"
        out.mkdir(exist_ok=True)
        path = out / f"{c.eval.split}-step{restored.step}.predictions.tsv"
        with path.open("w", encoding="utf-8") as f:
            f.writelines(task.prediction_lines(split.examples, predicted))
        scores["predictions_file"] = str(path)
        _record(restored, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return scores


def held_out_scores(restored: Restored) -> dict[str, Any]:
    """Loss, perplexity and accuracy of a pretraining run's objective over all of data.eval_sources."""
    run = restored.run
    task = get_task(run.config.task)
    if not run.config.data.eval_sources:
        raise UserError(f"this run's task '{task.name}' is scored on held-out text, but config key "
                        f"'data.eval_sources' is empty; pass --config.data.eval_sources='text:FILE' (or another "
                        f"source spec), or use `crosswrite predict` to generate")
    batches = validation_batches(run, task, limit=0)
    step = jit_eval_step(restored.model, task, 0.0, 0, restored.param_shardings, restored.mesh)
    with restored.context():
        scores = held_out_loss(step, restored.params, batches, restored.mesh)
    scores.update(step=restored.step, task=task.name, split="eval_sources", batches=len(batches),
                  devices=jax.device_count())
    if jax.process_index() == 0:
        writer = MetricsWriter(run.workdir)
        writer.write(restored.step, "held_out", {k: scores[k] for k in ("loss", "perplexity", "accuracy", "tokens")})
        writer.close()
    return scores


def global_batch(restored: Restored, array: np.ndarray) -> jax.Array:
    """A host array (the same on every process) as one array sharded over the batch axes."""
    batch_sharding = sharding.batch_sharding(restored.mesh)
    return jax.make_array_from_callback(array.shape, batch_sharding, lambda index: array[index])


def padded_batch_size(restored: Restored, batch_size: int) -> int:
    """The batch size rounded up so rows split evenly over the batch axes."""
    ways = sharding.data_parallel_size(restored.mesh)
    return -(-batch_size // ways) * ways


def translate_split(restored: Restored, split: str | None = None, max_examples: int | None = None,
                    decode=None) -> tuple[list[str], list[list[str]]]:
    """Hypotheses and references (each example's list) for a split (default eval.split), in the split's order."""
    run, c = restored.run, restored.run.config
    split = c.eval.split if split is None else split
    max_examples = c.eval.max_examples if max_examples is None else max_examples
    sources, references = run.read_references(split, max_examples)
    batches = generation_batches(restored, sources)
    decode = decode or restored.decoder(c.eval.max_decode_length)
    rng = jax.random.key(c.decode.seed)
    hypotheses = [""] * len(sources)
    with restored.context():
        for number, batch in enumerate(batches):
            padding = global_batch(restored, batch["padding"]) if "padding" in batch else None
            ids = decode(restored.params, global_batch(restored, batch["inputs"]), jax.random.fold_in(rng, number),
                         padding)
            ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
            for row, text in zip(batch["example_index"], run.tokenizer.decode_batch(ids)):
                if row >= 0:
                    hypotheses[row] = text
    return hypotheses, references


def generation_batches(restored: Restored, sources: list[str]) -> list[dict[str, np.ndarray]]:
    """In-order batches to decode, `example_index` -1 on filler rows: encoder inputs, or a decoder-only model's
    prompts (the task's, from the sources) with their `padding`."""
    run, c = restored.run, restored.run.config
    rows = padded_batch_size(restored, c.eval.batch_size)
    if restored.model.config.family != "decoder":
        return pipeline.eval_batches([(source, "") for source in sources], run.tokenizer, batch_size=rows,
                                     max_source_length=c.data.max_source_length, bucket_lengths=c.data.bucket_lengths)
    texts = get_task(c.task).prompts(c, sources)
    batches = []
    for start in range(0, len(texts), rows):
        ids, padding = prompts.prompt_batch(run.tokenizer, texts[start:start + rows], rows, c.data.max_source_length,
                                            c.data.bucket_lengths)
        index = np.arange(start, start + rows, dtype=np.int32)
        batches.append({"inputs": ids, "padding": padding, "example_index": np.where(index < len(texts), index, -1)})
    return batches


def make_eval_step(model: nn.Module, task: Task, label_smoothing: float, predictions: bool = False,
                   logits_chunk_length: int = 0) -> Callable[[Any, dict], dict]:
    """`eval_step(params, batch) -> summed losses`, teacher-forced, no dropout; with `predictions`, also the
    argmax label ids of the same forward pass (classification, tagging) under 'predictions'."""

    def eval_step(params, batch):
        if not predictions:
            return task_losses(model, task, {"params": params}, batch, True, {}, label_smoothing, logits_chunk_length)
        logits, targets, weights = task.forward(model, {"params": params}, batch, True, {})
        sums = token_losses(logits, targets, weights, label_smoothing)
        sums["predictions"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sums

    return eval_step


def jit_eval_step(model: nn.Module, task: Task, label_smoothing: float, logits_chunk_length: int, param_shardings,
                  mesh: Mesh):
    """The jitted teacher-forced losses step, sharded like training."""
    step = make_eval_step(model, task, label_smoothing, logits_chunk_length=logits_chunk_length)
    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def jit_labeled_eval_step(model: nn.Module, task: Task, label_smoothing: float, param_shardings, mesh: Mesh):
    """The jitted losses-and-predictions step of classification / tagging, sharded like training."""
    batch = sharding.batch_sharding(mesh)
    sums = {k: sharding.replicated(mesh) for k in SUMS}
    return jax.jit(make_eval_step(model, task, label_smoothing, predictions=True),
                   in_shardings=(param_shardings, batch), out_shardings=dict(sums, predictions=batch))


def held_out_loss(eval_step, params, batches: list[dict[str, np.ndarray]], mesh: Mesh) -> dict[str, float]:
    """Per-token loss, NLL, perplexity and accuracy of `eval_step` summed over host batches (in the mesh context)."""
    totals = {k: 0.0 for k in SUMS}
    for batch in batches:
        sums = jax.device_get(eval_step(params, sharding.to_global_batch(batch, mesh)))
        for k in totals:
            totals[k] += float(sums[k])
    return summarize(totals)


@dataclass
class LabeledSplit:
    """A classification / tagging split to score: its examples and their in-order batches (same on every process)."""

    examples: list
    batches: list[dict[str, np.ndarray]]

    @classmethod
    def read(cls, run: Run, split: str, batch_size: int, max_examples: int = 0) -> "LabeledSplit":
        d = run.config.data
        examples = run.read_examples(split, max_examples)
        batches = labeled.eval_batches(run.config.task, examples, run.tokenizer, d.labels, batch_size=batch_size,
                                       max_length=d.max_source_length, bucket_lengths=d.bucket_lengths,
                                       packing=d.packing, max_segments=d.max_segments_per_row)
        return cls(examples, batches)


MODEL_KEYS = ("inputs", "labels", "tags", "inputs_segments", "inputs_positions")


def score_labeled(split: LabeledSplit, task: Task, labels: tuple[str, ...], mesh: Mesh, eval_step,
                  params) -> tuple[dict[str, Any], list]:
    """(loss and task scores over the whole split, predicted label or tags per example)."""
    totals = {k: 0.0 for k in SUMS}
    predictions = []
    spec = sharding.batch_sharding(mesh)
    for batch in split.batches:
        arrays = {k: jax.make_array_from_callback(v.shape, spec, lambda index, v=v: v[index])
                  for k, v in batch.items() if k in MODEL_KEYS}
        out = eval_step(params, arrays)
        for k in totals:
            totals[k] += float(jax.device_get(out[k]))
        predictions.append(np.asarray(multihost_utils.process_allgather(out["predictions"], tiled=True)))
    predicted = task.predicted_labels(split.batches, predictions, split.examples, labels)
    scores = task.scores(predicted, split.examples)
    return dict(summarize(totals), **scores), predicted


class Validator:
    """Periodic validation during training: teacher-forced loss on held-out batches, plus BLEU / ROUGE of the
    first train.eval_decode_examples decoded; classification and tagging score the whole eval split instead
    (accuracy and macro-F1, or entity F1)."""

    def __init__(self, run: Run, layout: StateLayout, task: Task):
        config = run.config
        self.run, self.task = run, task
        self.restored = Restored(run, layout.mesh, layout.rules, layout.model, layout.shardings.params, None, 0)
        if task.labeled:
            self.split = LabeledSplit.read(run, config.data.eval_split,
                                           padded_batch_size(self.restored, config.eval.batch_size))
            self.eval_step = jit_labeled_eval_step(layout.model, task, config.train.label_smoothing,
                                                   layout.shardings.params, layout.mesh)
        else:
            self.eval_step = jit_eval_step(layout.model, task, config.train.label_smoothing,
                                           config.train.logits_chunk_length, layout.shardings.params, layout.mesh)
            self.batches = validation_batches(run, task)
        self.decoded = config.train.eval_decode_examples if task.generates else 0
        if self.decoded:
            self.decode = self.restored.decoder(config.eval.max_decode_length)

    def __call__(self, params) -> dict[str, Any]:
        if self.task.labeled:
            with self.restored.context():
                scores, _ = score_labeled(self.split, self.task, self.run.config.data.labels, self.restored.mesh,
                                          self.eval_step, params)
            return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        with self.restored.context():
            scores = held_out_loss(self.eval_step, params, self.batches, self.restored.mesh)
        if self.decoded:  # greedy (or as decode.* say) outputs of the first examples, scored
            self.restored.params = params
            hypotheses, references = translate_split(self.restored, self.run.config.data.eval_split, self.decoded,
                                                     self.decode)
            scores.update({k: v for k, v in self.task.generation_scores(hypotheses, references, self.run.config).items()
                           if isinstance(v, (int, float))})
        return scores
