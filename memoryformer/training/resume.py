"""Which checkpoint a run resumes from (`ckpt_path=`), and whether it fits the model being trained.

`ckpt_path=last` and `ckpt_path=auto` search the current run folder and every run under `paths.runs_root`
for `*.ckpt` checkpoints (`last.ckpt`, `step-*.ckpt`, DeepSpeed checkpoint directories), newest first by
modification time, and pick the first one that loads: a torn, truncated or unreadable file, a checkpoint of
another model shape, or one that needs `trust_checkpoint=true`, is skipped with one logged line saying why.
`last` that finds nothing warns in one line; `auto` then starts fresh silently. An explicit path must load
and fit, or the run stops before training with one sentence (`ConfigError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from memoryformer.checkpoint import (
    CheckpointError,
    check_deepspeed_dir,
    safe_torch_load,
    weights_mismatch,
)
from memoryformer.config import ConfigError, ModelConfig

SEARCH_VALUES = ("last", "auto")
LIGHTNING_PREFIX = "model."


@dataclass
class Candidate:
    """A checkpoint found by the search: its path and modification time (newest is tried first)."""

    path: Path
    mtime: float


def find_checkpoints(roots: list[str | os.PathLike]) -> list[Candidate]:
    """Every `*.ckpt` file or DeepSpeed `*.ckpt` directory under `roots`, newest first, each listed once.

    Temporary files of interrupted saves (`.tmp-*`) never end in `.ckpt` and are not listed.
    """
    seen: dict[Path, Candidate] = {}
    for root in roots:
        base = Path(root)
        if not base.is_dir():
            continue
        for p in base.rglob("*.ckpt"):
            if any(part.startswith(".tmp-") for part in p.parts):
                continue
            if p.is_dir() and any(parent.suffix == ".ckpt" for parent in p.parents):
                continue
            real = p.resolve()
            if real not in seen:
                try:
                    seen[real] = Candidate(p, p.stat().st_mtime)
                except OSError:  # removed while we looked (top-k pruning of a live run)
                    continue
    return sorted(seen.values(), key=lambda c: c.mtime, reverse=True)


def check_checkpoint(path: str | os.PathLike, model: ModelConfig, trust_checkpoint: bool = False) -> None:
    """Raise `CheckpointError` (one sentence) unless `path` loads and its weights fit `model`.

    A `.ckpt` file is memory-mapped, so the check reads little more than its index; a DeepSpeed directory
    is checked for its `latest` tag and code-free files (its weights are checked by DeepSpeed at load).
    """
    p = Path(path)
    if p.is_dir():
        tag_file = p / "latest"
        if not tag_file.is_file():
            raise CheckpointError(f"{p} is a directory without a DeepSpeed 'latest' file; pass a checkpoint.")
        tag = tag_file.read_text().strip()
        if not (p / tag).is_dir():
            raise CheckpointError(
                f"{p}/latest names tag {tag!r}, which has no folder there; the checkpoint is incomplete."
            )
        if not trust_checkpoint:
            check_deepspeed_dir(p)
        return
    ckpt = safe_torch_load(p, "cpu", trust_checkpoint=trust_checkpoint, mmap=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"{p} has no 'state_dict' and 'global_step'; it is not a training checkpoint.")
    state = {
        k[len(LIGHTNING_PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(LIGHTNING_PREFIX)
    }
    problem = weights_mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"{p} does not fit this run's model{_config_diff(ckpt, model)}: {problem}; resume with the "
            f"model and tokenizer (model.vocab_size) it was trained with, or start a fresh run."
        )


def _config_diff(ckpt: dict[str, Any], model: ModelConfig) -> str:
    stored = (ckpt.get("hyper_parameters") or {}).get("model")
    if not isinstance(stored, dict):
        return ""
    ours = model.to_dict()
    keys = [k for k in ours if k in stored and stored[k] != ours[k] and k != "name"]
    if not keys:
        return ""
    return " (" + ", ".join(f"model.{k}={stored[k]!r} there vs {ours[k]!r} here" for k in keys[:4]) + ")"


def resolve_ckpt_path(
    ckpt_path: str | None,
    runs_root: str | os.PathLike,
    current_dir: str | os.PathLike | None,
    model: ModelConfig,
    trust_checkpoint: bool = False,
) -> str | None:
    """The checkpoint to resume from (None: start fresh); see the module docstring for the rules.

    Raises `ConfigError` when an explicit `ckpt_path` does not exist, does not load or does not fit `model`.
    """
    if ckpt_path is None:
        return None
    if ckpt_path not in SEARCH_VALUES:
        if not os.path.exists(ckpt_path):
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} does not exist; give a .ckpt file, ckpt_path=last, ckpt_path=auto "
                f"or leave it null."
            )
        try:
            check_checkpoint(ckpt_path, model, trust_checkpoint)
        except CheckpointError as err:
            raise ConfigError(f"ckpt_path: {err}") from err
        return str(ckpt_path)
    roots = [r for r in (current_dir, runs_root) if r is not None]
    for cand in find_checkpoints(roots):
        try:
            check_checkpoint(cand.path, model, trust_checkpoint)
        except CheckpointError as err:
            rank_zero_info(f"ckpt_path={ckpt_path}: skipping {cand.path}: {err}")
            continue
        return str(cand.path)
    if ckpt_path == "last":
        where = " and ".join(str(r) for r in roots)
        rank_zero_warn(
            f"ckpt_path=last found no loadable checkpoint under {where}; starting from scratch "
            f"(use ckpt_path=auto to make that silent)."
        )
    return None
