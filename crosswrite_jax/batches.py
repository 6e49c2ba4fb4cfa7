"""A run's batches, from its files as `workdir.Run` reads them: the resumable training stream of its task
(translation, classification / tagging, pretraining) and the fixed held-out batches of validation."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import grain
import jax
import numpy as np

from crosswrite_jax import workdir as workdir_lib
from crosswrite_jax.config import Config
from crosswrite_jax.data import labeled, pipeline, pretraining, prompts
from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks import Task, get_task


def make_dataset(pairs, tokenizer, config: Config, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """The random-access grain dataset of translation batches (packed or bucketed, as configured), or of a
    prompted task's prompt -> response rows."""
    d = config.data
    common = dict(global_batch_size=config.train.batch_size, seed=seed, process_index=jax.process_index(),
                  process_count=jax.process_count())
    task = get_task(config.task)
    if task.prompted:
        pairs = list(zip(task.prompts(config, [s for s, _ in pairs]), [t for _, t in pairs]))
        return prompts.train_dataset(pairs, tokenizer, prompt_length=d.max_source_length,
                                     response_length=d.max_target_length, packing=d.packing, **common)
    if d.packing:
        return pipeline.packed_train_dataset(pairs, tokenizer, source_length=d.max_source_length,
                                             target_length=d.max_target_length, **common)
    return pipeline.train_dataset(pairs, tokenizer, max_source_length=d.max_source_length,
                                  max_target_length=d.max_target_length, bucket_lengths=d.bucket_lengths,
                                  length_grouping_window=d.length_grouping_window if shuffle else 1, **common)


def training_batches(run: workdir_lib.Run, task: Task) -> grain.IterDataset:
    """This process's training batches for the run's task, as a resumable grain dataset."""
    config = run.config
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    if task.labeled:
        d = config.data
        data = labeled.train_dataset(
            config.task, run.read_examples(d.train_split, d.max_train_examples), run.tokenizer, d.labels,
            global_batch_size=config.train.batch_size, max_length=d.max_source_length,
            bucket_lengths=d.bucket_lengths, seed=config.train.seed, length_grouping_window=d.length_grouping_window,
            process_index=jax.process_index(), process_count=jax.process_count(), packing=d.packing,
            max_segments=d.max_segments_per_row)
        return data.to_iter_dataset(options)
    if not task.pretraining:
        data = make_dataset(run.read_split(config.data.train_split, config.data.max_train_examples), run.tokenizer,
                            config, config.train.seed)
        return data.to_iter_dataset(options)
    return _pretraining_dataset(run, config.data.sources, config.train.seed, shuffle=True)


def with_labels(config: Config, workdir: str | Path) -> Config:
    """A classification / tagging config with data.labels filled in (from the training split when empty)."""
    if not get_task(config.task).labeled:
        return config
    labels = config.data.labels
    if not labels:
        examples = workdir_lib.Run(Path(workdir), config, None).read_examples(config.data.train_split)
        labels = labeled.label_vocabulary(config.task, examples)
    if len(labels) != config.model.num_labels:
        shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
        raise UserError(f"the {config.task} data has {len(labels)} labels ({shown}) but config key 'model.num_labels' "
                        f"is {config.model.num_labels}; set --config.model.num_labels={len(labels)}")
    return dataclasses.replace(config, data=dataclasses.replace(config.data, labels=tuple(labels)))


def validation_batches(run: workdir_lib.Run, task: Task, limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """The fixed held-out batches of validation: `limit` (default train.eval_batches; 0: all, pretraining)."""
    config = run.config
    limit = config.train.eval_batches if limit is None else limit
    if not task.pretraining:
        data = make_dataset(run.read_split(config.data.eval_split), run.tokenizer, config, seed=0, shuffle=False)
        return [data[i] for i in range(limit)]
    if not config.data.eval_sources:
        raise UserError("config key 'data.eval_sources' is empty, but train.eval_every > 0 asks for validation; "
                        "name held-out text there or set --config.train.eval_every=0")
    batches = list(itertools.islice(_pretraining_dataset(run, config.data.eval_sources, 0, shuffle=False),
                                    limit or None))
    return _same_count_on_every_process(batches)


def _pretraining_dataset(run: workdir_lib.Run, specs: tuple[str, ...], seed: int, shuffle: bool) -> grain.IterDataset:
    config = run.config
    d = config.data
    return pretraining.pretraining_dataset(
        [run.documents(spec) for spec in specs], run.tokenizer, task=config.task, objective=config.objective,
        vocab_size=config.model.vocab_size, global_batch_size=config.train.batch_size,
        inputs_length=d.max_source_length, targets_length=d.max_target_length, seed=seed,
        weights=d.mixture_weights if shuffle else (), shuffle=shuffle, packing=d.packing,
        process_index=jax.process_index(), process_count=jax.process_count())


def _same_count_on_every_process(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Pads the list with empty batches so that every process runs the same number of eval steps."""
    if jax.process_count() == 1 or not batches:
        return batches
    from jax.experimental import multihost_utils

    most = int(np.max(multihost_utils.process_allgather(np.int32(len(batches)))))
    empty = {k: np.zeros_like(v) for k, v in batches[0].items()}
    return batches + [empty] * (most - len(batches))
