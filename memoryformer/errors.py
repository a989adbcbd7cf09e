"""The project's exception classes, and one sentence on stderr with exit status 2 for every error a user
can fix (config, data, checkpoint, evaluation adapter argument, failed write).

The classes live here, with no import beyond the standard library, so that any module can raise them and
this module can name them all without importing torch or Lightning; each is also importable from the module
that raises it (`memoryformer.config.ConfigError`, `memoryformer.checkpoint.CheckpointError`, ...).

`train.py`, `evaluate.py` and `generate.py` wrap their `@hydra.main` function in `reports_user_errors` and
run their task inside `exit_on_user_error`. Hydra's own report of a bad command line is several lines (the
message, OmegaConf's `full_key:` block, the config search path, a hint about HYDRA_FULL_ERROR) and exits 1;
the wrapper asks Hydra to raise instead and turns composition errors, our own error types and a run folder
that cannot be created into one sentence. Anything else is a bug and keeps its full traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: Exit status of a run refused because of its inputs (argparse uses 2 for a bad command line too).
EXIT_USER_ERROR = 2


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and how to fix it."""


class RunLockError(ConfigError):
    """Another live run holds the output directory; the message names its pid, host and the fix
    (`memoryformer.file_lock`)."""


class DataError(ValueError):
    """Data that cannot be used: a training data file or record (`memoryformer.data`) or a local evaluation
    task directory (`memoryformer.evaluation.data`); the message names the file or path and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the path and how to fix it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling would need more than tensors and plain containers (possibly code)."""


class AtomicWriteError(OSError):
    """A write that failed and left the previous file in place; the message names the directory and fix
    (`memoryformer.atomic_io`)."""


class AdapterError(ValueError):
    """A bad argument to the `memoryformer` lm-eval model; the message names it and the fix
    (`memoryformer.evaluation.lm_adapter`)."""


class NonFiniteLossError(RuntimeError):
    """Raised when the loss or the gradient norm is NaN/inf; no checkpoint is written for that step.

    Not a user error: the run diverged, and its traceback shows where (`memoryformer.training.module`).
    """


#: Our exception classes whose message is already one sentence naming the value and the fix (subclasses
#: such as `RunLockError` and `UnsafeCheckpointError` included).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    AtomicWriteError,
    AdapterError,
)


def first_line(err: BaseException, default: str | None = None) -> str:
    """The first line of `err`'s message; `default` (None: the exception's type name) when it is empty."""
    text = str(err).strip()
    if not text:
        return type(err).__name__ if default is None else default
    return text.splitlines()[0]


def one_line(err: BaseException) -> str:
    """The sentence of `err`, without the 'Caught X in DataLoader worker process N' wrapper.

    A DataLoader worker re-raises the worker's error in the main process with the worker's whole
    traceback in the message; the original sentence is its last line.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip())
    return " ".join(text.split())


#: keys the config schema no longer has -> the sentence that names their replacement
REMOVED_KEYS = {
    "optim.decay_tables": "optim.decay_tables was removed; set optim.table_weight_decay=0 to train the "
    "Memory Layer tables without weight decay (null, the default, decays them with optim.weight_decay).",
}


def _removed_key_sentence(err: BaseException) -> str | None:
    """The `REMOVED_KEYS` sentence when `err` (or its cause) is about a removed key, else None."""
    for e in (err, err.__cause__):
        key = getattr(e, "full_key", None) if e is not None else None
        if key in REMOVED_KEYS:
            return REMOVED_KEYS[key]
    return None


def hydra_error_sentence(err: BaseException) -> str:
    """One sentence for a Hydra / OmegaConf composition error (unknown key, group option or bad value)."""
    removed = _removed_key_sentence(err)
    if removed:
        return removed
    from hydra.errors import OverrideParseException

    key, is_assignment, value = getattr(err, "override", "").partition("=")
    if isinstance(err, OverrideParseException) and is_assignment:
        # Hydra's grammar reads ( [ { , : and quotes in a value; quoting the value makes it a plain string.
        quoted = f'{key}="\\"{value}\\""' if "'" in value else f"{key}=\"'{value}'\""
        return f"Hydra cannot parse the value of {key}={value}; quote it, e.g. {quoted}."
    options = getattr(err, "options", None)
    missing = getattr(err, "missing_cfg_file", None)
    if options and missing and "/" in missing:
        group, name = missing.rsplit("/", 1)
        return (
            f"{group}={name} is not an option of the config group {group!r}; "
            f"choose one of: {', '.join(options)}."
        )
    head = first_line(err).rstrip(".")
    cause = err.__cause__
    detail = f" ({first_line(cause)})" if cause is not None and str(cause).strip() else ""
    return (
        f"{head}{detail}; check the key's spelling and value against `python {_script()} --cfg job` "
        f"(add a new key with +key=value)."
    )


def _script() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train.py"


def _raised_in(err: BaseException, code: Any) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def sentence_for(err: BaseException, task_code: Any = None) -> str | None:
    """The one-sentence report of `err`, or None when it is not a user error (a bug: keep the traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, USER_ERRORS):
        return one_line(err)
    if isinstance(err, HydraException | OmegaConfBaseException):
        return hydra_error_sentence(err)
    if isinstance(err, OSError) and err.filename and not (task_code and _raised_in(err, task_code)):
        # raised by Hydra before the run started: it could not create the run folder or its log file
        return (
            f"cannot create or write {err.filename} ({err.strerror}); set hydra.run.dir "
            f"(or hydra.sweep.dir for -m) to a writable folder."
        )
    return None


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Inside the Hydra task: our error types -> 'error: <sentence>' on stderr and exit status 2.

    Caught here rather than only in `reports_user_errors` because Hydra logs an extra
    'Error executing job with overrides' line for any exception that leaves the task.
    """
    try:
        yield
    except USER_ERRORS as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def reports_user_errors(main: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a `@hydra.main` function: user errors -> 'error: <sentence>' on stderr and exit status 2."""
    task = getattr(main, "__wrapped__", main)
    task_code = getattr(task, "__code__", None)

    @functools.wraps(main)
    def wrapper() -> Any:
        # Hydra prints several lines and exits 1 unless HYDRA_FULL_ERROR is set; then it raises, and we
        # report user errors ourselves (a user who sets it still sees our sentence for those).
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
        try:
            return main()
        except Exception as err:
            message = sentence_for(err, task_code)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
