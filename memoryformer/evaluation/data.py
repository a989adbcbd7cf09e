"""Offline task data: `DIR/<task>/<split>.{jsonl,json,parquet}` in the Hugging Face hub's schema.

lm-evaluation-harness normally downloads each task's dataset from the hub. Our task YAMLs (in
`memoryformer/evaluation/tasks/`, passed to lm-eval as an `include_path`) keep its prompts and metrics but
point `custom_dataset` at `load_local`, which reads the split lm-eval evaluates from a local directory.
The directory comes from lm-eval's task metadata key `data_dir` (evaluate.py sets it from
`eval.data_dir`; on lm-eval's own CLI pass `--metadata '{"data_dir": "DIR"}'`) or from the environment
variable `MEMORYFORMER_EVAL_DATA`. `scripts/download_eval_data.py` fills such a directory from the hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from memoryformer.errors import DataError  # the one DataError, also importable from here

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_DIR_ENV = "MEMORYFORMER_EVAL_DATA"
FORMATS = ("jsonl", "json", "parquet")

#: The split lm-eval scores for each task we ship offline (its `test_split`, else `validation_split`),
#: and the hub dataset the split comes from (`dataset_path`, `dataset_name` of lm-eval's own YAML).
EVAL_SPLITS: dict[str, str] = {
    "piqa": "validation",
    "winogrande": "validation",
    "wsc273": "test",
    "wsc": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "logiqa": "test",
}
#: lm-eval's own YAML for each offline task (relative to `lm_eval/tasks/`): where its hub dataset, split,
#: prompts and metrics come from. Our offline YAMLs must send the same requests (tests/test_eval_tasks.py).
UPSTREAM_TASK_YAML: dict[str, str] = {
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "wsc273": "wsc273/default.yaml",
    "wsc": "super_glue/wsc/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "logiqa": "logiqa/logiqa.yaml",
}
#: Offline tasks whose data this project makes itself (no hub dataset): task -> (split, how to make it).
GENERATED_SPLITS: dict[str, tuple[str, str]] = {
    "sample_heldout": ("validation", "python -m memoryformer.data.sample --export-eval {root}"),
}


def task_split(task: str) -> str | None:
    """The split lm-eval scores for an offline `task` (None for a task without an offline layout)."""
    if task in GENERATED_SPLITS:
        return GENERATED_SPLITS[task][0]
    return EVAL_SPLITS.get(task)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """`data_dir`, else `$MEMORYFORMER_EVAL_DATA`; raises `DataError` unless it is an existing directory."""
    raw = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV)
    if raw in (None, ""):
        raise DataError(
            "no local task data directory is set: pass eval.data_dir=DIR to evaluate.py (or "
            f'--metadata \'{{"data_dir": "DIR"}}\' to lm_eval, or set ${DATA_DIR_ENV}); fill DIR with '
            "scripts/download_eval_data.py."
        )
    path = Path(str(raw)).expanduser()
    if not path.is_dir():
        raise DataError(
            f"task data directory {path} does not exist; create it with "
            f"`python scripts/download_eval_data.py --out {path}` on a machine with internet."
        )
    return path


def split_file(data_dir: str | os.PathLike | None, task: str, split: str | None = None) -> Path:
    """The file holding `task`'s evaluated split under `data_dir` (first of .jsonl, .json, .parquet)."""
    root = resolve_data_dir(data_dir)
    split = split or task_split(task)
    if split is None:
        raise DataError(
            f"task {task!r} has no offline data layout; tasks with one are: "
            f"{', '.join([*EVAL_SPLITS, *GENERATED_SPLITS])}."
        )
    for fmt in FORMATS:
        candidate = root / task / f"{split}.{fmt}"
        if candidate.is_file():
            return candidate
    if task in GENERATED_SPLITS:
        make = GENERATED_SPLITS[task][1].format(root=root)
        raise DataError(f"task {task!r} needs {root / task / (split + '.jsonl')}; create it with `{make}`.")
    raise DataError(
        f"task {task!r} needs {root / task / (split + '.jsonl')} (or .json/.parquet) with the hub's fields; "
        f"fill {root} with `python scripts/download_eval_data.py --out {root} --tasks {task}`."
    )


def load_local(task: str | None = None, data_dir: str | None = None, **_metadata: Any):
    """`custom_dataset` hook of our task YAMLs: a `datasets.DatasetDict` {split: Dataset} read from disk.

    lm-eval calls it with the task's metadata (which carries `data_dir` when set) merged with its
    `dataset_kwargs` (which carry `task`); other metadata keys (version, model args) are ignored.
    """
    import datasets

    if task is None:
        raise DataError("a memoryformer task YAML lacks dataset_kwargs.task; reinstall the package.")
    split = task_split(task)
    path = split_file(data_dir, task, split)
    builder = "parquet" if path.suffix == ".parquet" else "json"
    # keep_in_memory: tiny eval splits need no Arrow cache files next to read-only data dirs.
    dataset = datasets.load_dataset(builder, data_files={split: str(path)}, keep_in_memory=True)
    if len(dataset[split]) == 0:
        raise DataError(f"{path} holds no rows; re-create it with scripts/download_eval_data.py.")
    return dataset
