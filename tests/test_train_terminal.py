"""What a user sees in the terminal: each Lightning line once, and a progress bar in steps of max_steps."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memoryformer.training.run import LIGHTNING_LOGGERS, log_lightning_once

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 3


@pytest.fixture(scope="module")
def terminal(tmp_path_factory: pytest.TempPathFactory) -> str:
    """stdout + stderr of `python train.py` on the smoke model with the progress bar on."""
    out = tmp_path_factory.mktemp("terminal") / "run"
    cmd = [
        sys.executable, str(ROOT / "train.py"), "experiment=smoke", f"hydra.run.dir={out}",
        f"paths.runs_root={out.parent}", "export_final=false", f"trainer.max_steps={MAX_STEPS}",
        f"val_every_n_steps={MAX_STEPS}", "ckpt_every_n_steps=null", "trainer.enable_progress_bar=true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_each_lightning_info_line_is_printed_once(terminal: str) -> None:
    lines = [line for line in terminal.splitlines() if "GPU available:" in line]
    assert len(lines) == 1, lines
    stopped = [line for line in terminal.splitlines() if "`Trainer.fit` stopped" in line]
    assert len(stopped) == 1, stopped


@pytest.mark.slow
def test_progress_bar_counts_steps_of_max_steps(terminal: str) -> None:
    bars = [line for line in terminal.splitlines() if "━" in line]
    assert bars, terminal[-3000:]
    assert not any("/-" in line or "Epoch" in line for line in bars), bars
    assert any(f"step {MAX_STEPS}/{MAX_STEPS}" in line for line in bars), bars


def test_lightning_handlers_give_way_to_roots_only_when_root_has_handlers() -> None:
    lightning = logging.getLogger(LIGHTNING_LOGGERS[0])
    root = logging.getLogger()
    saved = (list(root.handlers), list(lightning.handlers), lightning.propagate)
    console, user_file = logging.StreamHandler(), logging.FileHandler(os.devnull)
    try:
        root.handlers, lightning.handlers, lightning.propagate = [], [console, user_file], False
        log_lightning_once()  # nothing else prints Lightning's lines: its own handler stays
        assert lightning.handlers == [console, user_file] and not lightning.propagate
        root.handlers = [logging.NullHandler()]
        log_lightning_once()
        assert lightning.handlers == [user_file] and lightning.propagate
    finally:
        user_file.close()
        root.handlers, lightning.handlers, lightning.propagate = saved
