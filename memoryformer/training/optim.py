"""Optimizer and learning-rate schedule of the paper's recipe (Pythia's; paper §3, docs/paper-notes.md §4).

AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on weight matrices only (never on biases or norm
gains, i.e. parameters with fewer than 2 dims); the Memory Layer tables are decayed like weights unless
`decay_tables` is false (the released code decays them). The schedule is GPT-NeoX's: linear warmup over
`warmup_ratio` of the decay horizon, then cosine decay from `lr` to `lr * min_lr_ratio` at the horizon
`decay_steps` (None: `max_steps`, GPT-NeoX's unset lr-decay-iters), then flat at the min lr. A horizon longer
than the run (e.g. an 8000-step run with `decay_steps=106418`) trains the first steps of the longer schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from memoryformer.config import ConfigError
from memoryformer.nn.memory_layer import MemoryLayer


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_tables: bool = True
) -> list[dict[str, Any]]:
    """Split trainable parameters into `decay` (2-D+ weights), `tables` and `no_decay` (biases, norms).

    Returns torch optimizer groups `{"params", "weight_decay", "name"}`; empty groups are dropped.
    """
    table_ids = {
        id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer) and m.tables.requires_grad
    }
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "tables": [], "no_decay": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in table_ids:
            groups["tables"].append(p)
        elif p.ndim >= 2:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    decays = {"decay": weight_decay, "tables": weight_decay if decay_tables else 0.0, "no_decay": 0.0}
    return [
        {"params": params, "weight_decay": decays[name], "name": name}
        for name, params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, optim: Any, offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer `optim.name` over `parameter_groups(model, ...)` with lr, betas and eps from `optim`
    (an `OptimConfig` that passed `validate`, which checks the name).

    `offload`: DeepSpeed runs the step on the CPU (`offload_optimizer`), where it needs its own CPU Adam; the
    same groups and hyper-parameters then go to `deepspeed_cpu_adam`.
    """
    groups = parameter_groups(model, optim.weight_decay, optim.decay_tables)
    if offload:
        return deepspeed_cpu_adam(groups, optim)
    # The fused step matters for MemoryFormer: its hundreds of millions of table entries make the
    # optimizer step about half of a training step with the per-tensor loop (docs/benchmarks.md).
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=bool(optim.fused))
    # "adam" keeps decay coupled to the gradient (L2), as torch.optim.Adam does; "adamw" decouples it,
    # as the released code's FusedAdam (adam_w_mode) did.
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, **kwargs)


def deepspeed_cpu_adam(groups: list[dict[str, Any]], optim: Any) -> torch.optim.Optimizer:
    """DeepSpeed's CPU Adam over `groups`: decoupled decay (`adamw_mode`) for `adamw`, L2 for `adam`.

    Its C++ op is compiled on first use (ninja and a C++ compiler; cached under ~/.cache/torch_extensions);
    a machine that cannot build it gets one sentence saying so instead of DeepSpeed's traceback.
    """
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, adamw_mode=optim.name == "adamw"
        )
    except (ImportError, RuntimeError, OSError) as err:  # a failed JIT build raises one of these
        raise ConfigError(
            f"trainer.strategy.config.zero_optimization.offload_optimizer needs DeepSpeed's CPU Adam, whose "
            f"op could not be built here ({err}); install ninja and a C++ compiler (or prebuild it with "
            f"DS_BUILD_CPU_ADAM=1 pip install deepspeed), or pick trainer=deepspeed_zero2."
        ) from err


def decay_steps_for(optim: Any, max_steps: int) -> int:
    """The cosine/linear horizon: `optim.decay_steps` when set, else `max_steps`."""
    if optim.decay_steps is None:
        return int(max_steps)
    if int(optim.decay_steps) <= 0:
        raise ConfigError(
            f"optim.decay_steps={optim.decay_steps} must be a positive number of steps "
            f"(or null for max_steps)."
        )
    return int(optim.decay_steps)


def warmup_steps_for(optim: Any, max_steps: int) -> int:
    """Warmup length: `optim.warmup_steps` when set, else `round(warmup_ratio * horizon)`.

    The horizon is `decay_steps_for(optim, max_steps)`: GPT-NeoX takes warmup as a fraction of lr-decay-iters,
    so an 8000-step run with `decay_steps=106418` warms up exactly like the full run's first steps.
    """
    if optim.warmup_steps is not None:
        return int(optim.warmup_steps)
    return int(round(optim.warmup_ratio * decay_steps_for(optim, max_steps)))


def lr_multiplier(
    schedule: str, warmup_steps: int, decay_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """`step -> lr / optim.lr` for `LambdaLR`; `step` counts optimizer steps already taken (0-based).

    Warmup: (step + 1) / warmup for step < warmup (the first update is not wasted at lr 0). Then
    cosine: r + (1 - r) * (1 + cos(pi * progress)) / 2, linear: r + (1 - r) * (1 - progress), with
    progress = (step - warmup) / (decay_steps - warmup) clamped to [0, 1] and r = `min_lr_ratio`.
    `schedule` is one of `conf_schema.SCHEDULES` (`OptimConfig.validate` checks it).
    """

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps)))
        if schedule == "cosine":
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)

    return multiplier


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: Any, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`LambdaLR` following `lr_multiplier`, decaying over `optim.decay_steps` or else `max_steps`."""
    decay_steps = decay_steps_for(optim, max_steps)
    fn = lr_multiplier(optim.schedule, warmup_steps_for(optim, max_steps), decay_steps, optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
