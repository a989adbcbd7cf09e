"""Hydra sweeps run for real: the basic grid (paper Table 4's lr list) and the Optuna sweepers.

Each trial is the `smoke` experiment (8 steps of a 1-layer nano model), so the test checks the wiring:
the sweeper composes, every trial trains and returns its validation loss, and Optuna's hash search keeps
n_embd = K * tau through the `div` resolver.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _multirun(tmp_path: Path, *overrides: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", "logger=none", "export_final=false",
           "trainer.max_steps=2", "val_every_n_steps=2", "ckpt_every_n_steps=2",
           f"hydra.sweep.dir={tmp_path}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_grid_sweep_runs_one_job_per_value(tmp_path):
    _multirun(tmp_path, "optim.lr=1e-3,4e-3")
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job in jobs:
        overrides = (tmp_path / job / ".hydra" / "overrides.yaml").read_text()
        assert "optim.lr=" in overrides


@pytest.mark.slow
def test_optuna_hash_search_keeps_width_equal_to_k_times_tau(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = _multirun(
        tmp_path,
        "hydra/sweeper=optuna_hash",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        'model.num_tables="${div:${model.n_embd},${model.code_length}}"',
    )
    assert "Best parameters" in out and "Best value" in out
    for job in (tmp_path / "0", tmp_path / "1"):
        cfg = (job / ".hydra" / "config.yaml").read_text()
        tau = int(cfg.split("code_length: ")[1].split()[0])
        assert tau in (4, 8)
        # the resolved config of each trial was valid (the run trained), so K * tau = n_embd = 128
        assert (job / "checkpoints" / "last.ckpt").exists()
