"""One live run per output directory: `<output_dir>/.run.lock`, held with `flock` by the launching process.

The file records the owner's pid, host and start time (for the refusal message); the `flock` on it is what
says "alive": the kernel drops it when the process dies, however it dies, so a lock file left by a killed
run is stale and is taken over (one logged line) while a live owner's is refused (`RunLockError`). Only the
launching process locks: the DDP workers Lightning starts (which re-run `train.py` with `LOCAL_RANK` set),
the other ranks of torchrun / SLURM jobs and the other nodes leave it to rank 0. Each Hydra multirun job has
its own output directory and so its own lock, released when its `train()` returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from memoryformer.errors import RunLockError  # the one RunLockError, also importable from here

LOCK_NAME = ".run.lock"
#: Environment variables that mark a process that is not the launching one (any value but 0).
RANK_VARS = ("LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_launching_process(environ: dict[str, str] | None = None) -> bool:
    """True unless a rank variable (`LOCAL_RANK`, `RANK`, `NODE_RANK`, ...) says this is a worker."""
    env = os.environ if environ is None else environ
    return all(env.get(var, "0") in ("", "0") for var in RANK_VARS)


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _acquire(path: Path) -> tuple[bool, int]:
    """`(file existed before, fd holding the flock)`; raises `RunLockError` while a live run holds it."""
    while True:
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _owner(path)
            raise RunLockError(
                f"{path.parent} is in use by another live run (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}, lock file {path}); wait for it to finish or stop it, or give "
                f"this run its own folder (leave hydra.run.dir at its default)."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return existed, fd
        os.close(fd)  # the owner removed the file between our open and flock: lock the new one


@contextlib.contextmanager
def run_lock(output_dir: str | os.PathLike, enabled: bool = True) -> Iterator[Path | None]:
    """Hold `<output_dir>/.run.lock` for the body; raise `RunLockError` when a live run holds it.

    With `enabled=False` (a worker process, see `is_launching_process`) nothing is locked.
    """
    if not enabled:
        yield None
        return
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    existed, fd = _acquire(path)
    try:
        if existed:
            owner = _owner(path)
            if owner:
                rank_zero_info(
                    f"Taking over the stale run lock {path} of pid {owner.get('pid', '?')} on host "
                    f"{owner.get('host', '?')}, which no longer runs."
                )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        try:
            yield path
        finally:
            # unlink before unlocking: a run that starts in between sees no file, never our stale content
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)
