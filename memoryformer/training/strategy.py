"""Turns `trainer.strategy` from the YAML into a Lightning strategy (kept apart from the model).

`trainer.strategy` is either a Lightning strategy name (`auto`, `ddp`, ...) or a mapping with `name`
(`ddp` | `deepspeed` | `fsdp`) and that strategy's keyword arguments. For DeepSpeed, `config` is the
DeepSpeed config dict itself (ZeRO stage, bucket sizes, offload) and `fp16_loss_scaling` holds the dynamic
loss-scale settings, copied into `config["fp16"]` only when `trainer.precision` is 16-bit (DeepSpeed's
fp16 engine); with bf16 Lightning adds `{"bf16": {"enabled": true}}` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, Strategy

from memoryformer.config import ConfigError

STRATEGY_NAMES = ("ddp", "deepspeed", "fsdp")
#: Keys Lightning fills in from the Trainer; setting them in the YAML would conflict (or is refused).
LIGHTNING_OWNED_DEEPSPEED_KEYS = ("gradient_accumulation_steps",)


def deepspeed_config(spec: Mapping[str, Any], precision: str | int | None) -> dict[str, Any]:
    """The DeepSpeed config dict for `spec` (a `trainer.strategy` mapping) at `precision`.

    Returns a fresh dict: `spec["config"]`, plus `fp16 = {"enabled": True, **fp16_loss_scaling}` when the
    precision is 16-bit. Keys Lightning derives from the Trainer (`gradient_accumulation_steps`) are refused.
    """
    config = copy.deepcopy(dict(spec.get("config") or {}))
    for key in LIGHTNING_OWNED_DEEPSPEED_KEYS:
        if key in config:
            raise ConfigError(
                f"trainer.strategy.config.{key} is set from the Trainer; remove it and set "
                f"trainer.accumulate_grad_batches instead."
            )
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"trainer.strategy.config.zero_optimization.stage={stage!r} must be 0, 1, 2 or 3.")
    if str(precision).startswith("16") and "fp16" not in config:
        config["fp16"] = {"enabled": True, **dict(spec.get("fp16_loss_scaling") or {})}
    return config


def is_deepspeed(strategy: Any) -> bool:
    """True for DeepSpeed in each form a strategy takes: a `trainer.strategy` mapping (`name: deepspeed`), a
    Lightning strategy name (`deepspeed`, `deepspeed_stage_2`, ...) or a built strategy (`DeepSpeedStrategy`,
    e.g. `trainer.strategy`)."""
    if isinstance(strategy, Mapping):
        name = strategy.get("name")
    elif strategy is None or isinstance(strategy, str):
        name = strategy
    else:
        name = type(strategy).__name__
    return "deepspeed" in str(name or "").lower()


def build_strategy(
    spec: str | Mapping[str, Any] | None, precision: str | int | None = None
) -> str | Strategy:
    """A Lightning strategy (or strategy name) from `trainer.strategy`; see the module docstring."""
    if spec is None or isinstance(spec, str):
        return spec or "auto"
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in STRATEGY_NAMES:
        raise ConfigError(
            f"trainer.strategy.name={name!r} is not supported; choose one of: {', '.join(STRATEGY_NAMES)} "
            f"(or give trainer.strategy as a plain Lightning strategy name such as ddp)."
        )
    if name == "ddp":
        return DDPStrategy(**spec)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(**spec)
    config = deepspeed_config(spec, precision)
    spec.pop("config", None)
    spec.pop("fp16_loss_scaling", None)
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=config, **spec)
    except ImportError as err:  # deepspeed missing
        raise ConfigError(
            f"trainer.strategy.name=deepspeed needs the deepspeed package ({err}); "
            f"install it with `pip install -e .[deepspeed]`."
        ) from err
