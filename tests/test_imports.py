"""Imports point one way: no cycle between crosswrite_jax's modules (imports inside functions included) and no
import from a lower layer into a higher one. The layers are those of docs/architecture.md."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "crosswrite_jax"

# Lowest first. A module may import modules of its own layer or of layers below it (never one above); a name
# ending in '.' stands for a package and all of its modules.
LAYERS = (
    ("foundation", ("errors", "config", "chips", "compile_cache", "reporting", "profiling", "integrity", "metrics",
                    "distributed", "supervise")),
    ("blocks", ("sharding", "optim", "objectives", "flops", "preflight", "peft", "decode", "slots", "models.",
                "data.", "tasks.")),
    ("layout", ("state",)),
    ("run", ("checkpoint", "workdir", "losses", "batches", "initialize")),
    ("evaluation", ("evaluate",)),
    ("steps", ("trainer", "predict")),
    ("loop", ("train",)),
    ("commands", ("bench", "compile_check", "interop", "adapters", "report", "serve", "sweep", "cli")),
)


def _modules() -> dict[str, Path]:
    """'models.layers' -> its file, for every module of the package ('' is the package itself)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level, functions, conditional blocks)."""

    def module_of(target: str) -> str:  # 'crosswrite_jax.models.transformer.build_model' -> 'models.transformer'
        module = target[len("crosswrite_jax."):] if target.startswith("crosswrite_jax.") else ""
        while module and module not in modules:
            module = module.rpartition(".")[0]
        return module

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(module_of(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import; write crosswrite_jax.{node.module or ''}"
            for alias in node.names:  # a submodule by name, else a name defined in the module imported from
                submodule = module_of(f"{node.module}.{alias.name}")
                found.add(submodule if submodule == f"{node.module}.{alias.name}"[len("crosswrite_jax."):]
                          else module_of(node.module or ""))
    return found - {"", name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if name}


def _layer(module: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or (member.endswith(".") and (module + ".").startswith(member)):
                return index
    raise AssertionError(f"crosswrite_jax.{module} is in no layer of tests/test_imports.py (and docs/architecture.md)")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_sees_function_level_imports():
    graph = _graph()
    assert "train" in graph["cli"]  # cli imports train inside run_train
    assert "tasks.classification" in graph["tasks"] and "models.transformer" in graph["tasks.pretraining"]
    assert {"state", "losses", "evaluate"} <= graph["trainer"]
    assert not {"train", "trainer"} & graph["evaluate"]  # evaluation never reaches up into training


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_import_between_layers():
    upward = []
    for module, targets in sorted(_graph().items()):
        for target in sorted(targets):
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} "
                              f"({LAYERS[_layer(target)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
