"""Docs that rot are bugs: the generated tables are current, the README's example runs, every config
name the docs mention exists, and docs/layout.md lists every module (commands: test_doc_commands.py)."""

import re
import subprocess
import sys
from pathlib import Path

from memoryformer.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = README + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
GROUPS = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}


def test_generated_tables_are_current():
    proc = subprocess.run(
        [sys.executable, "scripts/update_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_memory_layer_example_runs_and_prints_what_it_says():
    example = README.split("```python", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    # each print's comment states its output
    claimed = [line.split("# ", 1)[1] for line in example.splitlines() if line.startswith("print(")]
    for printed, comment in zip(proc.stdout.splitlines(), claimed, strict=True):
        assert all(word in comment for word in printed.replace("torch.Size", "").split()), (printed, comment)


def _mentioned_choices() -> set[tuple[str, str]]:
    """(group, option) for every `group=option` / `hydra/sweeper=option` written in README.md or docs/."""
    found = set()
    for group, option in re.findall(r"(?<![\w.-])((?:hydra/)?[a-z_]+)=([A-Za-z0-9_]+)\b", DOCS):
        if (group in GROUPS or group.startswith("hydra/")) and not option.isupper():  # NAME = placeholder
            found.add((group, option))
    for options in re.findall(r"logger='\[([a-z_,]+)\]'", DOCS):
        found.update(("logger", o) for o in options.split(","))
    return found


def test_every_config_name_in_the_readme_exists():
    mentioned = _mentioned_choices()
    # the test must see the names users copy most
    for expected in [("model", "mf_tiny"), ("data", "pile_pythia"), ("trainer", "deepspeed_zero2"),
                     ("experiment", "mf_tiny"), ("hydra/sweeper", "optuna_lr"), ("hydra/launcher", "slurm")]:
        assert expected in mentioned, expected
    missing = [f"{g}={o}" for g, o in sorted(mentioned) if not _option_exists(g, o)]
    assert not missing, f"README mentions configs that do not exist: {missing}"


def _option_exists(group: str, option: str) -> bool:
    """A YAML file under conf/<group>/, or (model group) a preset registered in the ConfigStore."""
    return (ROOT / "conf" / group / f"{option}.yaml").exists() or (group == "model" and option in PRESETS)


def test_every_row_name_in_backticks_exists():
    # a backticked `mf_*` / `pythia_*` name is a model preset or an experiment file (often both: one row name)
    names = re.findall(r"`((?:mf|pythia)_[a-z0-9_]+)`", DOCS)
    assert "mf_small_released" in names
    for name in names:
        assert _option_exists("model", name) or _option_exists("experiment", name), name


def test_quick_start_commands_resolve_to_real_recipes():
    # `make train` itself runs end to end in tests/test_train_run.py::test_make_train_recipe_learns (slow);
    # running `make test` from inside the test suite would recurse, so both are checked as make resolves them.
    for target, needle in (("train", "scripts/make_train.py"), ("test", "-m pytest")):
        cmd = ["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert needle in proc.stdout, proc.stdout
    assert (ROOT / "scripts" / "make_train.py").exists()


def _layout_names() -> set[str]:
    """The left column of docs/layout.md's block: `train.py`, `scripts/gpu_check.py`, `nn/memory_layer.py`."""
    block = (ROOT / "docs" / "layout.md").read_text().split("```", 2)[1]
    names = set()
    for line in block.splitlines():
        names.update(n.strip() for n in line.strip().split("  ")[0].split(", ") if n.strip())
    return names


def test_layout_block_names_every_module_and_script():
    tracked = subprocess.run(
        ["git", "ls-files", "memoryformer/*.py", "scripts/*.py", "*.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    skip = ("tests/", "benchmarks/")  # listed as folders
    files = [f for f in tracked if not f.startswith(skip) and not f.endswith("__init__.py")]
    assert "memoryformer/nn/memory_layer.py" in files and "train.py" in files  # the listing found them
    names = _layout_names()
    # modules of the package are listed under `memoryformer/`, relative to it (`nn/memory_layer.py`)
    missing = [f for f in files if f.removeprefix("memoryformer/") not in names]
    assert not missing, f"docs/layout.md does not list: {missing}"


def test_no_file_points_outside_the_repository():
    """Paper facts live in docs/paper-notes.md; a private briefing beside the checkout is not in a clone."""
    outside = ["../" + "shared", "paper" + ".md"]  # split so that this file does not match itself
    proc = subprocess.run(
        ["git", "grep", "-n", "-I", "-F", *(a for p in outside for a in ("-e", p)), "--", "."],
        cwd=ROOT, capture_output=True, text=True,
    )
    hits = [line for line in proc.stdout.splitlines() if not line.startswith("docs/paper-notes.md:")]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)
    assert (ROOT / "docs" / "paper-notes.md").is_file()
