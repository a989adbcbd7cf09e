"""SIGKILL a real training process again and again (`KILLS` times), also in the middle of checkpoint saves:
every checkpoint left on disk loads, and every `ckpt_path=auto` rerun in the same folder resumes from a step
no earlier than the last completed save (and takes over the dead run's lock).

Each training process is forked from this (already imported) test process and runs `train(cfg)` of the tiny
smoke model with a checkpoint every step; forking instead of starting `python train.py` saves the ~10 s of
imports per attempt on a loaded 2-core machine, so many kills fit in about a minute (the child trains on one
thread: OpenMP's thread pool does not survive a fork). Saves are slowed a little
(fsync sleeps 30 ms in the child) so that kills land inside them; a kill counts as "during a save" when the
save's temporary file is on disk after the kill.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from memoryformer.conf_schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
KILLS = 6
MAX_STEPS = 400
register_configs()


def _cfg(out: Path, max_steps: int = MAX_STEPS):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "experiment=smoke",
                f"paths.output_dir={out}",
                f"paths.runs_root={out.parent}",
                "logger=none",
                "model.n_embd=64",
                "model.num_tables=8",
                "model.n_head=2",
                f"trainer.max_steps={max_steps}",
                # the last attempt stops earlier: the same run, since the lr horizon and sample mapping are
                # pinned to the full budget (smoke: 4 sequences per step)
                f"optim.decay_steps={MAX_STEPS}",
                f"data.num_samples={MAX_STEPS * 4}",
                "trainer.limit_val_batches=0",
                "val_every_n_steps=null",
                "ckpt_every_n_steps=1",
                "keep_last_k=2",
                "bucket_stats_every_n_steps=0",
                "export_final=false",
                "ckpt_path=auto",
            ],
        )


def _child(cfg, log: Path, started: Path) -> None:
    """Runs in the forked process: train, append the step training starts at to `started`, never return."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # Python-level streams and logging handlers created before the fork still point at pytest's
        # capture files, not at fds 1 and 2: send them to the log too, or its lines depend on test order
        stream = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives until os._exit
        sys.stdout = sys.stderr = stream
        import logging

        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", []):
                if type(handler) is logging.StreamHandler:
                    handler.setStream(stream)
        import faulthandler

        faulthandler.dump_traceback_later(120, exit=True)  # a hang shows up in the log, not as a stuck test
        # no JIT build of the C++ kernel: a compiler killed mid-build would leave torch's build lock behind
        os.environ["MEMORYFORMER_NO_EXTENSION"] = "1"
        import torch

        # this process was forked from one that may have run OpenMP work already: OpenMP's thread pool does
        # not survive fork (the child hangs in its first parallel region), so stay single-threaded
        torch.set_num_threads(1)
        fsync = os.fsync

        def slow_fsync(f):
            time.sleep(0.03)  # widen the save window so that some kills land inside saves
            fsync(f)

        os.fsync = slow_fsync
        from memoryformer.training.module import LMTrainingModule
        from memoryformer.training.run import train

        def on_train_start(self):
            with open(started, "a") as f:
                f.write(f"{self.trainer.global_step}\n")

        LMTrainingModule.on_train_start = on_train_start
        train(cfg)
        code = 0
    except BaseException:  # noqa: BLE001 - report anything to the parent through the log, then exit
        traceback.print_exc()
    finally:
        os._exit(code)


def _starts(started: Path) -> list[int]:
    return [int(x) for x in started.read_text().split()] if started.exists() else []


def _loadable_steps(ckpt_dir: Path) -> dict[str, int]:
    """Every visible `.ckpt` must load (code-free); name -> global_step."""
    from memoryformer.checkpoint import safe_torch_load

    return {p.name: int(safe_torch_load(p, mmap=True)["global_step"]) for p in ckpt_dir.glob("*.ckpt")}


def _wait_for(cond, timeout: float, pid: int, log: Path) -> None:
    deadline = time.time() + timeout
    while not cond():
        done, status = os.waitpid(pid, os.WNOHANG)
        assert done == 0, (status, log.read_text()[-3000:])
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_save_always_resumes(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "killed"
    ckpt_dir = out / "checkpoints"
    cfg = _cfg(out)
    log, started = tmp_path / "log.txt", tmp_path / "started.txt"
    rng = random.Random(17)
    last_saved, during_save, starts = 0, 0, []
    for attempt in range(KILLS + 1):
        final = attempt == KILLS  # the last attempt runs to a few steps past the last save and ends
        n_started = len(_starts(started))
        run_cfg = _cfg(out, last_saved + 3) if final else cfg
        pid = os.fork()
        if pid == 0:
            _child(run_cfg, log, started)
        _wait_for(lambda n=n_started: len(_starts(started)) > n, 120, pid, log)
        start_step = _starts(started)[-1]
        starts.append(start_step)
        # the resumed run continues from the last completed save (or later), never from an older one
        assert start_step >= last_saved, (attempt, start_step, last_saved, log.read_text()[-3000:])
        if final:
            break
        if attempt % 2:  # kill inside a save: as soon as its temporary file appears, after 0-20 ms
            _wait_for(lambda: any(ckpt_dir.glob(".tmp-*.ckpt.*")), 60, pid, log)
            time.sleep(rng.uniform(0, 0.02))
        else:  # kill at a random moment of training
            time.sleep(rng.uniform(0.05, 1.5))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        during_save += any(ckpt_dir.glob(".tmp-*.ckpt.*"))
        steps = _loadable_steps(ckpt_dir)  # a torn file here would raise
        last_saved = max(steps.values(), default=0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
    assert _loadable_steps(ckpt_dir)["last.ckpt"] == last_saved + 3
    text = log.read_text()
    assert "Taking over the stale run lock" in text
    assert "Traceback" not in text, text[-3000:]
    print(f"kills={KILLS} during_save={during_save} resumed_at={starts}", file=sys.stderr)
    assert during_save >= KILLS // 4, during_save
    assert starts[-1] > 0 and sorted(starts) == starts
