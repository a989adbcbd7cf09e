"""Typed, validated configuration of `evaluate.py`: the one home of its options and their defaults
(`conf/evaluate.yaml` composes on them and adds only Hydra's settings).

`EvaluateConfig.from_mapping(cfg)` turns the resolved Hydra node into dataclasses and fails with one
sentence naming the key and the fix for anything that cannot work, before a model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memoryformer.config import DTYPES, ConfigError, check_choice, entry_point_options, reject_unknown_keys

#: The lm-eval tasks of the paper's six zero-shot columns (Tables 1, 2 and 6), in its column order.
PAPER_TASKS = ("piqa", "winogrande", "wsc", "arc_easy", "arc_challenge", "logiqa")

#: Named task sets for `eval.tasks`. "paper" is the six zero-shot tasks of the paper's Tables 1, 2 and 6 with
#: the paper's WSC: SuperGLUE WSC (lm-eval `wsc`, 104 validation items; every WSC value the paper prints is
#: k/104). "paper_superglue_wsc" is the same set under its older name. "paper_wsc273" swaps in lm-eval's
#: `wsc273` (273 Winograd schemas), which the report labels as such and never passes off as the paper's WSC.
TASK_SETS: dict[str, list[str]] = {
    "paper": list(PAPER_TASKS),
    "paper_superglue_wsc": list(PAPER_TASKS),
    "paper_wsc273": ["wsc273" if task == "wsc" else task for task in PAPER_TASKS],
    # Held-out perplexity on the bundled corpus (what `make train` reports); its data is written by
    # `python -m memoryformer.data.sample --export-eval DIR`, so it needs eval.data_dir=DIR.
    "sample": ["sample_heldout"],
}
METRICS = ("acc", "acc_norm")
BASELINES = ("hf",)


@dataclass
class EvalSettings:
    """The `eval` group: which tasks, which metric per task, and how to run lm-eval."""

    tasks: list[str] = field(default_factory=lambda: ["paper"])
    # task -> acc | acc_norm, "default" for the rest; a plain string sets the default
    metric: dict[str, str] = field(default_factory=lambda: {"default": "acc"})
    batch_size: int = 16
    device: str = "cpu"  # cpu | cuda | cuda:0 ...
    dtype: str = "float32"  # float32 | bfloat16 | float16
    limit: float | None = None  # None: all examples; N: the first N per task; 0 < f < 1: that fraction
    num_fewshot: int = 0  # the paper is zero-shot
    data_dir: str | None = None  # DIR/<task>/<split>.jsonl (hub schema) to run offline
    bootstrap_iters: int = 10000  # stderr bootstrap, as in the authors' eval_adapter.py; 0 skips it
    seed: int = 1234
    max_length: int | None = None  # context used for scoring; None: the model's block_size

    def __post_init__(self) -> None:
        self.tasks = expand_tasks(self.tasks)
        if isinstance(self.metric, str):
            self.metric = {"default": self.metric}
        self.metric = dict(self.metric)
        self.metric.setdefault("default", "acc")
        for task, metric in self.metric.items():
            if metric not in METRICS:
                raise ConfigError(f"eval.metric.{task}={metric!r} is not supported; choose acc or acc_norm.")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size={self.batch_size} must be a positive integer.")
        check_choice("eval.dtype", self.dtype, DTYPES)
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(
                f"eval.limit={self.limit} must be null (all examples), a count >= 1 or a fraction < 1."
            )
        if self.limit is not None and self.limit >= 1:
            self.limit = int(self.limit)
        if self.num_fewshot < 0:
            raise ConfigError(f"eval.num_fewshot={self.num_fewshot} must be >= 0 (the paper uses 0).")
        if self.bootstrap_iters < 0:
            raise ConfigError(f"eval.bootstrap_iters={self.bootstrap_iters} must be >= 0 (0 skips stderr).")

    def metric_for(self, task: str) -> str:
        """The metric chosen for `task` (its own entry, else `default`)."""
        return self.metric.get(task, self.metric["default"])


@dataclass
class EvaluateConfig:
    """Top level of evaluate.py's config: what to evaluate (our checkpoint or a Hugging Face baseline)."""

    checkpoint: str | None = None
    baseline: str | None = None  # null: our checkpoint; "hf": a Hugging Face model directory (Pythia)
    model_path: str | None = None
    tokenizer: str | None = None  # overrides the tokenizer stored with the checkpoint
    label: str | None = None  # row name in results.md and the report; default: the model's config name
    trust_checkpoint: bool = False  # unpickle the checkpoint fully (can run code): only for trusted files
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(
                f"baseline={self.baseline!r} is not supported; use baseline=null or baseline=hf."
            )
        if self.baseline is None:
            if not self.checkpoint:
                raise ConfigError(
                    "checkpoint is not set; run `python evaluate.py checkpoint=PATH` (an exported model dir, "
                    "a Lightning .ckpt or a DeepSpeed dir), or `baseline=hf model_path=DIR` for a Pythia "
                    "baseline."
                )
            if self.model_path:
                raise ConfigError(
                    "model_path is only read with baseline=hf; use checkpoint=PATH for our models."
                )
        elif not self.model_path:
            raise ConfigError("baseline=hf needs model_path=DIR, a local Hugging Face model directory.")
        elif self.checkpoint:
            raise ConfigError("set either checkpoint=PATH or baseline=hf model_path=DIR, not both.")

    @classmethod
    def from_mapping(cls, raw: Any) -> EvaluateConfig:
        """Build from a resolved Hydra/OmegaConf node or a plain dict; unknown keys are errors."""
        raw = entry_point_options(raw)
        eval_raw = dict(raw.pop("eval", None) or {})
        reject_unknown_keys("", raw, cls)
        reject_unknown_keys("eval.", eval_raw, EvalSettings)
        return cls(**raw, eval=EvalSettings(**eval_raw))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (written to run_info.json)."""
        return dataclasses.asdict(self)


def expand_tasks(tasks: Any) -> list[str]:
    """Task names from a list, a comma-separated string or named sets (`TASK_SETS`), without duplicates."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",")]
    names: list[str] = []
    for item in tasks or []:
        item = str(item).strip()
        for name in TASK_SETS.get(item, [item]):
            if name and name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"eval.tasks is empty; give task names or a named set ({', '.join(TASK_SETS)}).")
    return names

