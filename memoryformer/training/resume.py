"""Resuming a run: only from a checkpoint that the same run saved (docs/resume.md).

## The checkpoint search

`ckpt_path=last` and `ckpt_path=auto` search this run's folder first, then every run under `paths.runs_root`
(one folder or a list of folders), for `*.ckpt` checkpoints (`last.ckpt`, `step-*.ckpt`, DeepSpeed checkpoint
directories; never the `.tmp-*` of a save in progress). A candidate matches when it loads, is whole (every
rank's files of a DeepSpeed directory), fits the model and carries this run's fingerprint
(below: the settings that define what is trained); of the matches in the run's
own folder, else of those elsewhere, the one with the highest stored optimizer step is taken. A torn or
unreadable file, another model shape, or one that needs `trust_checkpoint=true` is skipped with one line; a
run with other settings is skipped with one line per run folder naming the differing keys with both values.
Inside a multirun the other jobs' folders of the same sweep are never taken. When nothing matches, `last`
warns naming what it skipped and `auto` logs one line; both start fresh.

An explicit path must load, fit and carry this run's fingerprint, or the run stops before training with one
sentence (`ConfigError`); `resume_mismatch=allow` resumes a checkpoint of other settings anyway. A DeepSpeed
ZeRO directory saved by another number of data-parallel ranks is refused (DeepSpeed cannot re-partition its
optimizer state on load). `RunFingerprint` is the callback that writes the fingerprint into each
checkpoint, and `RunCheckpoint` the one that writes the checkpoints themselves (`last.ckpt`, `step-*.ckpt`).

## The fingerprint

A run's fingerprint: the settings that define what it trains, stored in every checkpoint it writes.

Two runs with equal fingerprints train the same model on the same data in the same order with the same
optimizer, global batch, seed and lr schedule, so one may continue the other's checkpoint. The fingerprint is
the whole composed config minus `NOT_COUNTED` (settings that may change across a resume without changing the
math), plus two derived values that stand for the step budget:

- `schedule_horizon`: the steps over which the lr decays, `optim.decay_steps`, or the run's step budget
  (`trainer.max_steps`, or `max_tokens` / tokens per step) while `optim.decay_steps` is null. A longer
  `trainer.max_steps` with the same horizon extends a run; with a null `optim.decay_steps` it is another
  schedule, hence another run.
- `data.num_samples` for GPT-NeoX index mappings (`data.source=sample|indexed`): when null, the mapping is
  built for `trainer.max_steps x global_batch_size` samples (`LMDataModule`), and the number of epochs it
  holds, hence the sample order, can change with it; the effective number is counted.

`data.num_workers` counts only for streaming sources, where it decides each worker's document shard.
A key missing on one side is shown as `<unset>`; an unknown key (a new Lightning argument, say) counts until
it is added to `NOT_COUNTED`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from memoryformer.atomic_io import TMP_PREFIX, replace_directory
from memoryformer.checkpoint import (
    CheckpointError,
    check_deepspeed_dir,
    deepspeed_layout,
    safe_torch_load,
    weights_mismatch,
)
from memoryformer.config import ConfigError, ModelConfig
from memoryformer.file_lock import build_once
from memoryformer.training.optim import decay_steps_for

if TYPE_CHECKING:
    from memoryformer.conf_schema import TrainConfig

#: Key under which a Lightning checkpoint (and a DeepSpeed directory's client state) holds the fingerprint.
CHECKPOINT_KEY = "run_fingerprint"
FORMAT_VERSION = 1
UNSET = "<unset>"
HORIZON = "schedule_horizon"
NUM_SAMPLES = "data.num_samples"

#: Settings that may change across a resume without changing what is trained (dotted keys; a key covers all
#: keys below it). Adding one is one line here, with the reason in the comment of its group.
NOT_COUNTED = (
    # where the run writes, how it is named, and what it prints or exports
    "name",
    "paths",
    "logger",
    "callbacks",
    "print_config",
    "export_final",
    "validate_only",
    "dry_run",
    "peak_tflops_per_device",
    "bucket_stats_every_n_steps",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "trainer.profiler",
    # validation and checkpoint cadence
    "val_every_n_steps",
    "validate_at_start",
    "ckpt_every_n_steps",
    "keep_last_k",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.enable_checkpointing",
    "data.val_samples",
    "data.val_paths",
    "data.val_files",
    "data.hf_val_split",
    # how to resume
    "ckpt_path",
    "trust_checkpoint",
    "resume_mismatch",
    # how a step is computed: devices, nodes, micro-batch and accumulation at the same global batch, memory
    # savers, kernels and precision (rounding, not the objective; runs move between GPU generations)
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.plugins",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "trainer.deterministic",
    "trainer.benchmark",
    "trainer.max_epochs",
    "micro_batch_size",
    "device_memory_gb",
    "compile",
    "activation_checkpointing",
    "activation_checkpointing_every",
    "optim.fused",
    "data.cache_dir",
    "model.memory_impl",  # which kernel computes the Memory Layer lookups (the same sums)
    "model.name",  # a preset's label; its fields are counted one by one
    # the step budget: counted through `schedule_horizon` (and the effective `data.num_samples`) instead
    "trainer.max_steps",
    "max_tokens",
    "optim.decay_steps",
)

STREAM_SOURCES = ("files", "hf")
INDEX_MAPPED_SOURCES = ("sample", "indexed")


def is_counted(key: str) -> bool:
    """Whether the dotted config key `key` is part of the fingerprint (not covered by `NOT_COUNTED`)."""
    return not any(key == skip or key.startswith(skip + ".") for skip in NOT_COUNTED)


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = list(node) if isinstance(node, tuple) else node


def run_fingerprint(run: TrainConfig, max_steps: int) -> dict[str, Any]:
    """The settings that define `run` whose step budget is `max_steps` (the derived one, from
    `trainer.max_steps` or `max_tokens`): a flat `{dotted key: value}` dict of plain values."""
    settings: dict[str, Any] = {}
    _flatten(dataclasses.asdict(run), "", settings)
    settings = {k: v for k, v in settings.items() if is_counted(k)}
    settings[HORIZON] = decay_steps_for(run.optim, max_steps)
    if run.data.source not in STREAM_SOURCES:
        settings.pop("data.num_workers", None)
    mapped = run.data.source in INDEX_MAPPED_SOURCES and run.data.index_mapping == "gpt_neox"
    if mapped and run.data.num_samples is None:
        settings[NUM_SAMPLES] = int(max_steps) * run.global_batch_size
    return settings


def zero_stage(strategy: Any) -> int | None:
    """The DeepSpeed ZeRO stage of `trainer.strategy` (a mapping with `name: deepspeed`, or a Lightning
    name such as `deepspeed_stage_3`), or None for any other strategy."""
    if isinstance(strategy, dict) and "deepspeed" in str(strategy.get("name", "")):
        return int(((strategy.get("config") or {}).get("zero_optimization") or {}).get("stage", 0))
    if isinstance(strategy, str) and strategy.startswith("deepspeed"):
        digits = [c for c in strategy if c.isdigit()]
        return int(digits[0]) if digits else 2  # Lightning's "deepspeed" is stage 2
    return None


def fingerprint_record(
    run: TrainConfig, max_steps: int, world_size: int, accumulate: int | None = None
) -> dict[str, Any]:
    """What a checkpoint stores: the fingerprint (`settings`) and, for the log and for what a resume must
    adapt, the step budget, the number of processes, the micro-batches per optimizer step (`accumulate`),
    the precision and the DeepSpeed ZeRO stage (None without DeepSpeed) it was saved with (`context`, never
    compared as settings)."""
    return {
        "version": FORMAT_VERSION,
        "settings": run_fingerprint(run, max_steps),
        "context": {
            "max_steps": int(max_steps),
            "world_size": int(world_size),
            "accumulate": None if accumulate is None else int(accumulate),
            "precision": str(run.trainer.get("precision")),
            "zero_stage": zero_stage(run.trainer.get("strategy")),
        },
    }


def differences(there: dict[str, Any], here: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(key, value there, value here)` for every key whose values differ, in a stable order (the schedule
    horizon first, then alphabetical); a key present on one side only shows `UNSET` on the other."""
    keys = sorted(set(there) | set(here), key=lambda k: (k != HORIZON, k))
    found = []
    for k in keys:
        a, b = there.get(k, UNSET), here.get(k, UNSET)
        if a != b:
            found.append((k, a, b))
    return found


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value) if isinstance(value, list) else str(value)


def describe(diffs: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """`optim.lr=0.001 there, 0.003 here; seed=1234 there, 7 here` (at most `limit` keys, then a count).

    When the step budget differs, a note says what the derived keys are; when only the step budget differs,
    it also says which keys extend the other run (pinning its horizon and, for index-mapped data, its
    number of mapped samples).
    """
    parts = [f"{k}={_show(a)} there, {_show(b)} here" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    text = "; ".join(parts)
    budget = {k: a for k, a, _ in diffs if k in (HORIZON, NUM_SAMPLES)}
    if not budget:
        return text
    note = f"{HORIZON} is optim.decay_steps, or the step budget while that is null"
    if NUM_SAMPLES in budget:
        note += f"; a null {NUM_SAMPLES} maps trainer.max_steps x global_batch_size samples"
    if len(budget) == len(diffs):  # only the step budget differs: the other run can be extended
        pins = " ".join(f"{'optim.decay_steps' if k == HORIZON else k}={v}" for k, v in budget.items())
        note += f"; to extend that run, pass {pins}"
    return f"{text} ({note})"


SEARCH_VALUES = ("last", "auto")
MISMATCH_CHOICES = ("refuse", "allow")  # resume_mismatch
LIGHTNING_PREFIX = "model."


class RunFingerprint(L.Callback):
    """Writes this run's fingerprint record (`fingerprint_record`) into every checkpoint it saves.

    For a DeepSpeed strategy Lightning passes the checkpoint dict on as DeepSpeed's client state, so the
    record lands in the directory's `mp_rank_00_model_states.pt`.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.record


@dataclass
class Candidate:
    """A checkpoint found by the search: its path and modification time (the order the search logs in)."""

    path: Path
    mtime: float


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself: its optimizer step, its fingerprint record (None when it has
    none) and, for a DeepSpeed directory, its ZeRO stage and the number of data-parallel ranks its state is
    split over (both None for a Lightning `.ckpt` file)."""

    step: int | None = None
    record: dict[str, Any] | None = None
    zero_world_size: int | None = None
    zero_stage: int | None = None
    universal: bool = False


def _is_under(path: Path, folder: str | os.PathLike | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(Path(folder).resolve())


def find_checkpoints(
    roots: list[str | os.PathLike], first: str | os.PathLike | None = None
) -> list[Candidate]:
    """Every `*.ckpt` file or DeepSpeed `*.ckpt` directory under `roots`, each listed once: those under
    `first` (the run's own folder) first, then the others, each group newest first.

    Temporary files and directories of saves in progress or interrupted (`.tmp-*`) are not listed.
    """
    seen: dict[Path, Candidate] = {}
    for root in roots:
        for p in _walk_checkpoints(Path(root)):
            real = p.resolve()
            if real not in seen:
                try:
                    seen[real] = Candidate(p, p.stat().st_mtime)
                except OSError:  # removed while we looked (top-k pruning of a live run)
                    continue
    return sorted(seen.values(), key=lambda c: (not _is_under(c.path, first), -c.mtime))


def _walk_checkpoints(root: Path) -> Iterator[Path]:
    """Every `*.ckpt` file or folder under `root`, without entering a checkpoint folder, a `.tmp-*` folder
    (a save or conversion in progress, which another rank may delete while we look) or a universal copy."""
    for folder, dirs, files in os.walk(root, onerror=lambda err: None):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX) and ".universal-step" not in d]
        for name in [*dirs, *files]:
            if name.endswith(".ckpt") and not name.startswith(TMP_PREFIX):
                yield here / name
        dirs[:] = [d for d in dirs if not d.endswith(".ckpt")]


def check_checkpoint(
    path: str | os.PathLike, model: ModelConfig, trust_checkpoint: bool = False
) -> CheckpointInfo:
    """What `path` says about itself; raises `CheckpointError` (one sentence) unless it loads and its
    weights fit `model`.

    A `.ckpt` file is memory-mapped, so the check reads little more than its index; a DeepSpeed directory
    is checked for its `latest` tag, every rank's files and code-free files (its weights are checked by
    DeepSpeed at load).
    """
    p = Path(path)
    if p.is_dir():
        return _check_deepspeed(p, trust_checkpoint)
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
    return CheckpointInfo(int(ckpt["global_step"]), ckpt.get(CHECKPOINT_KEY))


def _check_deepspeed(p: Path, trust_checkpoint: bool) -> CheckpointInfo:
    layout = deepspeed_layout(p, trust_checkpoint)
    if layout.missing:
        more = len(layout.missing) - 3
        shown = ", ".join(layout.missing[:3]) + (f" and {more} more" if more > 0 else "")
        raise CheckpointError(
            f"{layout.tag_dir} lacks {shown} of its {layout.dp_world_size} data-parallel ranks; the "
            f"checkpoint is incomplete (a save was interrupted)."
        )
    if not trust_checkpoint:
        check_deepspeed_dir(p)
    step = layout.states.get("global_step")
    return CheckpointInfo(
        int(step) if step is not None else None,
        layout.states.get(CHECKPOINT_KEY),
        layout.dp_world_size if layout.zero_stage > 0 else None,
        layout.zero_stage,
        layout.universal,
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


def settings_mismatch(info: CheckpointInfo, record: dict[str, Any]) -> str | None:
    """None when the checkpoint's fingerprint equals `record`'s, else the differences in words."""
    if not info.record or "settings" not in info.record:
        return "it records no run fingerprint: it was saved before memoryformer compared run settings"
    diffs = differences(info.record["settings"], record["settings"])
    return describe(diffs) if diffs else None


def _trainer_named(stage: int | None) -> str:
    if stage is None:
        return "trainer=cpu|gpu|ddp"
    return f"trainer=deepspeed_zero{stage}" if stage else "DeepSpeed without ZeRO"


def continuable(path: Path, info: CheckpointInfo, record: dict[str, Any] | None) -> Path:
    """The checkpoint this run loads to continue `path` (this run's own state): `path` itself, or a
    universal copy when DeepSpeed saved it at another number of ranks or ZeRO stage; raises `ConfigError`
    (one sentence naming the trainer to use) when this run's strategy cannot load it at all.

    Called on every rank before any process group starts. DeepSpeed splits ZeRO optimizer state over the
    data-parallel ranks and cannot re-partition it on load; its universal format (one file per parameter,
    `deepspeed.checkpoint.ds_to_universal`) loads at any number of ranks and stage (`universal_copy`). A
    Lightning `.ckpt` (one device, DDP) and a DeepSpeed folder hold optimizer state in formats the other
    strategy does not read, so a change between them is refused.
    """
    context = (record or {}).get("context", {})
    if "zero_stage" not in context:
        return path  # a record from before strategies were recorded: nothing to check against
    here, world = context["zero_stage"], context.get("world_size")
    there = info.zero_stage
    if (there is None) != (here is None):
        saved = "a Lightning .ckpt file" if there is None else f"a DeepSpeed ZeRO-{there} checkpoint"
        run = f"DeepSpeed ZeRO-{here}" if here is not None else "a strategy without DeepSpeed"
        raise ConfigError(
            f"ckpt_path: {path} is {saved} and this run uses {run}, which cannot read its optimizer state; "
            f"resume it with {_trainer_named(there)} (the trainer it was saved with), or start a fresh run "
            f"in another folder (name=...)."
        )
    if there is None or info.universal:
        return path
    if there == here and info.zero_world_size in (None, world):
        return path
    return universal_copy(path, info, here, world)


def universal_copy(path: Path, info: CheckpointInfo, stage: int, world: int | None) -> Path:
    """`path` converted to DeepSpeed's universal checkpoint beside it (`<name>.universal-step<N>`, made once
    per shared file system: the other ranks wait for it), for a run at ZeRO stage `stage` on `world` ranks."""
    target = path.parent / f"{path.name}.universal-step{info.step}"
    done = lambda: (target / "latest_universal").is_file()  # noqa: E731
    if not done():
        rank_zero_info(
            f"{path} was saved by {info.zero_world_size} rank(s) at ZeRO-{info.zero_stage} and this run has "
            f"{world} at ZeRO-{stage}: converting it to a universal checkpoint in {target}."
        )
    convert = lambda: _convert_to_universal(path, target)  # noqa: E731
    build_once(done, convert, f"{target}.lock", f"the universal copy {target}")
    return target


def _convert_to_universal(path: Path, target: Path) -> None:
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    layout = deepspeed_layout(path)
    staged = path.parent / f"{TMP_PREFIX}{target.name}.{os.getpid()}"
    args = argparse.Namespace(
        input_folder=str(layout.tag_dir),
        output_folder=str(staged / layout.tag_dir.name),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # DeepSpeed's default universal info (Megatron adds its own; we have none)
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress bars and prints
        ds_to_universal.main(args)
    tag = staged / layout.tag_dir.name
    _loadable_by_every_stage(tag)
    replace_directory(staged, target)


def _loadable_by_every_stage(tag: Path) -> None:
    """Complete a universal checkpoint (`tag` folder) converted from one ZeRO stage so that the other stages'
    loaders read it too (DeepSpeed 0.19 writes each stage's own variant):

    - rank 0's model states under both names: a ZeRO-3 engine reads `zero_pp_rank_0_mp_rank_00_...`,
      ZeRO 1-2 read `mp_rank_00_...`;
    - the Adam step: ZeRO 1-2 read it from each parameter's `step.pt` (which a ZeRO-3 conversion omits),
      ZeRO-3 from `optimizer_state_dict` in `zero/optimizer_state.pt` (which a ZeRO 1-2 conversion omits),
      beside the parameter groups; ZeRO 1-2 also want the DeepSpeed version there;
    - each parameter's tensors: ZeRO 1-2 read `{"param": tensor}`, which a ZeRO-3 conversion writes bare.
    """
    import deepspeed

    states = [tag / n for n in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    present = next(f for f in states if f.exists())
    for f in states:
        if not f.exists():
            shutil.copy2(present, f)
    zero = tag / "zero"
    # written a moment ago by DeepSpeed's converter from files that passed the checkpoint checks
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    params = [d for d in sorted(zero.iterdir()) if d.is_dir()]
    if "optimizer_state_dict" in optim:  # from ZeRO-3
        step = optim["optimizer_state_dict"]["state"][0]["step"]
        for d in params:
            if not (d / "step.pt").exists():
                torch.save(step.clone() if torch.is_tensor(step) else step, d / "step.pt")
            for f in d.glob("*.pt"):  # ZeRO 1-2 read {"param": tensor}, ZeRO-3 either that or the tensor
                held = torch.load(f, map_location="cpu", weights_only=False)
                if torch.is_tensor(held) and f.name != "step.pt":
                    torch.save({"param": held}, f)
    else:  # from ZeRO 1-2
        step = torch.load(params[0] / "step.pt", map_location="cpu", weights_only=False)
        groups = optim["param_groups"]
        copy = lambda: step.clone() if torch.is_tensor(step) else step  # noqa: E731 (one tensor per group)
        optim["optimizer_state_dict"] = {
            "state": {i: {"step": copy()} for i, _ in enumerate(groups)},
            "param_groups": groups,
        }
    optim.setdefault("ds_version", deepspeed.__version__)
    torch.save(optim, zero / "optimizer_state.pt")


def _run_folder(path: Path) -> Path:
    """The run folder a checkpoint belongs to (the parent of its `checkpoints/` folder)."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _resuming_line(path: str | os.PathLike, info: CheckpointInfo, record: dict[str, Any] | None) -> str:
    """`Resuming from PATH (step N)`, plus what changes at the resume without changing the run."""
    line = f"Resuming from {path}" + (f" (step {info.step})" if info.step is not None else "")
    if not record or not info.record:
        return line
    there, here = info.record.get("context", {}), record.get("context", {})
    notes = []
    old, new, horizon = there.get("max_steps"), here.get("max_steps"), record["settings"].get(HORIZON)
    if old is not None and new is not None and new != old:
        verb = "extending" if new > old else "shortening"
        after = " and stays at its minimum after it" if horizon is not None and new > horizon else ""
        notes.append(
            f"{verb} the run from trainer.max_steps={old} to {new}; the lr schedule keeps its horizon of "
            f"{horizon} steps{after}"
        )
    for key, name in (("world_size", "processes"), ("precision", "trainer.precision")):
        if there.get(key) is not None and there.get(key) != here.get(key):
            notes.append(f"{name}: {there[key]} there, {here.get(key)} here")
    return line + ("; " + "; ".join(notes) if notes else "")


def resolve_ckpt_path(
    ckpt_path: str | None,
    runs_root: str | os.PathLike | list | None,
    current_dir: str | os.PathLike | None,
    model: ModelConfig,
    trust_checkpoint: bool = False,
    *,
    record: dict[str, Any] | None = None,
    mismatch: str = "refuse",
    sweep_dir: str | os.PathLike | None = None,
) -> str | None:
    """The checkpoint to resume from (None: start fresh); see the module docstring for the rules.

    `record` is this run's `fingerprint_record` (None: settings are not compared, only loading and fit);
    `mismatch` is `resume_mismatch`; `sweep_dir` the multirun's folder (None outside a multirun).
    Raises `ConfigError` when an explicit `ckpt_path` does not exist, does not load, does not fit `model` or
    (unless `mismatch="allow"`) was saved with other settings, and for a ZeRO directory of another world size.
    """
    if ckpt_path is None:
        return None
    if ckpt_path not in SEARCH_VALUES:
        return _explicit(Path(ckpt_path), model, trust_checkpoint, record, mismatch)
    if runs_root is None:
        roots_below = []
    elif isinstance(runs_root, str | os.PathLike):
        roots_below = [runs_root]
    else:
        roots_below = list(runs_root)
    roots = [r for r in (current_dir, *roots_below) if r is not None]
    skipped: dict[Path, str] = {}
    candidates = find_checkpoints(roots, first=current_dir)
    own = [c for c in candidates if _is_under(c.path, current_dir)]
    others = [c for c in candidates if not _is_under(c.path, current_dir)]
    # the run's own folder first (a twin run of equal settings elsewhere never wins over it), and in each
    # group the highest stored step: a DeepSpeed save rewrites last.ckpt/ in place, so times do not order
    for group in (own, others):
        matches: list[tuple[Path, CheckpointInfo]] = []
        for cand in group:
            folder = _run_folder(cand.path)
            if _is_under(cand.path, sweep_dir) and not _is_under(cand.path, current_dir):
                reason = "another job of this sweep"
            else:
                try:
                    info = check_checkpoint(cand.path, model, trust_checkpoint)
                except CheckpointError as err:
                    rank_zero_info(f"ckpt_path={ckpt_path}: skipping {cand.path}: {err}")
                    continue
                reason = settings_mismatch(info, record) if record is not None else None
                if reason is None:
                    matches.append((cand.path, info))
                    continue
            if folder not in skipped:  # one line per run folder, not per checkpoint file
                skipped[folder] = reason
                rank_zero_info(f"ckpt_path={ckpt_path}: skipping {folder} ({reason})")
        if matches:
            path, info = max(matches, key=_newest)
            rank_zero_info(_resuming_line(path, info, record))
            return str(continuable(path, info, record))  # this run's own state: refuse, not skip
    _nothing_found(ckpt_path, roots, skipped)
    return None


def _newest(match: tuple[Path, CheckpointInfo]) -> tuple:
    """Sort key of a matching checkpoint: its stored step, then `last.ckpt` before a `step-*` of the same
    step (they hold the same state), then the path (so that every rank that searches picks the same one)."""
    path, info = match
    return (-1 if info.step is None else info.step, path.name == "last.ckpt", str(path))


def _explicit(
    path: Path, model: ModelConfig, trust: bool, record: dict[str, Any] | None, mismatch: str
) -> str:
    if not path.exists():
        raise ConfigError(
            f"ckpt_path={str(path)!r} does not exist; give a .ckpt file, ckpt_path=last, ckpt_path=auto "
            f"or leave it null."
        )
    try:
        info = check_checkpoint(path, model, trust)
    except CheckpointError as err:
        raise ConfigError(f"ckpt_path: {err}") from err
    if record is not None:
        reason = settings_mismatch(info, record)
        if reason and mismatch != "allow":
            raise ConfigError(
                f"ckpt_path={path} was saved by a run with other settings ({reason}), so resuming it would "
                f"not continue that run; give it the same settings, start a fresh run, or pass "
                f"resume_mismatch=allow to continue it with these."
            )
        if reason:
            rank_zero_warn(f"resume_mismatch=allow: resuming {path} although its settings differ ({reason}).")
    rank_zero_info(_resuming_line(path, info, record))
    return str(continuable(path, info, record))


def _nothing_found(ckpt_path: str, roots: list, skipped: dict[Path, str]) -> None:
    where = " and ".join(str(r) for r in roots)
    if ckpt_path == "auto":
        other = f" (skipped {len(skipped)} other run folder(s), logged above)" if skipped else ""
        rank_zero_info(f"ckpt_path=auto: no checkpoint of this run under {where}; starting fresh{other}.")
        return
    listed = "; ".join(f"{folder}: {reason}" for folder, reason in list(skipped.items())[:3])
    if len(skipped) > 3:
        listed += f"; and {len(skipped) - 3} more (logged above)"
    rank_zero_warn(
        f"ckpt_path=last found no checkpoint of this run under {where}; starting from scratch (use "
        f"ckpt_path=auto to start fresh without a warning)" + (f"; skipped {listed}." if listed else ".")
    )


def current_sweep_dir() -> str | None:
    """The folder of the Hydra multirun this process runs a job of (`hydra.sweep.dir`), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


@dataclass(frozen=True)
class ResumeRequest:
    """What `ckpt_path=` asks for and where to look, as `settings.check_config` resolved it: `ckpt_path`
    (None, "last", "auto" or a path), `runs_root` (folders searched after this run's own `output_dir`),
    `trust_checkpoint` and `mismatch` (`resume_mismatch`: "refuse" or "allow")."""

    ckpt_path: str | None
    runs_root: str | list[str] | None
    output_dir: str
    trust_checkpoint: bool
    mismatch: str


def resume_checkpoint(request: ResumeRequest, model: ModelConfig, record: dict[str, Any]) -> str | None:
    """The checkpoint `request` resolves to for a run of `model` whose fingerprint record is `record`
    (None: start fresh); see `resolve_ckpt_path`."""
    return resolve_ckpt_path(
        request.ckpt_path,
        request.runs_root,
        request.output_dir,
        model,
        request.trust_checkpoint,
        record=record,
        mismatch=request.mismatch,
        sweep_dir=current_sweep_dir(),
    )


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint`, and the only writer of `last.ckpt`.

    With `save_last`, Lightning refreshes `last.ckpt` whenever a step checkpoint or a validation saves. This
    subclass also writes it when training ends (the final step need not be a checkpoint step) and when
    SIGTERM, SIGINT or a scheduler's warning stops every rank at a step end (`GracefulStop`), so that
    `ckpt_path=last` continues from the newest state. A KeyboardInterrupt (an abort) saves only a
    single-process run: with several ranks it reaches them at different points, and a collective save
    would hang. Other exceptions (e.g. a NaN loss) save nothing, so the newest checkpoint stays the last good
    one.
    """

    def _write_last(self, trainer: L.Trainer) -> str | None:
        """Save the current state as `<dirpath>/last.ckpt` (every rank calls it; rank 0 writes)."""
        if not self.save_last or trainer.fast_dev_run or self.dirpath is None:
            return None
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self.last_model_path = path  # before saving: the callback's state goes into the file
        trainer.save_checkpoint(path, self.save_weights_only)
        return path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the final state (Lightning's own hook only writes it when nothing was saved before)."""
        self._write_last(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """On a graceful stop write `last.ckpt` and say how to resume; other exceptions keep the old one."""
        super().on_exception(trainer, pl_module, exception)  # honours save_on_exception if a user sets it
        aborted_alone = isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1
        if not (isinstance(exception, SIGTERMException) or aborted_alone):
            return
        path = self._write_last(trainer)
        if path:
            rank_zero_info(
                f"Interrupted at step {trainer.global_step}: saved {path}; resume with ckpt_path=last or "
                f"ckpt_path={path}."
            )
