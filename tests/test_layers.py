"""Layering of the package, checked with `ast` on the source (no import runs): the model layer
(memoryformer/models, memoryformer/nn) never imports the layers above it (training, evaluation, data), and
no module of memoryformer imports itself through a circle of imports (module- and function-level imports,
`if TYPE_CHECKING:` ones included, relative imports resolved)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memoryformer"
MODEL_LAYER = ("models", "nn")
HIGHER_LAYERS = ("memoryformer.training", "memoryformer.evaluation", "memoryformer.data")


def import_statements(path: Path, root: Path = PACKAGE.parent) -> list[tuple[str, list[str]]]:
    """Every import in `path` (under `root`), anywhere in it (function bodies too), as (absolute module,
    names): `import a.b` -> ("a.b", []); `from ..a import b, c` -> ("<package>.a", ["b", "c"])."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing package
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            found.append((base, [alias.name for alias in node.names]))
    return found


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of every module `path` (under `root`) imports, anywhere in it (function bodies too);
    `from a import b` counts as both `a` and `a.b` (b may be a module)."""
    names = set()
    for base, members in import_statements(path, root):
        names.add(base)
        names.update(f"{base}.{name}" for name in members)
    return names


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    """`root/memoryformer/nn/memory_ops.py` -> "memoryformer.nn.memory_ops"; a package's `__init__.py` -> the
    package's name."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports. `from a import b` is an edge to `a.b` when that is a
    module, else to `a`. A parent package's `__init__` that Python runs first is no edge: it runs before
    every submodule alike, so counting it would make every package that imports its submodules a circle."""
    files = {module_name(f, package.parent): f for f in sorted(package.rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        targets = set()
        for base, members in import_statements(path, package.parent):
            submodules = {f"{base}.{m}" for m in members} & files.keys()
            targets |= submodules or ({base} & files.keys())
            if len(submodules) < len(members):  # some names are not modules: they come from `base` itself
                targets |= {base} & files.keys()
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports in `graph` as [a, b, ..., a], or None when the graph has none (depth-first)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every descendant was seen
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_models_and_nn_never_import_training_evaluation_or_data():
    files = [f for layer in MODEL_LAYER for f in sorted((PACKAGE / layer).rglob("*.py"))]
    assert len(files) > 5  # the walk found the model layer
    imports = {str(f.relative_to(PACKAGE.parent)): imported_modules(f) for f in files}
    offending = {f: sorted(m for m in mods if m.startswith(HIGHER_LAYERS)) for f, mods in imports.items()}
    offending = {f: mods for f, mods in offending.items() if mods}
    assert not offending, f"the model layer imports from a higher layer: {offending}"


def test_nn_never_imports_models():
    # the building blocks sit below the models that assemble them
    files = sorted((PACKAGE / "nn").rglob("*.py"))
    offending = {f.name: [m for m in imported_modules(f) if m.startswith("memoryformer.models")]
                 for f in files}
    assert len(files) > 3 and not any(offending.values()), f"nn/ imports models/: {offending}"


def test_the_import_scan_sees_relative_and_nested_imports(tmp_path):
    # the checker itself, on a file that hides its imports the ways a module could
    probe = tmp_path / "memoryformer" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..training import module\n\ndef f():\n    import memoryformer.data.sample\n")
    found = imported_modules(probe, root=tmp_path)
    assert "memoryformer.training.module" in found and "memoryformer.data.sample" in found


def test_no_module_of_the_package_imports_itself_through_a_circle():
    graph = import_graph()
    assert len(graph) > 50 and "memoryformer.nn.memory_ops" in graph  # the walk found the package
    assert "memoryformer.nn.memory_layer" in graph["memoryformer.models.attention"]  # and its imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_cycle_finder_sees_circles_through_function_level_and_relative_imports(tmp_path):
    # the checker itself, on a package whose circle closes inside a function body through a relative import
    pkg = tmp_path / "memoryformer"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nn" / "__init__.py").write_text("from memoryformer.nn.layer import Layer\n")
    (pkg / "nn" / "layer.py").write_text("from memoryformer.nn import ops\n\nclass Layer:\n    pass\n")
    (pkg / "nn" / "ops.py").write_text("import torch\n\ndef f():\n    from .layer import Layer\n")
    graph = import_graph(pkg)
    assert graph["memoryformer.nn.layer"] == {"memoryformer.nn.ops"}  # `from pkg import module`: the module
    assert find_cycle(graph) == ["memoryformer.nn.layer", "memoryformer.nn.ops", "memoryformer.nn.layer"]
    (pkg / "nn" / "ops.py").write_text("import torch\n\ndef f(layer_tables):\n    return layer_tables\n")
    assert find_cycle(import_graph(pkg)) is None  # the package __init__ importing its submodule is no circle
