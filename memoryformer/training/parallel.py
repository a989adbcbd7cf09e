"""How a run is spread over devices, kept apart from the model (as torchtitan's `parallelize`).

## Strategies

Turns `trainer.strategy` from the YAML into a Lightning strategy (kept apart from the model).

`trainer.strategy` is either a Lightning strategy name (`auto`, `ddp`, ...) or a mapping with `name`
(`ddp` | `deepspeed`; `fsdp` is refused) and that strategy's keyword arguments. For DeepSpeed, `config` is the
DeepSpeed config dict itself (ZeRO stage, bucket sizes, offload) and `fp16_loss_scaling` holds the dynamic
loss-scale settings, copied into `config["fp16"]` only when `trainer.precision` is 16-bit (DeepSpeed's
fp16 engine); with bf16 Lightning adds `{"bf16": {"enabled": true}}` itself.

DeepSpeed is built as `DeepSpeedAnyAcceleratorStrategy`: Lightning's `DeepSpeedStrategy`, which also runs with
`trainer.accelerator=cpu` on DeepSpeed's own CPU accelerator (gloo), for debugging a ZeRO config on a laptop
and for CI (docs/deepspeed.md).

## Transformations of the model

Training-time transformations of a plain `LanguageModel`, applied from outside as torchtitan's
`parallelize` does, so that the model's own forward stays pure data flow.

- `apply_activation_checkpointing(model, every)`: blocks 0, n, 2n, ... recompute their activations in
  backward instead of storing them. Parameter names, `state_dict` keys and numbers are unchanged.
- `apply_compile(model)`: `torch.compile`, returning the compiled wrapper for the training forward.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torch import nn
from torch.utils.checkpoint import checkpoint

from memoryformer.atomic_io import TMP_PREFIX, remove_directory, replace_directory
from memoryformer.config import ConfigError
from memoryformer.models.kv_cache import KVCache

STRATEGY_NAMES = ("ddp", "deepspeed", "fsdp")
#: FSDP is refused: `LMTrainingModule.configure_gradient_clipping` would take the norm of each rank's shard,
#: not the global norm (issue #29); the DeepSpeed trainers shard with a global clipping norm.
FSDP_REFUSED = (
    "{key}={value} is refused because gradient clipping under FSDP would use each shard's own norm; use "
    "trainer=deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload or deepspeed_zero3 to shard instead."
)
#: Keys Lightning fills in from the Trainer; setting them in the YAML would conflict (or is refused).
LIGHTNING_OWNED_DEEPSPEED_KEYS = ("gradient_accumulation_steps",)


def deepspeed_config(spec: Mapping[str, Any], precision: str | int | None) -> dict[str, Any]:
    """The DeepSpeed config dict for `spec` (a `trainer.strategy` mapping) at `precision`.

    Returns a fresh dict: `spec["config"]`, plus `fp16 = {"enabled": True, **fp16_loss_scaling}` when the
    precision is 16-bit, and `data_types = bf16_data_types` (fp32 gradient accumulation) when it is bf16 at
    ZeRO stage 1-3. Keys Lightning derives from the Trainer (`gradient_accumulation_steps`) are refused.
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
    if str(precision).startswith("bf16") and stage >= 1 and spec.get("bf16_data_types"):
        # DeepSpeed adds micro-batches up in the model's dtype unless told (engine.get_data_types); stage 0
        # refuses bf16 weights with fp32 accumulation (engine._do_optimizer_sanity_check), so it gets none
        config["data_types"] = {**dict(spec["bf16_data_types"]), **dict(config.get("data_types") or {})}
    return config


#: Lightning's warning when the LightningModule overrides `configure_gradient_clipping` under DeepSpeed.
#: `LMTrainingModule` overrides it only to read the norm outside DeepSpeed, and steps aside under DeepSpeed,
#: whose engine clips with `gradient_clip_val` itself.
_CLIPPING_HOOK_WARNING = "Since DeepSpeed handles gradient clipping internally"


def use_deepspeed_cpu_accelerator() -> None:
    """Make DeepSpeed run on its CPU accelerator (gloo) in this process and in the ranks it launches.

    DeepSpeed picks its accelerator once, at `import deepspeed`, from `DS_ACCELERATOR` (else CUDA when
    present). So the variable is set before the import (`build_strategy` calls this before constructing
    the strategy, whose constructor imports deepspeed), which the launched ranks inherit; a deepspeed
    already imported with another accelerator (e.g. on a GPU machine) is switched to the CPU one.
    """
    os.environ["DS_ACCELERATOR"] = "cpu"
    real = sys.modules.get("deepspeed.accelerator.real_accelerator")
    current = getattr(real, "ds_accelerator", None)
    if current is not None and current.device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        real.set_accelerator(CPU_Accelerator())


class DeepSpeedAnyAcceleratorStrategy(DeepSpeedStrategy):
    """Lightning's `DeepSpeedStrategy`, which also accepts `trainer.accelerator=cpu`.

    Lightning refuses every accelerator but CUDA in `setup_environment` (and checks CUDA device indices in
    `setup_distributed`); DeepSpeed itself runs on CPU with its
    CPU accelerator and the gloo process group (Lightning picks gloo for CPU devices). On CUDA nothing
    changes. Under DeepSpeed the engine clips gradients (`gradient_clip_val`), so Lightning's warning about
    an overridden `configure_gradient_clipping` hook is silenced (see `LMTrainingModule`).
    """

    def setup_environment(self) -> None:
        """Lightning's set-up, without its CUDA-only check when the accelerator is the CPU."""
        if isinstance(self.accelerator, CPUAccelerator):
            use_deepspeed_cpu_accelerator()
            # what DeepSpeedStrategy.setup_environment does after its check
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        """Lightning's, without its check that device indices match local ranks (CPU devices have none)."""
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_distributed()
            return
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        """`deepspeed.initialize` as Lightning calls it, but on CPU with the local rank as DeepSpeed's device
        rank: Lightning passes the device index, which a CPU device lacks (DeepSpeed would see one rank)."""
        if not isinstance(self.accelerator, CPUAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The engine's backward without its division by the accumulation: Lightning has already divided the
        micro-batch loss by `accumulate_grad_batches`, and DeepSpeed's `engine.backward` divides by
        `gradient_accumulation_steps` again by default (`scale_wrt_gas=True`), which made every gradient,
        the clipping and the logged norm 1/accumulate of what they are."""
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        """DeepSpeed's save, made whole-or-absent: every rank writes its files into one staging folder
        beside `filepath` (`.tmp-<name>.<id>`, named by global rank 0), and once all have written, rank 0
        renames it onto `filepath` (`replace_directory`). DeepSpeed alone rewrites the folder in place, so
        a kill mid-save would leave old and new shards mixed under one tag. Needs `filepath` on a file
        system every rank sees (as DeepSpeed's own loading does)."""
        target = Path(self.broadcast(str(filepath)))
        staged = target.parent / f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:12]}"
        staged = Path(self.broadcast(str(staged)))
        super().save_checkpoint(checkpoint, staged, storage_options)
        self.barrier("memoryformer.save_checkpoint.written")
        if self.is_global_zero:
            replace_directory(staged, target)
        self.barrier("memoryformer.save_checkpoint.renamed")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load, then, for a universal checkpoint under ZeRO-3, the repair of what the ZeRO-3
        universal load of DeepSpeed 0.19 (`stage3.py`, `load_hp_checkpoint_state_from_checkpoint_dir_stage3`)
        gets wrong (`repair_zero3_universal_load`)."""
        state = super().load_checkpoint(checkpoint_path, weights_only)
        if self.zero_stage_3 and (Path(checkpoint_path) / "latest_universal").is_file():
            repair_zero3_universal_load(self.deepspeed_engine.optimizer.optimizer, Path(checkpoint_path))
        return state

    def remove_checkpoint(self, filepath: Any) -> None:
        """Remove an old checkpoint folder (top-k pruning) in one visible step: renamed away, then deleted,
        so that a kill mid-removal never leaves a partial folder under a `.ckpt` name."""
        if self.is_global_zero:
            if Path(filepath).is_dir():
                remove_directory(filepath)
            else:
                super().remove_checkpoint(filepath)

    def init_deepspeed(self) -> None:
        """Lightning's engine set-up without its clipping-hook warning (see the class docstring)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_CLIPPING_HOOK_WARNING)
            super().init_deepspeed()


def repair_zero3_universal_load(optimizer: torch.optim.Optimizer, universal: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load in the torch `optimizer` it filled:

    - it copies the first parameter group's hyper-parameters onto every group (the norms and biases took the
      tables' weight decay): each group gets back its own, from `<tag>/zero/optimizer_state.pt`;
    - it gives every group's state one shared `step` tensor, which Adam then advances once per group and
      step (3 groups: 6, 9, 12, ... for steps 1, 2, 3 after the load, so its bias correction is off): each
      group gets its own copy.
    """
    tag = (universal / "latest_universal").read_text().strip()
    from memoryformer.checkpoint import deepspeed_safe_globals, safe_torch_load

    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        saved = safe_torch_load(universal / tag / "zero" / "optimizer_state.pt", "cpu")
    groups = saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ConfigError(
            f"{universal} holds {len(groups)} optimizer parameter groups and this run "
            f"{len(optimizer.param_groups)}; resume it with the optimizer settings it was saved with."
        )
    for group, stored in zip(optimizer.param_groups, groups, strict=True):
        group.update({k: v for k, v in stored.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def offloads_optimizer(strategy: Any) -> bool:
    """True when `strategy` is DeepSpeed with `zero_optimization.offload_optimizer` on the CPU or NVMe, where
    the optimizer step must be DeepSpeed's CPU Adam (it refuses a torch optimizer there)."""
    config = getattr(strategy, "config", None) if isinstance(strategy, DeepSpeedStrategy) else None
    offload = ((config or {}).get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def is_zero3(strategy: Any) -> bool:
    """True when `strategy` is DeepSpeed at ZeRO stage 3 (parameters sharded across ranks)."""
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


@contextmanager
def materialised_zero3(params: list[Any]) -> Iterator[None]:
    """A context in which the ZeRO-3 parameters `params`, whose every element the body overwrites (an
    initialisation), are whole tensors on this rank; on exit each rank keeps its own shard of them.

    Nothing is gathered: the body's values replace the old ones, so each rank allocates the whole parameters
    empty and keeps only its partition of what it wrote (DeepSpeed's `partition(has_been_updated=True)`).
    Ranks draw the same numbers when seeded alike (Lightning seeds every rank with `seed`); a rank that
    drew others would still hold a correctly distributed shard, since every element lives on one rank only.
    Host (or device) memory per rank: its shards plus `params` whole, with no all-gather buffers.
    Parameters without a ZeRO-3 shard (`ds_id`) are left as they are.
    """
    sharded = [p for p in dict.fromkeys(params) if hasattr(p, "ds_id")]
    if not sharded:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for p in sharded:
        p.data = torch.empty(p.ds_shape, dtype=p.dtype, device=p.device)
        p.ds_status = ZeroParamStatus.AVAILABLE
    try:
        yield
    finally:
        sharded[0].partition(param_list=sharded, has_been_updated=True)  # copies this rank's slice, frees


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
    spec: str | Mapping[str, Any] | None, precision: str | int | None = None, accelerator: str | None = None
) -> str | Strategy:
    """A Lightning strategy (or strategy name) from `trainer.strategy`; see the module docstring.

    `accelerator` is `trainer.accelerator`: with `cpu`, DeepSpeed is set to its CPU accelerator before
    it is imported (`use_deepspeed_cpu_accelerator`).
    """
    if spec is None or isinstance(spec, str):
        if "fsdp" in str(spec).lower():
            raise ConfigError(FSDP_REFUSED.format(key="trainer.strategy", value=spec))
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
        raise ConfigError(FSDP_REFUSED.format(key="trainer.strategy.name", value=name))
    config = deepspeed_config(spec, precision)
    spec.pop("config", None)
    spec.pop("fp16_loss_scaling", None)
    spec.pop("bf16_data_types", None)
    if str(accelerator) == "cpu":
        use_deepspeed_cpu_accelerator()
    try:
        return DeepSpeedAnyAcceleratorStrategy(config=config, **spec)
    except ImportError as err:  # deepspeed missing
        raise ConfigError(
            f"trainer.strategy.name=deepspeed needs the deepspeed package ({err}); "
            f"install it with `pip install -e .[deepspeed]`."
        ) from err


class _CheckpointedForward:
    """Stands in for `block.forward`: recomputes the block in backward when training without a KV cache.

    A plain object rather than a closure or a wrapper module: module names stay `blocks.<i>.<...>` (so
    checkpoints and optimizer groups do not change), and `copy.deepcopy` / pickling of the model copy it
    with the block it belongs to.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        forward = type(self.block).forward
        # Decoding appends to the cache, which a recompute would do twice; evaluation stores nothing.
        if self.block.training and kv_cache is None and torch.is_grad_enabled():
            return checkpoint(forward, self.block, x, cos, sin, use_reentrant=False)
        return forward(self.block, x, cos, sin, kv_cache)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Checkpoint blocks 0, every, 2 * every, ... of `model.blocks`; returns their indices.

    Memory falls by about that share of the blocks' activations while the recompute cost grows by the same
    share (one more forward of each checkpointed block), so `every` trades the two.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"activation checkpointing every={every!r} must be an int >= 1 (1 = every block).")
    indices = list(range(0, len(model.blocks), every))
    for i in indices:
        block = model.blocks[i]
        if not isinstance(block.__dict__.get("forward"), _CheckpointedForward):  # applying twice is a no-op
            block.forward = _CheckpointedForward(block)
    return indices


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks of `model.blocks` that recompute their activations in backward."""
    blocks = enumerate(model.blocks)
    return [i for i, block in blocks if isinstance(block.__dict__.get("forward"), _CheckpointedForward)]


def apply_compile(model: nn.Module) -> nn.Module:
    """`torch.compile(model)`: a wrapper sharing `model`'s parameters, to call for the training forward."""
    return torch.compile(model)
