"""Evaluation from a checkpoint: restore params onto the devices present, decode a split, score it."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax.data import pipeline
from crosswrite_jax.decode import describe, make_decoder
from crosswrite_jax.errors import UserError
from crosswrite_jax.metrics import summarization_scores, translation_scores
from crosswrite_jax.models.transformer import build_model, example_inputs
from crosswrite_jax.preflight import check_params
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.state import strip_boxes
from crosswrite_jax.tasks import get_task
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
                            prefix_lm=self.run.config.task == "prefix_lm")


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
    mesh = sharding.make_mesh(run.config.mesh.shape)
    rules = sharding.logical_rules(run.config.mesh.rules)
    model = build_model(run.config.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda key: model.init(key, *example_inputs(run.config.model))["params"],
                               jax.random.key(0))
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), strip_boxes(boxed),
                            shardings)
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
    return Restored(run, mesh, rules, model, shardings, params, step)


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
    run = restored.run
    task = get_task(run.config.task)
    if task.pretraining:
        return held_out_scores(restored)
    if task.labeled:
        return labeled_scores(restored)
    if run.config.model.family != "encoder_decoder":
        raise UserError(f"crosswrite eval scores translations, but this run's model.family is "
                        f"'{run.config.model.family}'; use `crosswrite predict` to generate from it")
    hypotheses, references = translate_split(restored)
    scores = generation_scores(task.name, hypotheses, references)
    scores.update(step=restored.step, split=run.config.eval.split, examples=len(references),
                  decoding=describe(run.config.decode), devices=jax.device_count())
    if jax.process_index() == 0:
        out = run.workdir / "eval"
        out.mkdir(exist_ok=True)
        stem = f"{run.config.eval.split}-step{restored.step}"
        (out / f"{stem}.hyp.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        (out / f"{stem}.ref.txt").write_text("\n".join(" ||| ".join(refs) for refs in references) + "\n",
                                             encoding="utf-8")
        scores["hypotheses_file"] = str(out / f"{stem}.hyp.txt")
        _record(restored, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return scores


def generation_scores(task_name: str, hypotheses: list[str], references: list[list[str]]) -> dict[str, Any]:
    """ROUGE for summaries; sacreBLEU BLEU and chrF (first reference) for translations."""
    if task_name == "summarization":
        return summarization_scores(hypotheses, references)
    return translation_scores(hypotheses, [refs[0] for refs in references])


def _record(restored: Restored, scores: dict[str, float]) -> None:
    writer = MetricsWriter(restored.run.workdir)
    writer.write(restored.step, restored.run.config.eval.split, scores)
    writer.close()


def labeled_scores(restored: Restored) -> dict[str, Any]:
    """Classification (accuracy, macro-F1) or tagging (seqeval entity P/R/F1 per type) scores of eval.split;
    predictions are written next to the gold labels."""
    from crosswrite_jax.train import LabeledSplit, jit_labeled_eval_step, score_labeled

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
            for (text, gold), guess in zip(split.examples, predicted):
                if task.name == "classification":
                    f.write(f"{text}\t{gold}\t{guess}\n")
                else:
                    f.writelines(f"{word}\t{g}\t{p}\n" for word, g, p in zip(text, gold, guess))
                    f.write("\n")
        scores["predictions_file"] = str(path)
        _record(restored, {k: v for k, v in scores.items() if isinstance(v, (int, float))})
    return scores


def held_out_scores(restored: Restored) -> dict[str, Any]:
    """Loss, perplexity and accuracy of a pretraining run's objective over all of data.eval_sources."""
    from crosswrite_jax.train import make_eval_step, summarize, to_global_batch, validation_batches

    run = restored.run
    task = get_task(run.config.task)
    if not run.config.data.eval_sources:
        raise UserError(f"this run's task '{task.name}' is scored on held-out text, but config key "
                        f"'data.eval_sources' is empty; pass --config.data.eval_sources='text:FILE' (or another "
                        f"source spec), or use `crosswrite predict` to generate")
    batches = validation_batches(run, task, limit=0)
    batch_sharding = sharding.batch_sharding(restored.mesh)
    step = jax.jit(make_eval_step(restored.model, task, label_smoothing=0.0),
                   in_shardings=(restored.param_shardings, batch_sharding), out_shardings=sharding.replicated(restored.mesh))
    totals = {"loss_sum": 0.0, "nll_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    with restored.context():
        for batch in batches:
            sums = jax.device_get(step(restored.params, to_global_batch(batch, restored.mesh)))
            for key in totals:
                totals[key] += float(sums[key])
    scores = dict(summarize(totals), step=restored.step, task=task.name, split="eval_sources",
                  batches=len(batches), devices=jax.device_count())
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
    pairs = [(source, "") for source in sources]
    batches = pipeline.eval_batches(pairs, run.tokenizer, batch_size=padded_batch_size(restored, c.eval.batch_size),
                                    max_source_length=c.data.max_source_length,
                                    bucket_lengths=c.data.bucket_lengths)
    decode = decode or restored.decoder(c.eval.max_decode_length)
    rng = jax.random.key(c.decode.seed)
    hypotheses = [""] * len(pairs)
    with restored.context():
        for number, batch in enumerate(batches):
            ids = decode(restored.params, global_batch(restored, batch["inputs"]), jax.random.fold_in(rng, number))
            ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
            for row, text in zip(batch["example_index"], run.tokenizer.decode_batch(ids)):
                if row >= 0:
                    hypotheses[row] = text
    return hypotheses, references
