"""Layering of the package, checked with `ast` on the source (no import runs): the model layer
(memoryformer/models, memoryformer/nn) never imports the layers above it (training, evaluation, data)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memoryformer"
MODEL_LAYER = ("models", "nn")
HIGHER_LAYERS = ("memoryformer.training", "memoryformer.evaluation", "memoryformer.data")


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of every module `path` (under `root`) imports, anywhere in it (function bodies too)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing package
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_models_and_nn_never_import_training_evaluation_or_data():
    files = [f for layer in MODEL_LAYER for f in sorted((PACKAGE / layer).rglob("*.py"))]
    assert len(files) > 5  # the walk found the model layer
    imports = {str(f.relative_to(PACKAGE.parent)): imported_modules(f) for f in files}
    offending = {f: sorted(m for m in mods if m.startswith(HIGHER_LAYERS)) for f, mods in imports.items()}
    offending = {f: mods for f, mods in offending.items() if mods}
    assert not offending, f"the model layer imports from a higher layer: {offending}"


def test_the_import_scan_sees_relative_and_nested_imports(tmp_path):
    # the checker itself, on a file that hides its imports the ways a module could
    probe = tmp_path / "memoryformer" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..training import module\n\ndef f():\n    import memoryformer.data.sample\n")
    found = imported_modules(probe, root=tmp_path)
    assert "memoryformer.training.module" in found and "memoryformer.data.sample" in found
