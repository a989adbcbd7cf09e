"""One sentence on stderr and exit status 2 for every error a user can fix (config, data, checkpoint).

`train.py` and `evaluate.py` wrap their `@hydra.main` function in `reports_user_errors` (train.py also
runs its task inside `exit_on_user_error`). Hydra's own report of a bad command line is several lines (the
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


class DataError(ValueError):
    """Data that cannot be used: a training data file or record (`memoryformer.data`) or a local evaluation
    task directory (`memoryformer.evaluation.data`); the message names the file or path and the fix."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Our exception classes whose message is already one sentence naming the value and the fix."""
    from memoryformer.atomic_io import AtomicWriteError
    from memoryformer.checkpoint import CheckpointError
    from memoryformer.config import ConfigError

    return (ConfigError, DataError, CheckpointError, AtomicWriteError)


def one_line(err: BaseException) -> str:
    """The sentence of `err`, without the 'Caught X in DataLoader worker process N' wrapper.

    A DataLoader worker re-raises the worker's error in the main process with the worker's whole
    traceback in the message; the original sentence is its last line.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1].strip())
    return " ".join(text.split())


def hydra_error_sentence(err: BaseException) -> str:
    """One sentence for a Hydra / OmegaConf composition error (unknown key, group option or bad value)."""
    options = getattr(err, "options", None)
    missing = getattr(err, "missing_cfg_file", None)
    if options and missing and "/" in missing:
        group, name = missing.rsplit("/", 1)
        return (
            f"{group}={name} is not an option of the config group {group!r}; "
            f"choose one of: {', '.join(options)}."
        )
    head = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    cause = err.__cause__
    detail = f" ({str(cause).strip().splitlines()[0]})" if cause is not None and str(cause).strip() else ""
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

    if isinstance(err, user_error_types()):
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
    except user_error_types() as err:
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
