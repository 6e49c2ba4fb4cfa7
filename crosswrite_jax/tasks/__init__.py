"""Tasks: what a batch means to a model, and everything else that varies by task (see tasks/base.py).

The training and validation steps are task-agnostic: they call `task.forward` and sum token losses; the
trainer, evaluator and commands ask the task and never compare task names. A new task is one module that
builds a `Task` plus a line in TASKS.
"""

from __future__ import annotations

from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks import classification, pretraining, sft, summarization, tagging, translation
from crosswrite_jax.tasks.base import Batch, Forward, Task
from crosswrite_jax.tasks.pretraining import first_positions

__all__ = ["TASKS", "Batch", "Forward", "Task", "check_config", "first_positions", "get_task", "pretraining_task"]

TASKS: dict[str, Task] = {task.name: task for task in (
    translation.TASK,
    summarization.TASK,
    classification.TASK,
    tagging.TASK,
    pretraining.SPAN_CORRUPTION,
    pretraining.DENOISING,
    pretraining.MLM,
    pretraining.CAUSAL_LM,
    pretraining.PREFIX_LM,
    sft.TASK,
)}


def get_task(name: str) -> Task:
    """The task called `name`."""
    if name not in TASKS:
        raise UserError(f"config key 'task' is {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def check_config(config, head_too: bool = False) -> None:
    """Fails when `config` names no task, or one its model (and, for training, its head) cannot serve."""
    get_task(config.task).check_config(config, head_too)


def pretraining_task(family: str) -> Task:
    """The task a model.family pretrains with by default (an imported model's): the first registered pretraining task
    for it (span corruption, MLM, causal LM)."""
    return next(task for task in TASKS.values() if task.pretraining and task.family == family)
