"""Real processes: SIGTERM saves a checkpoint and resumes; DDP on 2 CPU processes (gloo) keeps ranks equal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS_DIR = ROOT / "tests" / "fixtures" / "train"  # train_test_callbacks.py, imported by the child


def _train_cmd(out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=smoke",
        f"hydra.run.dir={out}",
        f"paths.runs_root={out.parent}",
        "export_final=false",
        *overrides,
    ]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_ckpt_path_last_resumes(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115 (the child writes to it while we poll)
    proc = subprocess.Popen(
        _train_cmd(out, "trainer.max_steps=1000", "ckpt_every_n_steps=null"),
        cwd=ROOT,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 240
    while time.time() < deadline and "step      2/1000" not in (tmp_path / "log.txt").read_text():
        assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = (tmp_path / "log.txt").read_text()
    assert "Interrupted at step" in text, text[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stopped = ckpt["global_step"]
    assert 2 <= stopped < 1000
    # ckpt_path=last finds it (newest last.ckpt under runs_root) and continues from that step; a budget other
    # than the interrupted run's 1000 steps is the same run only with its lr horizon and sample mapping pinned
    resumed = tmp_path / "resumed"
    same_run = ("optim.decay_steps=1000", "data.num_samples=4000")  # 1000 steps x 4 sequences
    proc = subprocess.run(
        _train_cmd(resumed, f"trainer.max_steps={stopped + 2}", *same_run, "ckpt_path=last"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr
    final = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == stopped + 2


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree_on_the_weights(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = _train_cmd(
        out,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.max_steps=3",
        "val_every_n_steps=3",
        "ckpt_every_n_steps=null",
        "+callbacks.digest._target_=train_test_callbacks.ParameterDigest",
        f"+callbacks.digest.dirpath={out}/digest",
    )
    paths = [str(CALLBACKS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**_env(), "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = [json.loads((out / "digest" / f"digest_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["step"] == digests[1]["step"] == 3
    assert digests[0]["sha256"] == digests[1]["sha256"]
    # and training changed the weights: the step-3 checkpoint differs from a fresh seeded model's
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3


HOSTILE = """
import sys, torch
class Payload:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
ckpt = {"state_dict": {}, "global_step": 1, "hyper_parameters": {"model": "nano"}, "x": Payload()}
torch.save(ckpt, sys.argv[1])
"""


@pytest.mark.slow
def test_hostile_checkpoint_runs_no_code_in_evaluate_or_train(tmp_path: Path) -> None:
    """A .ckpt whose unpickling creates a file: both entry points refuse it with one sentence naming the
    file and `trust_checkpoint=true`, exit non-zero without a traceback, and the file is never created."""
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    subprocess.run([sys.executable, "-c", HOSTILE, str(evil), str(marker)], check=True, cwd=ROOT)
    assert not marker.exists()
    runs = {
        "evaluate": [sys.executable, str(ROOT / "evaluate.py"), f"checkpoint={evil}",
                     f"hydra.run.dir={tmp_path / 'eval'}"],
        "train": _train_cmd(tmp_path / "train", f"ckpt_path={evil}"),
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0, (name, proc.stdout[-2000:])
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert str(evil) in last and "trust_checkpoint=true" in last, (name, last)
        assert not marker.exists(), name
