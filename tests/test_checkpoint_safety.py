"""Checkpoint safety without training: no code from files, atomic writes, full disk, resume search, lock."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import tiny_model  # noqa: E402

from memoryformer.atomic_io import AtomicWriteError, atomic_write  # noqa: E402
from memoryformer.checkpoint import (  # noqa: E402
    CheckpointError,
    UnsafeCheckpointError,
    export_model,
    load_model,
)
from memoryformer.config import ConfigError  # noqa: E402
from memoryformer.file_lock import LOCK_NAME, RunLockError, run_lock
from memoryformer.launch import is_launching_process
from memoryformer.training.resume import resolve_ckpt_path  # noqa: E402
from memoryformer.training.run import SafeCheckpointIO


class Payload:
    """Unpickling this creates `marker`: what a hostile checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def training_ckpt(model, step: int = 10, **extra) -> dict:
    """What our training module writes, reduced to the parts the loaders look at."""
    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "epoch": 0,
        "global_step": step,
        "hyper_parameters": {"model": model.config.to_dict()},
        **extra,
    }


def write_ckpt(path: Path, ckpt: dict, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


# ------------------------------------------------------------------------------------- no pickle by default
def test_hostile_checkpoint_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    path = write_ckpt(tmp_path / "evil.ckpt", training_ckpt(tiny_model(), x=Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt needs the global .*trust_checkpoint=true"):
        load_model(path)
    assert not marker.exists()


def test_trust_checkpoint_opts_in_to_full_unpickling(tmp_path):
    from omegaconf import OmegaConf

    model = tiny_model(seed=5)
    ckpt = training_ckpt(model)
    ckpt["hyper_parameters"] = OmegaConf.create(ckpt["hyper_parameters"])  # as older Lightning runs stored it
    path = write_ckpt(tmp_path / "omegaconf.ckpt", ckpt)
    with pytest.raises(UnsafeCheckpointError, match="omegaconf"):
        load_model(path)
    loaded, _ = load_model(path, trust_checkpoint=True)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_torn_checkpoint_is_one_sentence(tmp_path):
    good = write_ckpt(tmp_path / "good.ckpt", training_ckpt(tiny_model()))
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"torn\.ckpt could not be read .*truncated, corrupt"):
        load_model(torn)


# --------------------------------------------------------------------------------------------- atomic writes
def test_checkpoint_io_failing_mid_write_keeps_the_old_file(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(4)}, path)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(AtomicWriteError) as err:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(4)}, path)
    msg = str(err.value)
    assert msg.startswith(f"the disk holding {path.parent} ran out of space")
    assert "free space" in msg and "ckpt_path=last" in msg and msg.count(". ") == 0
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1


def test_atomic_write_never_shows_a_partial_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def writer(f):
        f.write(b"new-but-unfinished")
        assert path.read_bytes() == b"old"  # readers still see the old content mid-write
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, writer)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_export_failing_midway_keeps_the_previous_export(tmp_path, monkeypatch):
    import safetensors.torch

    out = export_model(tiny_model(seed=1), tmp_path / "model")
    before = (out / "model.safetensors").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(AtomicWriteError, match=f"the disk holding {tmp_path} ran out of space"):
        export_model(tiny_model(seed=2), out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model"]
    monkeypatch.undo()
    export_model(tiny_model(seed=2), out)  # replacing an existing export works and leaves no leftovers
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ------------------------------------------------------------------------------------------- resume search
def test_last_skips_torn_and_unsafe_checkpoints_and_takes_the_newest_that_loads(tmp_path, caplog):
    model = tiny_model()
    runs = tmp_path / "runs"
    old = write_ckpt(runs / "a" / "checkpoints" / "last.ckpt", training_ckpt(model, 4), age_s=300)
    mid = write_ckpt(runs / "b" / "checkpoints" / "step-00000008.ckpt", training_ckpt(model, 8), age_s=200)
    torn = runs / "b" / "checkpoints" / "last.ckpt"
    torn.write_bytes(mid.read_bytes()[:1000])
    os.utime(torn, (time.time() - 100, time.time() - 100))
    marker = tmp_path / "pwned"
    write_ckpt(runs / "c" / "checkpoints" / "last.ckpt", training_ckpt(model, 12, x=Payload(marker)))
    (runs / "b" / "checkpoints" / ".tmp-last.ckpt.abc").write_bytes(b"half")  # an interrupted save

    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("last", runs, None, model.config) == str(mid)
    assert not marker.exists()
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert "trust_checkpoint=true" in skipped[0] and "could not be read" in skipped[1]
    trusted = resolve_ckpt_path("auto", runs, None, model.config, trust_checkpoint=True)
    assert trusted.endswith("c/checkpoints/last.ckpt")
    assert marker.exists()  # the opt-in really unpickles
    assert resolve_ckpt_path("last", runs / "a", None, model.config) == str(old)


def test_last_that_finds_nothing_warns_once_and_auto_logs_one_line(tmp_path, caplog, recwarn):
    model = tiny_model()
    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("auto", tmp_path / "none", tmp_path / "run", model.config) is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("ckpt_path=auto: no checkpoint of this run under") and "starting fresh" in line
    assert not recwarn.list
    assert resolve_ckpt_path("last", tmp_path / "none", tmp_path / "run", model.config) is None
    (msg,) = [str(w.message) for w in recwarn.list]
    assert msg.startswith("ckpt_path=last found no checkpoint of this run under") and msg.count("\n") == 0


def test_checkpoint_of_another_shape_is_refused_before_training(tmp_path):
    path = write_ckpt(tmp_path / "last.ckpt", training_ckpt(tiny_model()))
    other = tiny_model().config.to_dict() | {"vocab_size": 300}
    from memoryformer.config import ModelConfig

    with pytest.raises(ConfigError) as err:
        resolve_ckpt_path(str(path), tmp_path, None, ModelConfig.from_dict(other))
    msg = str(err.value)
    assert str(path) in msg and "model.vocab_size=260 there vs 300 here" in msg
    assert "lm_head.weight (260, 64) vs (300, 64)" in msg and "\n" not in msg
    # in a search a misfit is skipped, not fatal
    assert resolve_ckpt_path("auto", tmp_path, None, ModelConfig.from_dict(other)) is None


# ----------------------------------------------------------------------------------------------------- lock
def test_live_lock_is_refused_and_released_at_exit(tmp_path):
    with run_lock(tmp_path) as path:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid()
        busy = rf"in use by another live run \(pid {os.getpid()} on host"
        with pytest.raises(RunLockError, match=busy), run_lock(tmp_path):
            pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0}))
    with caplog.at_level("INFO"), run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert any("stale run lock" in r.getMessage() and "999999" in r.getMessage() for r in caplog.records)


def test_lock_held_by_another_live_process_is_refused(tmp_path):
    import subprocess

    code = (
        "import sys, time; from memoryformer.file_lock import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockError, match=rf"pid {proc.pid} on host"), run_lock(tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait()
    with run_lock(tmp_path):  # the owner was killed: its lock is stale now
        pass


def test_only_the_launching_process_locks():
    assert is_launching_process({})
    assert is_launching_process({"LOCAL_RANK": "0", "RANK": "0"})
    assert not is_launching_process({"LOCAL_RANK": "1"})  # a DDP worker Lightning started
    assert not is_launching_process({"NODE_RANK": "2", "LOCAL_RANK": "0"})
    assert not is_launching_process({"SLURM_PROCID": "3"})


def _no_flock(monkeypatch):
    """The file system of Lustre mounted without `-o flock`: every flock fails with ENOSYS."""
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_the_lock_is_a_lease_that_refuses_a_live_owner(tmp_path, monkeypatch, caplog):
    _no_flock(monkeypatch)
    with caplog.at_level("INFO"), run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(RunLockError, match=rf"pid {os.getpid()} on host"), run_lock(tmp_path):
            pass
    assert "without flock" in caplog.text and not path.exists()
    # a lease of a dead pid on this host is taken over at once
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "token": "x"}))
    with run_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_lock_of_a_node_that_died_is_taken_over_once_its_heartbeat_stops(tmp_path, monkeypatch):
    """Another host's lock whose heartbeat is fresh is live; once it is older than `stale_after_s` (the node
    died; a cluster file system may still hold its flock) the requeued job takes it over, with and without
    flock."""
    import fcntl
    import subprocess

    lock = tmp_path / LOCK_NAME
    record = {"pid": 4242, "host": "node-that-died", "started": 0, "token": "t"}
    holder = subprocess.Popen(  # holds an flock on the file, as the dead node's file system still does
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock.write_text(json.dumps(record))
        with pytest.raises(RunLockError, match="pid 4242 on host node-that-died"), run_lock(tmp_path):
            pass
        old = time.time() - 120
        os.utime(lock, (old, old))
        with run_lock(tmp_path, stale_after_s=60) as path:
            assert json.loads(path.read_text())["pid"] == os.getpid()
            with pytest.raises(RunLockError), run_lock(tmp_path):  # and holds it for real
                pass
    finally:
        holder.kill()
        holder.wait()
    assert fcntl  # flock is available here; the lease path is the next test's
    _no_flock(monkeypatch)
    lock.write_text(json.dumps(record))
    with pytest.raises(RunLockError, match="node-that-died"), run_lock(tmp_path):
        pass
    os.utime(lock, (old, old))
    with run_lock(tmp_path, stale_after_s=60):
        pass


BUILD_RACE = """
import sys, time
import numpy as np
from memoryformer.data import gpt_neox
from memoryformer.data.indexed import MMapIndexedDataset

real = gpt_neox.build_index_mappings
def counted(*args, **kwargs):
    with open(sys.argv[3], "a") as f:
        f.write("built\\n")
    time.sleep(1.0)  # a mapping of a big corpus takes a while: the others arrive meanwhile
    return real(*args, **kwargs)
gpt_neox.build_index_mappings = counted
ds = gpt_neox.GPTSampleDataset(MMapIndexedDataset(sys.argv[1]), 16, 64, 1234, sys.argv[2])
print(int(ds[0][0]), len(ds))
"""


def test_one_process_per_cache_builds_an_index_mapping_while_the_others_wait(tmp_path):
    """Four ranks start on one shared cache: the mapping is built once and all four read the same one."""
    import subprocess

    import numpy as np

    from memoryformer.data.indexed import MMapIndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as builder:
        for n in range(40):
            builder.add_document(np.arange(n % 7 + 20, dtype=np.uint16))
    counter = tmp_path / "builds.txt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_RACE, prefix, str(tmp_path / "cache"), str(counter)],
            stdout=subprocess.PIPE, text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(set(outs)) == 1, outs
    assert counter.read_text().count("built") == 1
    assert not list((tmp_path / "cache").rglob("*.tmp*")) and not list((tmp_path / "cache").rglob("*.lock"))
