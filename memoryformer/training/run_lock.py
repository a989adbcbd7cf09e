"""One live run per output directory: `<output_dir>/.run.lock`, held by the launching process.

The file records the owner's pid, host, start time and a token (for the refusal message and the checks
below), and the owner refreshes its modification time every few seconds (a heartbeat thread).

- Where the file system supports `flock`, the lock is an `flock` on that file: the kernel drops it when the
  process dies, however it dies, so the file a killed run leaves is taken over at once (one logged line)
  and a live owner's is refused (`RunLockError`). A lock whose owner ran on another host and whose heartbeat
  stopped more than `stale_after_s` ago (a node that died: a cluster file system may keep its `flock` for
  minutes) is taken over too, by replacing the file.
- Where `flock` fails (Lustre without `-o flock` answers ENOSYS), the lock is a `memoryformer.file_lock.Lease`
  (an `O_EXCL` file with the same record and heartbeat), taken over when its owner's pid is gone on this host
  or its heartbeat stopped.

Only the launching process locks: the DDP workers Lightning starts (which re-run `train.py` with
`LOCAL_RANK` set), the other ranks of torchrun / SLURM jobs and the other nodes leave it to rank 0. Each
Hydra multirun job has its own output directory and so its own lock, released when its `train()` returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from memoryformer.errors import RunLockError  # the one RunLockError, also importable from here
from memoryformer.file_lock import HEARTBEAT_S, STALE_AFTER_S, Heartbeat, Lease, heartbeat_age, read_record

LOCK_NAME = ".run.lock"
#: errno values by which a file system says it has no `flock`
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


def _busy(path: Path, owner: dict[str, Any]) -> RunLockError:
    return RunLockError(
        f"{path.parent} is in use by another live run (pid {owner.get('pid', '?')} on host "
        f"{owner.get('host', '?')}, lock file {path}); wait for it to finish or stop it, or give "
        f"this run its own folder (leave hydra.run.dir at its default)."
    )


def _dead_remote_owner(path: Path, stale_after_s: float) -> dict[str, Any] | None:
    """The record of a holder on another host whose heartbeat stopped `stale_after_s` ago, else None."""
    owner = read_record(path)
    age = heartbeat_age(path)
    if owner.get("host") not in (None, socket.gethostname()) and age is not None and age > stale_after_s:
        return owner
    return None


def _flock(path: Path, stale_after_s: float) -> tuple[dict[str, Any], int]:
    """`(previous owner's record, fd holding the flock)`; raises `RunLockError` while a live run holds it
    and `OSError` (errno in `NO_FLOCK`) where the file system has no `flock`."""
    while True:
        previous = read_record(path)
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            dead = _dead_remote_owner(path, stale_after_s)
            if dead is None:
                raise _busy(path, read_record(path)) from None
            # its node is gone but the file system still holds its flock: lock a new file in its place
            aside = path.with_name(f"{path.name}.dead-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, aside)
                os.unlink(aside)
            continue
        except OSError:
            os.close(fd)
            if not existed:  # leave the lease a clean slate
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return previous, fd
        os.close(fd)  # the owner removed the file between our open and flock: lock the new one


@contextlib.contextmanager
def run_lock(
    output_dir: str | os.PathLike, enabled: bool = True, stale_after_s: float = STALE_AFTER_S
) -> Iterator[Path | None]:
    """Hold `<output_dir>/.run.lock` for the body; raise `RunLockError` when a live run holds it.

    With `enabled=False` (a worker process, see `is_launching_process`) nothing is locked.
    """
    if not enabled:
        yield None
        return
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        previous, fd = _flock(path, stale_after_s)
    except OSError as err:
        if err.errno not in NO_FLOCK:
            raise
        rank_zero_info(
            f"{path.parent} is on a file system without flock ({err.strerror}); the run lock is a lease file "
            f"with a heartbeat instead."
        )
        yield from _leased(path, stale_after_s)
        return
    try:
        if previous:
            rank_zero_info(
                f"Taking over the stale run lock {path} of pid {previous.get('pid', '?')} on host "
                f"{previous.get('host', '?')}, which no longer runs."
            )
        token = uuid.uuid4().hex
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        heartbeat = Heartbeat(path, HEARTBEAT_S, token)
        try:
            yield path
        finally:
            heartbeat.stop()
            # unlink before unlocking: a run that starts in between sees no file, never our stale content
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _leased(path: Path, stale_after_s: float) -> Iterator[Path]:
    lease = Lease(path, stale_after_s=stale_after_s)
    if not lease.acquire():
        raise _busy(path, lease.holder())
    if lease.took_over:
        owner = lease.took_over
        rank_zero_info(
            f"Taking over the stale run lock {path} of pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}, which no longer runs."
        )
    try:
        yield path
    finally:
        lease.release()
