"""Crash-consistent writes: a reader sees the old file (or directory) or the new one, never half of one.

Every write goes to a temporary name in the destination's own directory (so the final `os.replace` is a
rename within one file system, which POSIX makes atomic), is flushed to the disk with `fsync`, and is then
renamed over the destination; the directory is fsynced too so that the rename itself survives a power
loss. A write that fails (a full disk, a quota, an I/O error) removes its temporary file and leaves the
previous destination untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from memoryformer.errors import AtomicWriteError  # the one AtomicWriteError, also importable from here

#: Prefix of temporary files and directories; they never end in `.ckpt`, so checkpoint searches skip them.
TMP_PREFIX = ".tmp-"
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(directory: Path) -> None:
    # the rename is durable only once the directory entry is on disk; some file systems refuse O_RDONLY dirs
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _explain(err: OSError, target: Path) -> AtomicWriteError:
    where = target.parent
    if err.errno in _SPACE_ERRNOS:
        msg = (
            f"the disk holding {where} ran out of space while writing {target.name} (the previous file there "
            f"is intact); free space there or point paths.output_dir at a larger disk, then resume with "
            f"ckpt_path=last."
        )
    else:
        msg = (
            f"writing {target} failed ({err.strerror or err}; the previous file there is intact); check that "
            f"{where} is writable and healthy, then resume with ckpt_path=last."
        )
    out = AtomicWriteError(msg)  # one argument: str(out) is the sentence itself, without "[Errno 28]"
    out.errno = err.errno
    return out


def _discard(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(binary file)` on a temporary file beside `path`, fsync it and rename it onto `path`.

    Raises `AtomicWriteError` (one sentence naming the directory and the fix) on an `OSError`; the
    temporary file is removed and an existing `path` keeps its old content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as err:
        _discard(tmp)
        raise _explain(err, target) from err
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def replace_directory(staged: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move the complete directory `staged` onto `path` (same file system), replacing what was there.

    rename(2) cannot replace a non-empty directory, so an existing `path` first steps aside under a `.tmp-`
    name and is removed after the swap: a crash in between leaves either the old directory or the new one
    at `path` (or, between the two renames, neither: both are then whole under `.tmp-` names, which
    checkpoint searches skip), never a mix of the two. Raises `OSError`; the caller owns `staged` on error.
    """
    staged, target = Path(staged), Path(path)
    _fsync_tree(staged)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staged, target)
    _fsync_dir(target.parent)
    if old is not None:
        _discard(old)
    return target


def remove_directory(path: str | os.PathLike) -> None:
    """Remove directory `path` so that no reader ever sees part of it: it is renamed to a `.tmp-` name
    first (one atomic step), then deleted."""
    target = Path(path)
    if not target.exists():
        return
    doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.removed.", dir=target.parent))
    os.replace(target, doomed / target.name)
    _discard(doomed)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it is fsynced and renamed onto `path`
    (`replace_directory`). On an error the temporary directory is removed and `path` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        replace_directory(tmp, target)
    except OSError as err:
        _discard(tmp)
        raise _explain(err, target) from err
    except BaseException:
        _discard(tmp)
        raise
