"""Locks that work on any file system a cluster shares, and are taken over from a holder that died.

A `Lease` is a lock file created with `O_CREAT | O_EXCL` (atomic on local disks, NFSv3+ and Lustre, unlike
`flock`, which Lustre refuses with ENOSYS unless mounted with `-o flock`). It records its holder (host, pid,
start time) and its holder refreshes the file's modification time every `heartbeat_s` seconds from a
background thread. A lease is stale, and may be taken over, when its holder ran on this host and that pid
is gone, or when its heartbeat is older than `stale_after_s` (a holder on a node that died, or was cut off).

`build_once` runs a build (an index mapping, a converted checkpoint) in one process per shared cache while
the others wait for its result: the processes of a 32-rank launch then do the work once, not 32 times.

`run_lock` is one live run per output directory: `<output_dir>/.run.lock`, held by the launching process.

The file records the owner's pid, host, start time and a token (for the refusal message and the checks
below), and the owner refreshes its modification time every few seconds (a heartbeat thread).

- Where the file system supports `flock`, the lock is an `flock` on that file: the kernel drops it when the
  process dies, however it dies, so the file a killed run leaves is taken over at once (one logged line)
  and a live owner's is refused (`RunLockError`). A lock whose owner ran on another host and whose heartbeat
  stopped more than `stale_after_s` ago (a node that died: a cluster file system may keep its `flock` for
  minutes) is taken over too, by replacing the file.
- Where `flock` fails (Lustre without `-o flock` answers ENOSYS), the lock is a `Lease`
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
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from memoryformer.errors import RunLockError  # the one RunLockError, also importable from here

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_record(path: Path) -> dict[str, Any]:
    """The JSON holder record of lock file `path`; empty when unreadable or absent."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class Heartbeat:
    """Refreshes `path`'s modification time every `every_s` seconds from a daemon thread, for as long as the
    file's record carries `token` (a holder that lost its lock stops touching the new holder's file)."""

    def __init__(self, path: Path, every_s: float, token: str) -> None:
        self._done = threading.Event()

        def beat() -> None:
            while not self._done.wait(every_s):
                with contextlib.suppress(OSError):
                    if read_record(path).get("token") == token:
                        os.utime(path)

        self._thread = threading.Thread(target=beat, name=f"heartbeat-{path.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop refreshing (returns within a second)."""
        self._done.set()
        self._thread.join(timeout=1.0)


def heartbeat_age(path: Path) -> float | None:
    """Seconds since `path` was last refreshed; None when it does not exist."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


class Lease:
    """An `O_EXCL` lock file at `path` with a heartbeat; see the module docstring.

    `acquire()` returns True when this process now holds it (taking over a stale one), False while a live
    holder has it. `holder()` is the record of whoever holds it. `release()` removes the file if it is ours.
    """

    def __init__(
        self, path: str | os.PathLike, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S
    ) -> None:
        self.path = Path(path)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self.took_over: dict[str, Any] | None = None
        self._heartbeat: Heartbeat | None = None

    def holder(self) -> dict[str, Any]:
        """The holder's record (`host`, `pid`, `started`, `token`); empty when unreadable or absent."""
        return read_record(self.path)

    def is_stale(self) -> bool:
        """True when the current holder is dead: its pid is gone on this host, or its heartbeat stopped."""
        age = heartbeat_age(self.path)
        if age is None:
            return False
        owner = self.holder()
        here = owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int)
        if here and not _pid_alive(owner["pid"]):
            return True
        return age > self.stale_after_s

    def acquire(self) -> bool:
        """Take the lease if it is free or stale; False while a live holder has it."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self.is_stale():
                    return False
                stale = self.holder()
                self.took_over = stale
                # move the stale file aside under a unique name: of two processes taking over at once, only
                # one renames the stale file; the other then finds the winner's fresh file (and puts it back
                # if it moved that one instead)
                aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self.path, aside)
                    moved = json.loads(aside.read_text() or "{}")
                    if moved.get("token") != stale.get("token"):
                        os.rename(aside, self.path)
                    else:
                        os.unlink(aside)
                continue
            record = {
                "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": self.token
            }
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._heartbeat = Heartbeat(self.path, self.heartbeat_s, self.token)
            return True
        return False

    def release(self) -> None:
        """Stop the heartbeat and remove the file, if this process still holds it."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.holder().get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        """Hold the lease for the body (it must be free or stale: raises `TimeoutError` otherwise)."""
        if not self.acquire():
            raise TimeoutError(f"{self.path} is held by {self.holder()}")
        try:
            yield self
        finally:
            self.release()


def build_once(
    done: Callable[[], bool],
    build: Callable[[], None],
    lock_path: str | os.PathLike,
    what: str,
    poll_s: float = 0.5,
    stale_after_s: float = STALE_AFTER_S,
) -> None:
    """Make sure `done()` is true: build it here (`build()`, holding a `Lease` at `lock_path`) unless
    another process already builds it, in which case wait for that one, and take over if it dies."""
    lease = Lease(lock_path, stale_after_s=stale_after_s)
    waited = False
    while not done():
        if lease.acquire():
            try:
                if not done():
                    build()
            finally:
                lease.release()
            return
        if not waited:
            owner = lease.holder()
            who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
            log.info(f"Waiting for {what}, which {who} builds.")
            waited = True
        time.sleep(poll_s)


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


def _say(line: str) -> None:
    """One line of the run's console output, through Lightning's rank-zero logger like the trainer's own
    lines (imported here: the leases above also serve code that never loads Lightning)."""
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(line)


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
        _say(
            f"{path.parent} is on a file system without flock ({err.strerror}); the run lock is a lease file "
            f"with a heartbeat instead."
        )
        yield from _leased(path, stale_after_s)
        return
    try:
        if previous:
            _say(
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
        _say(
            f"Taking over the stale run lock {path} of pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}, which no longer runs."
        )
    try:
        yield path
    finally:
        lease.release()
