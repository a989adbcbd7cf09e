"""The run's settings, checked and resolved once: `check_config` turns the composed config into a
`RunPlan` (typed groups, the accelerator the run will use, world size, batch split, step budget and memory
plan) with one sentence naming the key and the fix for anything impossible.
"""

from __future__ import annotations

import contextlib
import math
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from memoryformer.conf_schema import TrainConfig
from memoryformer.config import ConfigError, ModelConfig, check_choice
from memoryformer.data.config import DataConfig, files_unchecked
from memoryformer.launch import check_torchrun_restarts
from memoryformer.training import sizing
from memoryformer.training.optim import OptimConfig
from memoryformer.training.parallel import is_deepspeed
from memoryformer.training.resume import MISMATCH_CHOICES, SEARCH_VALUES, ResumeRequest, fingerprint_record
from memoryformer.training.sizing import check_micro_batch_spec, device_memory, resolve_batch

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"
@dataclass
class RunPlan:
    """A run's settings, typed, checked and resolved once by `check_config`; what the rest of the run reads.

    `config` is the composed config as `TrainConfig` (its model, data and optimizer groups their
    dataclasses); the other fields are what follows from it: the trainer's arguments with the accelerator
    the run will use, the number of processes, the batch split, the step budget, the checkpoint request, the
    fingerprint every checkpoint stores and the memory plan.
    """

    config: TrainConfig  # its `trainer.accelerator` is the resolved one (`resolve_accelerator`)
    world_size: int
    accumulate: int  # micro-batches per optimizer step
    micro_batch_size: int
    max_steps: int
    tokens_per_step: int
    resume: ResumeRequest  # what ckpt_path asks for and where to look
    record: dict[str, Any]  # the fingerprint record: what every checkpoint stores, what a resume must match
    config_yaml: str  # the composed config, resolved, as printed and saved beside the checkpoints
    memory: dict[str, Any] | None = None  # the memory plan as plan.json stores it (`plan_run_memory`)

    @property
    def trainer(self) -> dict[str, Any]:
        """The trainer's settings, `accelerator` resolved: what the memory plan and `L.Trainer` both see."""
        return self.config.trainer

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def data(self) -> DataConfig:
        return self.config.data

    @property
    def optim(self) -> OptimConfig:
        return self.config.optim

    @property
    def output_dir(self) -> Path:
        return Path(self.config.paths["output_dir"])

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.config.paths["ckpt_dir"])


def typed_config(cfg: DictConfig) -> TrainConfig:
    """The composed config as a `TrainConfig`, every value resolved and checked by the dataclasses (one
    sentence naming the key for anything impossible). A config not composed on the schema (built by hand)
    is merged onto it first, so it is checked the same way."""
    if OmegaConf.get_type(cfg) is not TrainConfig:
        values = OmegaConf.to_container(cfg)
        values.pop("hydra", None)
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
    # a dry run plans for data this machine may not have
    with files_unchecked() if cfg.get("dry_run") else contextlib.nullcontext():
        return OmegaConf.to_object(cfg)


def resolve_accelerator(accelerator: Any) -> str:
    """The accelerator Lightning will train on for `trainer.accelerator`: `auto` becomes `cuda` where CUDA
    is available and `cpu` elsewhere, as Lightning's own choice does for the devices this project runs on;
    any other name is kept. Resolved once, so that the memory plan, the device's memory, the precision
    check and the strategy all see the device the run really uses."""
    name = str(accelerator or "auto")
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def world_size(trainer_cfg: dict[str, Any]) -> int:
    """Processes in the run: devices per node x `num_nodes` (`devices` may be an int, a list or "auto")."""
    devices = trainer_cfg.get("devices", "auto")
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, list | tuple):
        per_node = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    else:  # "auto" or -1: every visible accelerator
        accelerator = str(trainer_cfg.get("accelerator", "auto"))
        gpus = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else 0
        per_node = gpus if gpus > 0 else 1
    return per_node * nodes


def _wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        auth = None
    return auth is not None


def check_loggers(logger_cfg: dict[str, Any] | None) -> None:
    """Refuse a W&B logger that would try to go online without credentials (one sentence, at start)."""
    for name, spec in (logger_cfg or {}).items():
        if not isinstance(spec, dict) or spec.get("_target_") != WANDB_TARGET:
            continue
        offline = bool(spec.get("offline")) or os.environ.get("WANDB_MODE") in (
            "offline",
            "disabled",
            "dryrun",
        )
        if not offline and not _wandb_has_credentials():
            raise ConfigError(
                f"logger.{name} is W&B online but no API key is set; export WANDB_API_KEY "
                f"(or run `wandb login`), "
                f"or set logger.{name}.offline=true (or WANDB_MODE=offline)."
            )


def check_config(cfg: DictConfig) -> RunPlan:
    """Type and validate the composed config and resolve what follows from it (see `RunPlan`)."""
    run = typed_config(cfg)
    model, data, optim = run.model, run.data, run.optim
    run.trainer["accelerator"] = resolve_accelerator(run.trainer.get("accelerator"))
    trainer = run.trainer
    if data.seq_len > model.block_size:
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds model.block_size={model.block_size}; "
            f"lower data.seq_len or raise model.block_size."
        )
    optim.validate()
    world = world_size(trainer)
    tokens_per_step = run.global_batch_size * data.seq_len
    max_steps = trainer.get("max_steps", -1)
    max_steps = -1 if max_steps is None else int(max_steps)
    if run.max_tokens is not None:
        max_steps = math.ceil(run.max_tokens / tokens_per_step)
    if max_steps <= 0:
        raise ConfigError(
            "trainer.max_steps is not set; give trainer.max_steps=N or max_tokens=N "
            "(the lr schedule needs a horizon)."
        )
    if run.activation_checkpointing_every < 1:
        raise ConfigError(
            f"activation_checkpointing_every={run.activation_checkpointing_every} must be >= 1 "
            f"(1 checkpoints every block, n every n-th block)."
        )
    check_precision(trainer)
    check_torchrun_restarts()
    check_loggers(run.logger)
    ckpt = run.ckpt_path
    if ckpt is not None and ckpt not in SEARCH_VALUES and not os.path.exists(ckpt):
        raise ConfigError(
            f"ckpt_path={ckpt!r} does not exist; give a .ckpt file, ckpt_path=last, ckpt_path=auto or "
            f"leave it null."
        )
    check_choice("resume_mismatch", run.resume_mismatch, MISMATCH_CHOICES)
    paths = run.paths
    resume = ResumeRequest(
        ckpt, paths.get("runs_root"), str(paths["output_dir"]), run.trust_checkpoint, run.resume_mismatch
    )
    micro, accumulate, memory = plan_run_memory(run, trainer, world)
    return RunPlan(
        config=run,
        world_size=world,
        accumulate=accumulate,
        micro_batch_size=micro,
        max_steps=max_steps,
        tokens_per_step=tokens_per_step,
        resume=resume,
        record=fingerprint_record(run, max_steps, world, accumulate),
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        memory=memory,
    )


def plan_run_memory(run: TrainConfig, trainer: dict[str, Any], world: int) -> tuple[int, int, dict[str, Any]]:
    """(micro_batch_size, accumulate, plan.json's dict): the batch arithmetic checked against the memory
    plan of the device (`memoryformer.training.sizing`)."""
    spec = check_micro_batch_spec(run.micro_batch_size)
    nodes = int(trainer.get("num_nodes", 1) or 1)
    stated = trainer.get("accumulate_grad_batches")
    stated = None if stated is None else int(stated)
    memory = device_memory(run.device_memory_gb, trainer, world // nodes)
    layout = sizing.layout_from_trainer(trainer, world, fused_optimizer=bool(run.optim.fused))
    every = max(1, run.activation_checkpointing_every)

    def plan_for(micro: int, accumulate: int) -> sizing.MemoryPlan:
        return sizing.plan_memory(
            run.model, run.data.seq_len, micro, layout, run.activation_checkpointing, every,
            accumulate=accumulate,
        )

    micro, accumulate = resolve_batch(spec, run.global_batch_size, world, stated, memory, plan_for)
    summary = sizing.plan_summary(plan_for(micro, accumulate), accumulate, memory.bytes, memory.source)
    summary.update(devices=world // nodes, num_nodes=nodes)
    return micro, accumulate, summary


def check_writable_dir(path: Path, key: str) -> None:
    """Create `path` and write a probe file in it, or raise `ConfigError` naming the key and the folder.

    Checked before the model and data are built, so an unwritable folder fails in a second instead of at
    the first checkpoint (or with a traceback from a logger).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{key}={str(path)!r} cannot be written ({exc.strerror}); point {key} (or hydra.run.dir) "
            f"at a writable folder."
        ) from None


def check_precision(trainer_cfg: dict[str, Any]) -> None:
    """Refuse fp16 (`16-mixed`) on CPU (`trainer_cfg` with its accelerator resolved): Lightning has no fp16
    AMP there and would silently train in bf16."""
    precision = str(trainer_cfg.get("precision", ""))
    if precision.startswith("16") and trainer_cfg.get("accelerator") == "cpu":
        raise ConfigError(
            f"trainer.precision={precision} needs a CUDA GPU: Lightning has no fp16 mixed precision on "
            f"CPU and would silently train in bf16-mixed instead; on CPU use trainer.precision=bf16-mixed "
            f"or 32-true."
        )


def optim_for_precision(optim: dict[str, Any], trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """`optim` with `fused` off when fp16 mixed precision (`16-mixed`) would clip gradients outside DeepSpeed.

    Lightning's fp16 AMP plugin must unscale gradients before clipping them, and refuses an optimizer that
    unscales internally (torch's fused Adam/AdamW); so under `trainer.precision=16-mixed` with
    `optim.grad_clip > 0` the step uses torch's foreach implementation, which computes the same update.
    """
    precision = str(trainer_cfg.get("precision", ""))
    deepspeed = is_deepspeed(trainer_cfg.get("strategy"))  # DeepSpeed clips by itself
    if precision.startswith("16") and optim.get("fused") and optim.get("grad_clip") and not deepspeed:
        rank_zero_info("trainer.precision=16-mixed with gradient clipping: using the non-fused AdamW step.")
        return {**optim, "fused": False}
    return optim
