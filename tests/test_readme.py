"""Docs that rot are bugs: README's generated table is current and every config name it mentions exists."""

import re
import subprocess
import sys
from pathlib import Path

from memoryformer.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GROUPS = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}


def test_model_table_is_generated_by_the_flops_tool():
    proc = subprocess.run(
        [sys.executable, "scripts/update_readme.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_two_commands_come_first():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split()[:2] for line in first_block.strip().splitlines()]
    assert commands == [["make", "train"], ["make", "test"]]


def _mentioned_choices() -> set[tuple[str, str]]:
    """(group, option) for every `group=option` / `hydra/sweeper=option` written in README.md."""
    found = set()
    for group, option in re.findall(r"(?<![\w.-])((?:hydra/)?[a-z_]+)=([A-Za-z0-9_]+)\b", README):
        if (group in GROUPS or group.startswith("hydra/")) and not option.isupper():  # NAME = placeholder
            found.add((group, option))
    for options in re.findall(r"logger='\[([a-z_,]+)\]'", README):
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
    names = re.findall(r"`((?:mf|pythia)_[a-z0-9_]+)`", README)
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
    """The left column of README's layout block: `train.py`, `scripts/gpu_check.py`, `nn/memory_layer.py`."""
    block = README.split("## Layout of the code", 1)[1].split("```", 2)[1]
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
    assert not missing, f"README's layout block does not list: {missing}"


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
