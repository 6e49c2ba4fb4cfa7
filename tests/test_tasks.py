"""The task registry, and the rule that only tasks/ knows task names: everything else asks the Task."""

import ast
from pathlib import Path

import pytest

from crosswrite_jax import config as config_lib
from crosswrite_jax.errors import UserError
from crosswrite_jax.tasks import TASKS, Task, get_task

PACKAGE = Path(__file__).resolve().parent.parent / "crosswrite_jax"
TASK_NAMES = {"task", "task_name"}

def _names_a_task(node: ast.expr) -> bool:
    """`task`, `task_name`, `x.task`, `task.name` or `x.task.name`."""
    if isinstance(node, ast.Name):
        return node.id in TASK_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr == "task" or (node.attr == "name" and _names_a_task(node.value))
    return False


def _literal(node: ast.expr) -> bool:
    """A string literal, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and bool(node.elts) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)


def task_name_comparisons(source: str) -> list[int]:
    """The line of each comparison of a task name with a string literal (or a tuple of them) in `source`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_a_task(a) and _literal(b) or _names_a_task(b) and _literal(a)
                   for a, b in zip(operands, operands[1:])):
                lines.append(node.lineno)
    return lines


def test_the_comparison_finder_finds_comparisons():
    found = task_name_comparisons(
        "a = config.task == 'mlm'\nb = task in ('translation', 'summarization')\nc = self.task != 'x'\n"
        "d = task.name == 'tagging'\ne = 'mlm' == task_name\nf = task.pretraining\ng = config.task == other\n")
    assert found == [1, 2, 3, 4, 5]


def test_no_module_outside_tasks_compares_task_names():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE))
        if not module.startswith("tasks/") and (lines := task_name_comparisons(path.read_text())):
            found[module] = lines
    assert not found, f"ask the Task (crosswrite_jax/tasks/) instead of comparing task names: {found}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_is_complete(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name and callable(task.forward)
    assert task.family in config_lib._CHOICES["model.family"]
    assert task.head in config_lib._CHOICES["model.head"]
    assert task.token_keys and task.metrics and "loss" in task.metrics
    assert {task.metric_direction(m) for m in task.metrics} <= {"min", "max"}
    assert task.metric_direction("loss") == "min" and task.metric_direction("perplexity") == "min"
    assert not (task.pretraining and task.labeled) and not (task.generates and task.pretraining)
    if task.pretraining:
        features = task.batch_features(64, 16)
        assert "targets" in features and set(task.token_keys) <= set(features)


def test_every_task_the_config_accepts_is_registered():
    assert set(config_lib._CHOICES["task"]) == set(TASKS)


def test_metric_directions():
    task = get_task("classification")
    assert [task.metric_direction(m) for m in ("accuracy", "macro_f1", "loss", "nll")] == ["max", "max", "min", "min"]
    assert get_task("translation").metric_direction("bleu") == "max"


def test_an_unknown_task_is_a_user_error():
    with pytest.raises(UserError, match="choose one of translation"):
        get_task("parsing")


def test_check_model_names_the_family_and_head():
    model = config_lib.ModelConfig(family="encoder", head="none")
    get_task("mlm").check_model(model)
    with pytest.raises(UserError, match="needs model.head='mlm'"):
        get_task("mlm").check_model(model, head_too=True)
    with pytest.raises(UserError, match="set --config.model.family=decoder"):
        get_task("causal_lm").check_model(model)


def test_an_imported_model_pretrains_with_its_familys_first_pretraining_task():
    from crosswrite_jax.tasks import pretraining_task

    assert [pretraining_task(f).name for f in ("encoder_decoder", "encoder", "decoder")] == [
        "span_corruption", "mlm", "causal_lm"]
