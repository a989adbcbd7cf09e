"""Optimizer and learning-rate schedule of the paper's recipe (Pythia's; paper §3, docs/paper-notes.md §4).

AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on weight matrices only (never on biases or norm
gains, i.e. parameters with fewer than 2 dims); the Memory Layer tables are decayed with
`table_weight_decay` (None: `weight_decay`, as the released code does). The schedule is GPT-NeoX's: linear
warmup over `warmup_ratio` of the decay horizon, then cosine decay from `lr` to `lr * min_lr_ratio` at the
horizon `decay_steps` (None: `max_steps`, GPT-NeoX's unset lr-decay-iters), then flat at the min lr. A
horizon longer than the run (e.g. an 8000-step run with `decay_steps=106418`) trains the first steps of the
longer schedule.

Per-group learning rates (`OptimConfig.block_lr_scale`, `embedding_lr_scale`): every parameter belongs to
one of three lr groups named by what it is, `blocks` (weight matrices and Memory Layer tables of the
transformer blocks), `embeddings` (token embedding and LM head) and `other` (norms and biases). A group's lr
is `optim.lr` times its scale (`block_lr_scale`, `embedding_lr_scale`, 1 for `other`), set as the torch
group's own `lr`; the one `LambdaLR` multiplier then scales every group's initial lr, so all follow the same
warmup and decay and keep their ratios at every step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memoryformer.config import ConfigError, check_choice
from memoryformer.errors import REMOVED_KEYS

# torch is imported where it is used: Hydra's ConfigStore registers `OptimConfig` (conf_schema), and
# composing a config must not load torch (train.py --help and a misspelt key answer in about a second)
if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS = ("adamw", "adam")  # optim.name
SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule


@dataclass
class OptimConfig:
    """Optimizer, schedule and clipping (the `optim` group); defaults are the paper's MemoryFormer recipe.

    lr 3e-3 is 3x Pythia-70M's (paper section 3); min lr is 0.01 * lr as in the released configs.
    """

    name: str = "adamw"  # "adamw" (decoupled decay, the released FusedAdam) | "adam" (L2 decay)
    lr: float = 3e-3
    min_lr_ratio: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    # weight decay of the Memory Layer tables; None: weight_decay (the released code decays them), 0: none
    # (product-key memory's setting). Replaces the removed `decay_tables` (false is table_weight_decay=0).
    table_weight_decay: float | None = None
    # Per-group learning rates (memoryformer.training.optim): the blocks' weight matrices and Memory Layer
    # tables train at lr * block_lr_scale, the token embedding and LM head at lr * embedding_lr_scale, norms
    # and biases at lr; all under the same warmup and decay. 1.0 and 1.0 is the released recipe.
    block_lr_scale: float = 1.0
    embedding_lr_scale: float = 1.0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    warmup_ratio: float = 0.01  # share of the decay horizon (decay_steps, else max_steps) spent in warmup
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    decay_steps: int | None = None  # cosine decay horizon in steps (lr reaches min lr there); None: max_steps
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool = True  # torch's fused (single-kernel) Adam/AdamW step: ~4x faster on CPU, and on GPU

    def validate(self) -> None:
        """Raise `ConfigError` with one sentence naming the key and the fix for an impossible value.

        `training.run.check_config` and `LMTrainingModule` call it; the schedule's step counts are checked
        where they are used (`memoryformer.training.optim`), since those need the run's step budget.
        """
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"optim.lr={self.lr} must be > 0 and optim.min_lr_ratio={self.min_lr_ratio} in [0, 1]."
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1).")
        for key in ("block_lr_scale", "embedding_lr_scale"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"optim.{key}={getattr(self, key)} must be >= 0 (a multiple of optim.lr; 1 = the "
                    f"same lr, 0 freezes the group)."
                )
        if self.table_weight_decay is not None and self.table_weight_decay < 0:
            raise ConfigError(
                f"optim.table_weight_decay={self.table_weight_decay} must be >= 0, or null for "
                f"optim.weight_decay."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any], saved: bool = False) -> OptimConfig:
        """An `OptimConfig` from a plain dict. The removed `decay_tables` is refused with the sentence naming
        `table_weight_decay`, unless `saved` (a checkpoint's hyper-parameters, written before it was
        removed), where it maps to `table_weight_decay` (false -> 0, true -> null)."""
        values = dict(values)
        if "decay_tables" in values:
            if not saved:
                raise ConfigError(REMOVED_KEYS["optim.decay_tables"])
            decay = values.pop("decay_tables")
            values.setdefault("table_weight_decay", None if decay else 0.0)
        return cls(**values)


#: the lr groups, logged as `lr/<name>` every optimizer step
LR_GROUPS = ("blocks", "embeddings", "other")


def _embedding_ids(model: nn.Module) -> set[int]:
    """ids of the token-embedding and LM-head weights: every `nn.Embedding`'s weight and `model.lm_head`'s
    parameters (one id when the two are tied)."""
    from torch import nn

    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        ids |= {id(p) for p in head.parameters() if p.ndim >= 2}
    return ids


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    table_weight_decay: float | None = None,
    lr: float = 1.0,
    block_lr_scale: float = 1.0,
    embedding_lr_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Split trainable parameters into torch optimizer groups by what they are.

    - `blocks`: weight matrices (2-D+) of the transformer blocks and of anything else that is not an
      embedding, decay `weight_decay`, lr `lr * block_lr_scale`;
    - `tables`: Memory Layer tables (found as `MemoryLayer.tables` of every `MemoryLayer` submodule), decay
      `table_weight_decay` (None: `weight_decay`), lr `lr * block_lr_scale` (they are the blocks' weights);
    - `embeddings`: token embedding and LM head (`nn.Embedding` weights and `model.lm_head`), decay
      `weight_decay`, lr `lr * embedding_lr_scale`;
    - `other`: biases and norm gains (fewer than 2 dims), decay 0, lr `lr`.

    Returns dicts `{"params", "weight_decay", "lr", "name", "lr_group"}` (`lr_group` is one of `LR_GROUPS`:
    `tables` belong to `blocks`); empty groups are dropped, a parameter shared by two modules (tied
    weights) is listed once. The dicts are plain torch param groups, so any optimizer accepts them.
    """
    from memoryformer.nn.memory_layer import MemoryLayer

    table_ids = {
        id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer) and m.tables.requires_grad
    }
    embedding_ids = _embedding_ids(model)
    groups: dict[str, list[nn.Parameter]] = {"blocks": [], "tables": [], "embeddings": [], "other": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in table_ids:
            groups["tables"].append(p)
        elif id(p) in embedding_ids:
            groups["embeddings"].append(p)
        elif p.ndim >= 2:
            groups["blocks"].append(p)
        else:
            groups["other"].append(p)
    table_decay = weight_decay if table_weight_decay is None else table_weight_decay
    settings = {  # name: (weight decay, lr, lr group)
        "blocks": (weight_decay, lr * block_lr_scale, "blocks"),
        "tables": (table_decay, lr * block_lr_scale, "blocks"),
        "embeddings": (weight_decay, lr * embedding_lr_scale, "embeddings"),
        "other": (0.0, lr, "other"),
    }
    return [
        {
            "params": params,
            "weight_decay": settings[name][0],
            "lr": settings[name][1],
            "name": name,
            "lr_group": settings[name][2],
        }
        for name, params in groups.items()
        if params
    ]


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`{"blocks": lr, "embeddings": lr, "other": lr}`: the current lr of each lr group present in
    `optimizer` (groups built by `parameter_groups`; a group without `lr_group` counts as `other`)."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get("lr_group", "other"), float(group["lr"]))
    return out


def build_optimizer(model: nn.Module, optim: Any, offload: bool = False) -> torch.optim.Optimizer:
    """The optimizer `optim.name` over `parameter_groups(model, ...)` with per-group lr, betas and eps from
    `optim` (an `OptimConfig` that passed `validate`, which checks the name).

    `offload`: DeepSpeed runs the step on the CPU (`offload_optimizer`), where it needs its own CPU Adam; the
    same groups and hyper-parameters then go to `deepspeed_cpu_adam`.
    """
    groups = parameter_groups(
        model,
        optim.weight_decay,
        optim.table_weight_decay,
        lr=optim.lr,
        block_lr_scale=optim.block_lr_scale,
        embedding_lr_scale=optim.embedding_lr_scale,
    )
    if offload:
        return deepspeed_cpu_adam(groups, optim)
    # The fused step matters for MemoryFormer: its hundreds of millions of table entries make the
    # optimizer step about half of a training step with the per-tensor loop (docs/benchmarks.md).
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=bool(optim.fused))
    # "adam" keeps decay coupled to the gradient (L2), as torch.optim.Adam does; "adamw" decouples it,
    # as the released code's FusedAdam (adam_w_mode) did.
    import torch

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
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
