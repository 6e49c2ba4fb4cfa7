"""Evaluation from a checkpoint: restore params onto the devices present, decode a split, score it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from crosswrite_jax import checkpoint, sharding
from crosswrite_jax.data import pipeline
from crosswrite_jax.decode import make_greedy_decoder
from crosswrite_jax.metrics import translation_scores
from crosswrite_jax.preflight import check_params
from crosswrite_jax.reporting import MetricsWriter
from crosswrite_jax.train import Trainer
from crosswrite_jax.workdir import Run, check_tokenizer, load_run

log = logging.getLogger("crosswrite")


def evaluate(workdir: str | Path, *, step: int | None = None, split: str | None = None,
             overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Greedy-decodes `split` with the checkpoint at `step` (newest if None) and returns its scores."""
    overrides = dict(overrides or {})
    overrides.setdefault("mesh.shape", (-1, 1, 1))  # the devices present, whatever mesh trained it
    if split is not None:
        overrides["eval.split"] = split
    run = load_run(workdir, overrides)
    mesh = sharding.make_mesh(run.config.mesh.shape)
    trainer = Trainer.build(run.config, mesh)
    manager = checkpoint.open_manager(run.checkpoint_dir, read_only=True)
    abstract = trainer.layout.abstract_with_shardings().params
    newest = manager.latest_step()
    if newest is not None:
        check_params(run.checkpoint_dir / str(step if step is not None else newest), abstract)
    params, metadata, step = checkpoint.restore_params(manager, abstract, step)
    manager.close()
    check_tokenizer(metadata, run.tokenizer, run.checkpoint_dir)
    hypotheses, references = translate_split(run, trainer, params)
    scores = translation_scores(hypotheses, references)
    scores.update(step=step, split=run.config.eval.split, examples=len(references))
    if jax.process_index() == 0:
        out = run.workdir / "eval"
        out.mkdir(exist_ok=True)
        stem = f"{run.config.eval.split}-step{step}"
        (out / f"{stem}.hyp.txt").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
        (out / f"{stem}.ref.txt").write_text("\n".join(references) + "\n", encoding="utf-8")
        scores["hypotheses_file"] = str(out / f"{stem}.hyp.txt")
        writer = MetricsWriter(run.workdir)
        writer.write(step, run.config.eval.split, {k: scores[k] for k in ("bleu", "chrf", "examples")})
        writer.close()
    return scores


def translate_split(run: Run, trainer: Trainer, params: Any) -> tuple[list[str], list[str]]:
    """Hypotheses and references for the configured split, in the split's order."""
    c = run.config
    pairs = run.read_split(c.eval.split, c.eval.max_examples)
    ways = sharding.data_parallel_size(trainer.mesh)
    batch_size = -(-c.eval.batch_size // ways) * ways  # rows split evenly over the batch axes
    batches = pipeline.eval_batches(pairs, run.tokenizer, batch_size=batch_size,
                                    max_source_length=c.data.max_source_length,
                                    bucket_lengths=c.data.bucket_lengths)
    batch_sharding = sharding.batch_sharding(trainer.mesh)
    decode = make_greedy_decoder(trainer.model, c.eval.max_decode_length, run.tokenizer.eos_id,
                                 trainer.layout.shardings.params, batch_sharding)
    hypotheses = [""] * len(pairs)
    with trainer.context():
        for batch in batches:
            inputs = jax.make_array_from_callback(batch["inputs"].shape, batch_sharding,
                                                  lambda index, a=batch["inputs"]: a[index])
            ids = np.asarray(multihost_utils.process_allgather(decode(params, inputs), tiled=True))
            for row, text in zip(batch["example_index"], run.tokenizer.decode_batch(ids)):
                if row >= 0:
                    hypotheses[row] = text
    return hypotheses, [t for _, t in pairs]
