"""Signals and real processes: SIGTERM and a scheduler's warning stop a run at a step and save (in-process);
DDP on 2 CPU processes (gloo) keeps ranks equal; ZeRO-3 on 2 CPU processes holds each rank's shard of the
model, never the whole model, on the host. The multi-node fault paths are tests/test_cluster.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
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


#: set in this process by in-process distributed tests (Lightning, DeepSpeed); a launched run picks its own
DISTRIBUTED_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")


def _env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS},
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }


class SignalAtStep(L.Callback):
    """Sends this process `signum` at the end of optimizer step `step`, as a scheduler would."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.sent = signum, step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def _in_process(out: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=["experiment=smoke", f"paths.output_dir={out}", f"paths.runs_root={out.parent}",
                       "export_final=false", "logger=none", "val_every_n_steps=null", *overrides],
        )  # fmt: skip


def _train_with(monkeypatch, cfg, *extra: L.Callback):
    from memoryformer.training import run as run_module

    build = run_module.build_callbacks
    monkeypatch.setattr(run_module, "build_callbacks", lambda plan: [*build(plan), *extra])
    return run_module.train(cfg)


def test_sigterm_stops_at_a_step_saves_and_ckpt_path_last_continues(tmp_path, monkeypatch, caplog):
    """SIGTERM mid-run: the run stops at a whole optimizer step, writes last.ckpt there, says how to resume,
    and gives the process its signal handlers back; `ckpt_path=last` then continues from that step."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    out = tmp_path / "interrupted"
    budget = ("optim.decay_steps=8", "data.num_samples=32")  # the smoke run's horizon and mapping, pinned
    with pytest.raises(SIGTERMException) as stopped_by, caplog.at_level("INFO"):
        _train_with(monkeypatch, _in_process(out, "ckpt_every_n_steps=null", *budget),
                    SignalAtStep(signal.SIGTERM, 2))  # fmt: skip
    assert stopped_by.value.code == 128 + signal.SIGTERM  # the exit status of a process the signal ended
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    stopped = ckpt["global_step"]
    assert stopped in (2, 3), stopped
    assert f"Interrupted at step {stopped}: saved" in caplog.text
    monkeypatch.undo()
    summary = _train_with(monkeypatch, _in_process(tmp_path / "resumed", "ckpt_path=last", *budget))
    assert summary["step"] == 8
    assert f"Resuming from {out / 'checkpoints' / 'last.ckpt'} (step {stopped})" in caplog.text


def test_a_schedulers_warning_saves_first_then_hands_over_to_its_requeue_handler(tmp_path, monkeypatch):
    """Under submitit the warning is SIGUSR2: the run saves last.ckpt at a step, and only then runs the
    handler it displaced (submitit's checkpoint-and-requeue, a stand-in here), with the signal."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    calls = []
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"

    def requeue(signum, frame):
        calls.append((signum, ckpt.exists()))

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        with pytest.raises(SIGTERMException):
            _train_with(monkeypatch, _in_process(tmp_path / "run", "ckpt_every_n_steps=null"),
                        SignalAtStep(signal.SIGUSR2, 2))  # fmt: skip
        assert calls == [(signal.SIGUSR2, True)]  # once, after last.ckpt was written
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] in (2, 3)


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


#: experiment=smoke's nano widened to 106M parameters, 424 MB of fp32 weights, almost all Memory Layer tables
#: spread over 6 layers, so that the whole model stands out in a rank's peak and one layer's tables do not
ZERO3_MODEL = (
    "model.n_layer=6", "model.n_embd=256", "model.n_head=4", "model.num_tables=32", "model.code_length=8"
)


def _zero3_build_memory(out: Path, devices: int) -> list[dict]:
    """Each rank's `HostMemoryProbe` record of a ZeRO-3 run on `devices` CPU processes that stops before
    its first step."""
    cmd = _train_cmd(
        out, "trainer=deepspeed_zero3", "trainer.accelerator=cpu", f"trainer.devices={devices}",
        "trainer.precision=32-true", "global_batch_size=2", "data.seq_len=16", "validate_at_start=false",
        "val_every_n_steps=null", "ckpt_every_n_steps=null", "bucket_stats_every_n_steps=0", "logger=none",
        *ZERO3_MODEL, "+callbacks.probe._target_=train_test_callbacks.HostMemoryProbe",
        f"+callbacks.probe.dirpath={out}/probe", "+callbacks.probe.stop=true",
    )
    paths = [str(CALLBACKS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    # glibc hands freed blocks over 64 KiB back at once, so the peaks count live memory only
    env = {**_env(), "PYTHONPATH": os.pathsep.join(paths), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / "probe" / f"host_memory_rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_zero3_ranks_never_hold_the_whole_model_on_the_host(tmp_path: Path) -> None:
    """Under DeepSpeed ZeRO-3 a rank's resident memory grows by its shard of the weights, not the whole
    model, while `configure_model` builds and initialises it; a single rank, holding every shard, is the
    control. DeepSpeed's engine set-up (fp32 master copy, gradient partitions) shrinks with the ranks too."""
    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs
    from memoryformer.config import ModelConfig, to_plain
    from memoryformer.models import LanguageModel

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=smoke", *ZERO3_MODEL])
    with torch.device("meta"):
        model = LanguageModel(ModelConfig.from_dict(to_plain(cfg.model)))
    full = sum(p.numel() * 4 for p in model.parameters())  # fp32 bytes of the whole model
    # the most a rank holds whole at a time: one projection's parameters (a Memory Layer's tables and bias)
    projection = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in model.modules())
    assert full > 400e6 and projection < 0.1 * full

    (single,) = _zero3_build_memory(tmp_path / "one", 1)
    pair = _zero3_build_memory(tmp_path / "two", 2)
    assert single["build_peak"] - single["before"] >= 0.95 * full, (single, full)
    for rank in (single, *pair):
        assert rank["numel_before"] == 0, rank  # nothing built the model before configure_model
    for rank in pair:
        # its half of the weights, plus one projection whole and its shard being cut (< 0.75 x full)
        assert rank["build_peak"] - rank["before"] < full / 2 + 2 * projection, (rank, full, projection)
        grown, control = rank["setup_peak"] - rank["before"], single["setup_peak"] - single["before"]
        assert grown < 0.7 * control, (rank, single)


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
