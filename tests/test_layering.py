"""The package's imports run one way — config → models → stats → train → report → pipeline/CLI — with no cycle.

The imports are read from the source (ast), function-level imports included: a cycle through a lazy import is still
a cycle in the design. Each failure names the offending file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nullbooth"

# Lower levels never import higher ones. Modules of one level may import each other (but never in a cycle).
LEVELS: dict[str, int] = {
    "nullbooth": 0, "nullbooth.errors": 0,
    "nullbooth.layout": 1, "nullbooth.formatting": 1,
    "nullbooth.config": 2,
    "nullbooth.storage": 3, "nullbooth.prompts": 3, "nullbooth.nullspace": 3, "nullbooth.telemetry": 3,
    "nullbooth.cluster": 3,
    "nullbooth.models": 4,
    "nullbooth.stats": 5,
    "nullbooth.train": 6,
    "nullbooth.report": 7,
    "nullbooth.pipeline": 8,
    "nullbooth.cli": 9, "nullbooth.__main__": 9,
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def level_of(module: str) -> int:
    """The level of the longest LEVELS prefix of `module`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LEVELS:
            return LEVELS[prefix]
    raise KeyError(module)


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in `path`, at any depth."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == root.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root.name:
                continue
            for alias in node.names:  # `from nullbooth.stats import store` imports the module nullbooth.stats.store
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, node.lineno))
    return [(m, line) for m, line in found if m != this]


def import_graph(root: Path) -> dict[str, list[tuple[str, str, int]]]:
    """module -> [(imported module, file, line)] over every module of the package at `root`."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {name: [(m, str(path.relative_to(root.parent)), line) for m, line in imports_of(path, root, modules)]
            for name, path in files.items()}


def find_cycle(graph: dict[str, list[tuple[str, str, int]]]) -> list[str] | None:
    """One import cycle as ["a", "b (a's file:line)", ..., "a (file:line)"], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []  # modules on the current path, each with where it was imported from

    def visit(node: str, label: str) -> list[str] | None:
        state[node] = 1
        path.append(label)
        for target, file, line in graph.get(node, []):
            if target not in graph:
                continue
            if state.get(target) == 1:
                start = next(i for i, entry in enumerate(path) if entry.split(" ")[0] == target)
                return path[start:] + [f"{target} ({file}:{line})"]
            if state.get(target) is None and (found := visit(target, f"{target} ({file}:{line})")):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if state.get(node) is None and (found := visit(node, node)):
            return found
    return None


def against_the_flow(graph: dict[str, list[tuple[str, str, int]]]) -> list[str]:
    return [f"{file}:{line}: {module} (level {level_of(module)}) imports {target} (level {level_of(target)})"
            for module, edges in graph.items() for target, file, line in edges
            if level_of(target) > level_of(module)]


def test_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_one_way():
    assert against_the_flow(import_graph(PACKAGE)) == []


def test_every_module_has_a_level():
    unplaced = []
    for name in import_graph(PACKAGE):
        try:
            level_of(name)
        except KeyError:
            unplaced.append(name)
    assert unplaced == [], f"add these modules to LEVELS: {unplaced}"


def test_statistics_never_import_training_and_components_never_import_the_cli():
    graph = import_graph(PACKAGE)
    bad = [f"{file}:{line}: {m} imports {t}" for m, edges in graph.items() for t, file, line in edges
           if (m.startswith("nullbooth.stats") and t.startswith("nullbooth.train"))
           or (t == "nullbooth.cli" and m != "nullbooth.__main__")]
    assert bad == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_finds_a_cycle_and_an_import_against_the_flow(tmp_path):
    """The checks themselves, on a small package with a lazy-import cycle and a stats → train import."""
    root = tmp_path / "nullbooth"
    _write(root, "__init__.py", "")
    _write(root, "stats/__init__.py", "")
    _write(root, "stats/a.py", "from nullbooth.stats import b\n")
    _write(root, "stats/b.py", "def f():\n    from . import a\n")
    _write(root, "train/__init__.py", "")
    _write(root, "stats/c.py", "\n\nimport nullbooth.train.d\n")
    _write(root, "train/d.py", "")
    graph = import_graph(root)
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1].split(" ")[0]
    assert "nullbooth/stats/b.py:2" in " ".join(cycle)
    assert against_the_flow(graph) == ["nullbooth/stats/c.py:3: nullbooth.stats.c (level 5) imports "
                                       "nullbooth.train.d (level 6)"]


def test_modules_and_functions_stay_small():
    """The house rules: a module past 400 lines or a function past 60 is split by concern."""
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > 400:
            too_big.append(f"{path.relative_to(PACKAGE.parent)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_big.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.name} "
                               f"({node.end_lineno - node.lineno + 1} lines)")
    assert too_big == []
