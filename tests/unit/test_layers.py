"""The package's layers (docs/architecture.md): every import of a srpo module points to its own
layer or one below, and no import cycle exists. Read from the source with `ast`, imports inside
functions included, so a lazy import cannot hide an upward arrow."""

import ast
from pathlib import Path

import pytest
from support import REPO

LAYERS = (
    ("runtime", ("srpo", "srpo.io", "srpo.settings", "srpo.text_tokenizers", "srpo.runtime")),
    (
        "models, rewards and file formats",
        (
            "srpo.flux",
            "srpo.rewards",
            "srpo.config",
            "srpo.encode",
            "srpo.prompts",
            "srpo.hpd",
            "srpo.verify",
            "srpo.tiny",
            "srpo.sample_manifest",
            "srpo.scorers",
        ),
    ),
    (
        "algorithm and step",
        (
            "srpo.algorithm",
            "srpo.train.step",
            "srpo.train.data",
            "srpo.train.parallel",
            "srpo.train.lora",
            "srpo.train.checkpoint",
            "srpo.train.evaluate",
            "srpo.train.timing",
        ),
    ),
    (
        "run drivers",
        (
            "srpo.train.run",
            "srpo.train.sink",
            "srpo.sample",
            "srpo.score",
            "srpo.report",
            "srpo.memory",
            "srpo.doctor",
        ),
    ),
    ("command line", ("srpo.cli", "srpo.__main__")),
)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Every module `name` imports (`from X import y` counts as X.y when that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports, for every module under `root`."""
    sources = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    return {
        name: {
            target
            for target in imported(ast.parse(path.read_text()), name, path.stem == "__init__")
            if target in sources and target != name
        }
        for name, path in sources.items()
    }


def layer_of(module: str, layers=LAYERS) -> int:
    """The layer of the longest prefix of `module` the table names (the top package itself
    only by its exact name, so that a new module must be placed)."""
    best = (-1, -1)
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if module == prefix or ("." in prefix and module.startswith(prefix + ".")):
                best = max(best, (len(prefix), index))
    if best[1] < 0:
        raise AssertionError(f"{module}: in no layer of tests/unit/test_layers.py (LAYERS)")
    return best[1]


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    return [
        f"{source} ({layers[layer_of(source, layers)][0]}) imports {target} "
        f"({layers[layer_of(target, layers)][0]})"
        for source, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target, layers) > layer_of(source, layers)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as the path that closes it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_points_down():
    assert upward_imports(import_graph(REPO / "srpo")) == []


def test_there_is_no_import_cycle():
    assert cycles(import_graph(REPO / "srpo")) == []


def test_the_package_does_not_import_the_benchmarks():
    """The benchmarks sit above the CLI, in the checkout only (`python -m benchmarks`)."""
    sources = [path for path in (REPO / "srpo").rglob("*.py")]
    reach = [p for p in sources if "benchmarks" in imported(ast.parse(p.read_text()), "x", False)]
    assert reach == []


@pytest.fixture
def crooked(tmp_path: Path) -> Path:
    """A package with one upward import (low → high, lazily) and one cycle (a ↔ b)."""
    root = tmp_path / "srpo"
    root.mkdir()
    files = {
        "__init__.py": "",
        "low.py": "def f():\n    from srpo import high\n",
        "high.py": "from . import low\n",
        "a.py": "import srpo.b\n",
        "b.py": "from srpo.a import x\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_checks_see_an_upward_import_and_a_cycle(crooked):
    layers = (("low", ("srpo", "srpo.low", "srpo.a", "srpo.b")), ("high", ("srpo.high",)))
    graph = import_graph(crooked)
    assert upward_imports(graph, layers) == ["srpo.low (low) imports srpo.high (high)"]
    assert ["srpo.a", "srpo.b", "srpo.a"] in cycles(graph)
