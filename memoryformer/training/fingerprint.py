"""A run's fingerprint: the settings that define what it trains, stored in every checkpoint it writes.

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

from typing import Any

from omegaconf import DictConfig, OmegaConf

from memoryformer.training.optim import decay_steps_for

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


def run_fingerprint(cfg: DictConfig, max_steps: int) -> dict[str, Any]:
    """The settings that define the run of `cfg` whose step budget is `max_steps` (the derived one, from
    `trainer.max_steps` or `max_tokens`): a flat `{dotted key: value}` dict of plain values."""
    settings: dict[str, Any] = {}
    for key in cfg:
        if is_counted(str(key)) and key != "hydra":
            value = cfg[key]
            plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            _flatten(plain, str(key), settings)
    settings = {k: v for k, v in settings.items() if is_counted(k)}
    optim, data = cfg.optim, cfg.data
    settings[HORIZON] = decay_steps_for(optim, max_steps)
    if data.source not in STREAM_SOURCES:
        settings.pop("data.num_workers", None)
    mapped = data.source in INDEX_MAPPED_SOURCES and data.get("index_mapping") == "gpt_neox"
    if mapped and data.get("num_samples") is None:
        settings[NUM_SAMPLES] = int(max_steps) * int(cfg.global_batch_size)
    return settings


def zero_stage(strategy: Any) -> int | None:
    """The DeepSpeed ZeRO stage of `trainer.strategy` (a mapping with `name: deepspeed`, or a Lightning
    name such as `deepspeed_stage_3`), or None for any other strategy."""
    if OmegaConf.is_config(strategy):
        strategy = OmegaConf.to_container(strategy, resolve=True)
    if isinstance(strategy, dict) and "deepspeed" in str(strategy.get("name", "")):
        return int(((strategy.get("config") or {}).get("zero_optimization") or {}).get("stage", 0))
    if isinstance(strategy, str) and strategy.startswith("deepspeed"):
        digits = [c for c in strategy if c.isdigit()]
        return int(digits[0]) if digits else 2  # Lightning's "deepspeed" is stage 2
    return None


def fingerprint_record(
    cfg: DictConfig, max_steps: int, world_size: int, accumulate: int | None = None
) -> dict[str, Any]:
    """What a checkpoint stores: the fingerprint (`settings`) and, for the log and for what a resume must
    adapt, the step budget, the number of processes, the micro-batches per optimizer step (`accumulate`),
    the precision and the DeepSpeed ZeRO stage (None without DeepSpeed) it was saved with (`context`, never
    compared as settings)."""
    return {
        "version": FORMAT_VERSION,
        "settings": run_fingerprint(cfg, max_steps),
        "context": {
            "max_steps": int(max_steps),
            "world_size": int(world_size),
            "accumulate": None if accumulate is None else int(accumulate),
            "precision": str(cfg.trainer.get("precision")),
            "zero_stage": zero_stage(cfg.trainer.get("strategy")),
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
