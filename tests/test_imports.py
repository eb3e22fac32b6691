"""Every import of the project's own modules points one way: entry points -> experiments.apps -> the other
experiments packages -> models, with no circle. Every import statement counts, wherever it stands (inside a
function, under TYPE_CHECKING)."""

import ast
from pathlib import Path

from experiments import PROJECT_ROOT

PACKAGES = ("experiments", "models")
ENTRY_POINTS = ("train.py", "tune.py", "compare.py", "predict.py", "demo.py")


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [path for package in PACKAGES for path in (PROJECT_ROOT / package).rglob("*.py")]
    return {module_name(path): path for path in [*files, *(PROJECT_ROOT / name for name in ENTRY_POINTS)]}


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name an import statement of the file names (``from a import b``: a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            names.update([base, *(f"{base}.{alias.name}" for alias in node.names)])
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (a name resolves to its longest project-module prefix)."""
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for name in imported_names(path, package):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*path[path.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_graph_sees_imports_inside_functions_and_type_checking(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from a.b import C\n"
                      "def f():\n    import d.e\n    from . import g\n")
    assert imported_names(source, "pkg") == {"typing", "typing.TYPE_CHECKING", "a.b", "a.b.C", "d.e", "pkg",
                                             "pkg.g"}


def test_cycle_finds_a_circle_and_only_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40  # every module of the project was read
    assert cycle(graph) is None


def test_models_import_nothing_of_experiments():
    reaching_up = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                         for target in targets if module.startswith("models") and target.startswith("experiments"))
    assert reaching_up == []


def test_entry_points_only_run_their_command():
    graph = import_graph()
    for name in ENTRY_POINTS:
        assert graph[name.removesuffix(".py")] == {"experiments.cli"}, name


def test_nothing_below_the_apps_imports_them():
    reaching_up = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                         for target in targets if target.startswith("experiments.apps.")
                         and not module.startswith("experiments.apps."))
    assert reaching_up == []
