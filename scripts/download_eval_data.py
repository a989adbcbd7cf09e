"""Fill an offline task-data directory from the Hugging Face hub (run it on a machine with internet).

    python scripts/download_eval_data.py --out /data/lm_eval   # paper tasks + SuperGLUE wsc
    python scripts/download_eval_data.py --out /data/lm_eval --tasks piqa,arc_easy

For each task it reads lm-eval's own task YAML to find the hub dataset (`dataset_path`, `dataset_name`) and
the split lm-eval scores, downloads that split and writes `OUT/<task>/<split>.jsonl` with the hub's fields.
Copy OUT to the cluster and evaluate with `python evaluate.py checkpoint=PATH eval.data_dir=OUT`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lm_eval.tasks
from lm_eval.tasks._yaml_loader import load_yaml

from memoryformer.evaluation.config import TASK_SETS
from memoryformer.evaluation.data import EVAL_SPLITS, UPSTREAM_TASK_YAML


def download(task: str, out: Path) -> Path:
    """Download the split lm-eval scores for `task` and write it as JSON Lines; returns the file."""
    import datasets

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / UPSTREAM_TASK_YAML[task], resolve_func=False)
    split = cfg.get("test_split") or cfg.get("validation_split")
    if split != EVAL_SPLITS[task]:
        raise SystemExit(
            f"error: lm-eval now scores {task} on split {split!r}, but memoryformer expects "
            f"{EVAL_SPLITS[task]!r}; update EVAL_SPLITS in memoryformer/evaluation/data.py and "
            f"tasks/{task}.yaml."
        )
    ds = datasets.load_dataset(cfg["dataset_path"], cfg.get("dataset_name"), split=split)
    path = out / task / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_json(str(path), lines=True, force_ascii=False)
    print(f"{task}: {len(ds)} rows from {cfg['dataset_path']}/{cfg.get('dataset_name')} [{split}] -> {path}")
    return path


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="directory to fill (DIR/<task>/<split>.jsonl)"
    )
    parser.add_argument("--tasks", default="paper,wsc", help="comma-separated tasks or named sets")
    args = parser.parse_args()
    names: list[str] = []
    for item in args.tasks.split(","):
        for t in TASK_SETS.get(item.strip(), [item.strip()]):
            if t not in UPSTREAM_TASK_YAML:
                raise SystemExit(
                    f"error: no offline layout for task {t!r}; choose from {', '.join(UPSTREAM_TASK_YAML)}."
                )
            if t not in names:
                names.append(t)
    for t in names:
        download(t, args.out)


if __name__ == "__main__":
    main()
