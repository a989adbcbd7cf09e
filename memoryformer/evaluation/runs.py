"""Find finished runs on disk and read what the paper's tables need from them.

Two kinds of run directory:
- a training run (train.py's Hydra folder): `checkpoints/config.yaml` is the resolved config saved at start
  (its `name` and swept values place the run in a table) and `csv/metrics.csv` is the CSV logger's output,
  whose last `val/ppl` (else exp of `val/loss`) is the run's validation perplexity (Tables 3-5);
- an evaluation run (evaluate.py's folder): `results.json` + `run_info.json`, zero-shot accuracy (Tables 1,
  2, 6). It is tied to the training run whose checkpoint it evaluated: run_info's `checkpoint` path is walked
  up to the folder holding `checkpoints/config.yaml`.

A directory that is neither is searched below (a multirun folder, `outputs/`), so one path can stand for a
whole sweep.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG = Path("checkpoints") / "config.yaml"
METRICS = Path("csv") / "metrics.csv"
EVAL_FILES = ("results.json", "run_info.json")


@dataclass
class TrainRun:
    """A training run: its folder, saved config (plain dict) and last validation perplexity."""

    path: Path
    config: dict[str, Any]
    val_ppl: float | None = None
    val_step: int | None = None

    @property
    def name(self) -> str:
        """train.py's run name (`name`), which every experiment file sets to its own name."""
        return str(self.config.get("name", ""))

    @property
    def short_path(self) -> str:
        """The folder's last three parts, which identify the run (outputs/<name>/<time>, or
        <name>/<time>/<job> of multirun/)."""
        return "/".join(self.path.resolve().parts[-3:])

    def fills(self, spec: dict[str, Any], experiments: list[str] | None = None) -> bool:
        """True when this run belongs to the paper row `spec`: its name is one of the row's `experiments`
        (else `experiments`, the table's) and its saved config has every value of the row's `match`."""
        if self.name not in (spec.get("experiments") or experiments or []):
            return False
        return matches(spec, self.config)


@dataclass
class EvalRun:
    """An evaluate.py output folder, with the training run it evaluated when that can be found."""

    path: Path
    results: dict[str, Any]
    info: dict[str, Any]
    train: TrainRun | None = None


@dataclass
class Runs:
    """Every run found under the paths given to the report."""

    train: list[TrainRun] = field(default_factory=list)
    evals: list[EvalRun] = field(default_factory=list)


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """`config["model"]["code_length"]` for "model.code_length"; a model key missing from an older saved
    config takes `ModelConfig`'s default (e.g. memory_block_activation "none")."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _default(dotted)
        node = node[part]
    return node


def _default(dotted: str) -> Any:
    from memoryformer.config import ModelConfig
    from memoryformer.training.optim import OptimConfig

    group, _, key = dotted.partition(".")
    cls = {"model": ModelConfig, "optim": OptimConfig}.get(group)
    fields = getattr(cls, "__dataclass_fields__", {}) if cls else {}
    return fields[key].default if key in fields else None


def same_value(a: Any, b: Any) -> bool:
    """Config values equal, numbers compared with a relative tolerance (1e-3 vs 0.001 from YAML)."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


def matches(spec: dict[str, Any], config: dict[str, Any], prefix: str = "") -> bool:
    """True when `config` has every value of the paper row `spec`'s `match` whose key starts with `prefix`."""
    return all(
        same_value(config_value(config, k), v)
        for k, v in (spec.get("match") or {}).items()
        if k.startswith(prefix)
    )


def last_val_ppl(metrics_csv: Path) -> tuple[float | None, int | None]:
    """(perplexity, step) of the last validation row of a Lightning CSVLogger `metrics.csv`.

    Uses `val/ppl` when logged, else exp(`val/loss`), and the optimizer step `val/at_step` (else the logger's
    `step`); (None, None) when the run never validated.
    """
    if not metrics_csv.exists():
        return None, None
    ppl, step = None, None
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            value = row.get("val/ppl") or ""
            if not value and row.get("val/loss"):
                value = str(math.exp(min(float(row["val/loss"]), 50.0)))
            if value:
                ppl = float(value)
                at = row.get("val/at_step") or row.get("step")
                step = int(float(at)) if at else step
    return ppl, step


def load_train_run(path: Path) -> TrainRun:
    """Read one training run folder (it must hold `checkpoints/config.yaml`)."""
    config = yaml.safe_load((path / CONFIG).read_text()) or {}
    ppl, step = last_val_ppl(path / METRICS)
    return TrainRun(path=path, config=config, val_ppl=ppl, val_step=step)


def train_dir_of(checkpoint: str | None) -> Path | None:
    """The training run folder above an evaluated checkpoint (`<run>/checkpoints/x.ckpt`, `<run>/model`)."""
    if not checkpoint:
        return None
    p = Path(checkpoint)
    for candidate in [p, *list(p.parents)[:4]]:
        if (candidate / CONFIG).is_file():
            return candidate
    return None


def is_train_dir(path: Path) -> bool:
    """True for a folder with `checkpoints/config.yaml`."""
    return (path / CONFIG).is_file()


def is_eval_dir(path: Path) -> bool:
    """True for a folder with evaluate.py's `results.json` and `run_info.json`."""
    return all((path / f).is_file() for f in EVAL_FILES)


def find_runs(paths: list[str | Path]) -> Runs:
    """Every training and evaluation run at or below `paths`; evaluation runs linked to their training run."""
    train: dict[Path, TrainRun] = {}
    eval_dirs: list[Path] = []
    for root in map(Path, paths):
        if not root.exists():
            raise SystemExit(f"error: {root} does not exist; give training or evaluate.py run directories.")
        found = (
            [root]
            if is_train_dir(root) or is_eval_dir(root)
            else sorted(
                {p.parent.parent for p in root.rglob(str(CONFIG))}
                | {p.parent for p in root.rglob(EVAL_FILES[1])}
            )
        )
        if not found:
            raise SystemExit(
                f"error: {root} holds no run: expected checkpoints/config.yaml (train.py) or results.json "
                f"and run_info.json (evaluate.py) in it or below it."
            )
        for d in found:
            if is_train_dir(d):
                train.setdefault(d.resolve(), load_train_run(d))
            if is_eval_dir(d):
                eval_dirs.append(d)
    runs = Runs(train=list(train.values()))
    for d in eval_dirs:
        info = json.loads((d / "run_info.json").read_text())
        run = EvalRun(path=d, results=json.loads((d / "results.json").read_text()), info=info)
        tdir = train_dir_of(info.get("checkpoint"))
        if tdir is not None:
            run.train = train.get(tdir.resolve()) or load_train_run(tdir)
        runs.evals.append(run)
    return runs
