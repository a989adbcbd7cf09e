"""Everything `train.py` does, as functions: check the config, build model/data/trainer, fit, export.

`train(cfg)` takes a composed `DictConfig` (from `@hydra.main` or Hydra's compose API in tests) and returns
a summary dict. `check_config(cfg)` runs every start-up check and raises `ConfigError` with one sentence
naming the key and the fix, before anything is built.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from memoryformer.atomic_io import atomic_write_text
from memoryformer.conf_schema import OptimConfig
from memoryformer.config import ConfigError, ModelConfig, to_plain
from memoryformer.data.config import DataConfig, files_unchecked
from memoryformer.training import memory_plan
from memoryformer.training.batch_plan import check_micro_batch_spec, device_memory, resolve_batch
from memoryformer.training.callbacks import GracefulStop, TokenThroughputMonitor, ValidateAtStart
from memoryformer.training.checkpoint_io import SafeCheckpointIO
from memoryformer.training.fingerprint import fingerprint_record
from memoryformer.training.launch import check_torchrun_restarts, is_launching_process
from memoryformer.training.module import LMTrainingModule
from memoryformer.training.resume import SEARCH_VALUES, RunFingerprint, resume_checkpoint
from memoryformer.training.run_lock import run_lock
from memoryformer.training.strategy import build_strategy, is_deepspeed

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"
#: How the launching process hands its resume choice to the ranks Lightning starts (`agreed_checkpoint`).
RESUME_FROM_VAR = "MEMORYFORMER_RESUME_FROM"
log = logging.getLogger(__name__)
#: Loggers to which Lightning attaches its own console handler when it is imported.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


@dataclass
class RunPlan:
    """The checked, derived numbers of a run (what `check_config` computed)."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    world_size: int
    accumulate: int
    micro_batch_size: int
    max_steps: int
    tokens_per_step: int
    trainer: dict[str, Any]  # `cfg.trainer` as plain values, `accelerator` resolved (`resolve_accelerator`)
    memory: dict[str, Any] | None = None  # the memory plan as plan.json stores it (`plan_run_memory`)


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
    """Validate the composed config and derive the batch arithmetic and step budget (see `RunPlan`)."""
    model = ModelConfig.from_dict(to_plain(cfg.model))
    if cfg.get("dry_run"):
        with files_unchecked():  # a dry run plans for data this machine may not have
            data = DataConfig(**to_plain(cfg.data))
    else:
        data = DataConfig(**to_plain(cfg.data))
    optim = OptimConfig.from_dict(to_plain(cfg.optim))
    trainer_cfg = to_plain(cfg.trainer)
    trainer_cfg["accelerator"] = resolve_accelerator(trainer_cfg.get("accelerator"))
    if data.seq_len > model.block_size:
        raise ConfigError(
            f"data.seq_len={data.seq_len} exceeds model.block_size={model.block_size}; "
            f"lower data.seq_len or raise model.block_size."
        )
    optim.validate()
    world = world_size(trainer_cfg)
    gbs = int(cfg.global_batch_size)
    tokens_per_step = gbs * data.seq_len
    max_steps = trainer_cfg.get("max_steps", -1)
    max_steps = -1 if max_steps is None else int(max_steps)
    if cfg.max_tokens is not None:
        max_steps = math.ceil(int(cfg.max_tokens) / tokens_per_step)
    if max_steps <= 0:
        raise ConfigError(
            "trainer.max_steps is not set; give trainer.max_steps=N or max_tokens=N "
            "(the lr schedule needs a horizon)."
        )
    if int(cfg.activation_checkpointing_every) < 1:
        raise ConfigError(
            f"activation_checkpointing_every={cfg.activation_checkpointing_every} must be >= 1 "
            f"(1 checkpoints every block, n every n-th block)."
        )
    check_precision(trainer_cfg)
    check_torchrun_restarts()
    check_loggers(to_plain(cfg.logger))
    ckpt = cfg.ckpt_path
    if ckpt is not None and ckpt not in SEARCH_VALUES and not os.path.exists(str(ckpt)):
        raise ConfigError(
            f"ckpt_path={ckpt!r} does not exist; give a .ckpt file, ckpt_path=last, ckpt_path=auto or "
            f"leave it null."
        )
    micro, accumulate, memory = plan_run_memory(cfg, model, data, optim, trainer_cfg, world)
    return RunPlan(
        model, data, optim, world, accumulate, micro, max_steps, tokens_per_step, trainer_cfg, memory
    )


def plan_run_memory(
    cfg: DictConfig,
    model: ModelConfig,
    data: DataConfig,
    optim: OptimConfig,
    trainer_cfg: dict[str, Any],
    world: int,
) -> tuple[int, int, dict[str, Any]]:
    """(micro_batch_size, accumulate, plan.json's dict): the batch arithmetic checked against the memory
    plan of the device (`memoryformer.training.batch_plan`, `memoryformer.training.memory_plan`)."""
    spec = check_micro_batch_spec(cfg.get("micro_batch_size"))
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    stated = trainer_cfg.get("accumulate_grad_batches")
    stated = None if stated is None else int(stated)
    memory = device_memory(cfg.get("device_memory_gb"), trainer_cfg, world // nodes)
    layout = memory_plan.layout_from_trainer(trainer_cfg, world, fused_optimizer=bool(optim.fused))
    checkpointing = bool(cfg.activation_checkpointing)
    every = max(1, int(cfg.activation_checkpointing_every))

    def plan_for(micro: int, accumulate: int) -> memory_plan.MemoryPlan:
        return memory_plan.plan_memory(
            model, data.seq_len, micro, layout, checkpointing, every, accumulate=accumulate
        )

    micro, accumulate = resolve_batch(spec, int(cfg.global_batch_size), world, stated, memory, plan_for)
    summary = memory_plan.plan_summary(plan_for(micro, accumulate), accumulate, memory.bytes, memory.source)
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
    """Refuse fp16 (`16-mixed`) on CPU: Lightning has no fp16 AMP there and would silently train in bf16."""
    precision = str(trainer_cfg.get("precision", ""))
    if precision.startswith("16") and resolve_accelerator(trainer_cfg.get("accelerator")) == "cpu":
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


def trainer_kwargs(cfg: DictConfig, plan: RunPlan) -> dict[str, Any]:
    """Keyword arguments of `L.Trainer` from `cfg.trainer` plus what the run-level keys imply."""
    kwargs = dict(plan.trainer)
    kwargs["max_steps"] = plan.max_steps
    kwargs["accumulate_grad_batches"] = plan.accumulate  # derived (batch_plan); a stated value agreed
    kwargs["strategy"] = build_strategy(
        kwargs.get("strategy"), kwargs.get("precision"), accelerator=kwargs.get("accelerator")
    )
    kwargs.setdefault("gradient_clip_val", plan.optim.grad_clip or None)
    if cfg.val_every_n_steps:
        # Lightning counts val_check_interval in micro-batches; ours is in optimizer steps.
        kwargs["val_check_interval"] = int(cfg.val_every_n_steps) * plan.accumulate
        kwargs["check_val_every_n_epoch"] = None
    kwargs.setdefault("default_root_dir", cfg.paths.output_dir)
    if not is_deepspeed(kwargs["strategy"]):
        # DeepSpeed's engine writes its checkpoint directories itself and would not use a CheckpointIO;
        # every .ckpt is written atomically and read back without unpickling code (see checkpoint_io)
        plugins = kwargs.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        kwargs["plugins"] = [*plugins, SafeCheckpointIO(trust_checkpoint=bool(cfg.trust_checkpoint))]
    return kwargs


def build_callbacks(cfg: DictConfig, plan: RunPlan) -> list[L.Callback]:
    """Instantiate `cfg.callbacks` (a name -> `_target_` mapping); fills the throughput monitor's FLOPs.

    A progress bar callback is dropped when `trainer.enable_progress_bar` is false (Lightning refuses both).
    """
    callbacks = []
    show_bar = bool(cfg.trainer.get("enable_progress_bar", True))
    for spec in (cfg.callbacks or {}).values():
        if spec is None:
            continue
        cb = instantiate(spec)
        if isinstance(cb, ProgressBar) and not show_bar:
            continue
        if isinstance(cb, TokenThroughputMonitor) and cb.flops_per_token is None:
            from memoryformer.flops import training_flops_per_token

            cb.flops_per_token = training_flops_per_token(plan.model, plan.data.seq_len)
        callbacks.append(cb)
    if cfg.validate_at_start:
        callbacks.append(ValidateAtStart())
    # every checkpoint records the settings that define the run, so that only this run resumes it
    record = fingerprint_record(cfg, plan.max_steps, plan.world_size, plan.accumulate)
    callbacks.append(RunFingerprint(record))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    """Instantiate every entry of `cfg.logger` (name -> `_target_` mapping); none means no logging."""
    return [instantiate(spec) for spec in (cfg.logger or {}).values() if spec is not None]


def log_lightning_once() -> None:
    """Print each Lightning log line once, through the root logger's handlers when it has any.

    Lightning adds a console handler to its loggers at import, before Hydra configures logging; Hydra's root
    handlers (console and the run's log file) then print every Lightning record a second time. With root
    handlers present, Lightning's console handlers go and its records propagate to root alone. `train.py`
    calls it once Hydra has set up logging; `train(cfg)` called from other code leaves logging alone.
    """
    if not logging.getLogger().handlers:
        return  # nobody else prints them (a plain script or a notebook): keep Lightning's own
    for name in LIGHTNING_LOGGERS:
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's console handler; a user's file stays
                lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True


def train(cfg: DictConfig) -> dict[str, Any]:
    """Check, build and fit one run; returns `{"val_loss", "train_loss", "step", "ckpt_dir", ...}`."""
    plan = check_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_dir = Path(cfg.paths.ckpt_dir)
    check_writable_dir(output_dir, "paths.output_dir")
    if cfg.print_config:
        rank_zero_info(OmegaConf.to_yaml(cfg, resolve=True))
    report_plan(plan, output_dir, write=bool(cfg.get("dry_run")))
    if cfg.get("dry_run"):
        return {"output_dir": str(output_dir), "plan": plan.memory, "dry_run": True}
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    from memoryformer.data.datamodule import LMDataModule

    datamodule = LMDataModule(plan.data, plan.micro_batch_size, plan.model.vocab_size, plan.model.block_size)
    module = LMTrainingModule(
        model=plan.model.to_dict(),
        optim=optim_for_precision(asdict(plan.optim), plan.trainer),
        max_steps=plan.max_steps,
        activation_checkpointing=bool(cfg.activation_checkpointing),
        activation_checkpointing_every=int(cfg.activation_checkpointing_every),
        compile=bool(cfg.compile),
    )
    kwargs = trainer_kwargs(cfg, plan)
    callbacks = [*build_callbacks(cfg, plan), PlanFileWriter(plan, output_dir)]
    trainer = L.Trainer(**kwargs, callbacks=callbacks, logger=build_loggers(cfg) or False)
    summary: dict[str, Any] = {
        "output_dir": str(output_dir),
        "ckpt_dir": str(ckpt_dir),
        "max_steps": plan.max_steps,
        "micro_batch_size": plan.micro_batch_size,
        "world_size": plan.world_size,
    }
    if cfg.validate_only:
        return summary
    with run_lock(output_dir, enabled=is_launching_process()):
        _fit(cfg, plan, trainer, module, datamodule, summary)
    return summary


def report_plan(plan: RunPlan, output_dir: Path, write: bool) -> None:
    """Print the memory plan; with `write`, also write it to `<output_dir>/plan.json` (launching process
    only). A real run writes the file once its data has opened (`PlanFileWriter`), so a run refused for its
    data leaves nothing behind."""
    if plan.memory is None:
        return
    rank_zero_info(memory_plan.format_plan(plan.memory))
    if write and is_launching_process():
        write_plan_file(plan, output_dir)


def write_plan_file(plan: RunPlan, output_dir: Path) -> None:
    """`<output_dir>/plan.json`: the memory plan as `plan_summary` states it (atomic write)."""
    atomic_write_text(output_dir / "plan.json", memory_plan.dumps(plan.memory))


class PlanFileWriter(L.Callback):
    """Writes the run's memory plan to `<output_dir>/plan.json` at setup: Lightning opens the data module
    before the callbacks' `setup`, so the file appears only for a run whose data loaded."""

    def __init__(self, plan: RunPlan, output_dir: Path) -> None:
        self.plan, self.output_dir, self.written = plan, output_dir, False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.plan.memory is not None and not self.written and trainer.is_global_zero:
            write_plan_file(self.plan, self.output_dir)
        self.written = True


def _fit(cfg: DictConfig, plan: RunPlan, trainer: L.Trainer, module, datamodule, summary: dict) -> None:
    """Save the config, pick the checkpoint to resume from, fit, and fill `summary` (run lock held)."""
    output_dir, ckpt_dir = Path(cfg.paths.output_dir), Path(cfg.paths.ckpt_dir)
    trust = bool(cfg.trust_checkpoint)
    if trainer.is_global_zero:
        atomic_write_text(ckpt_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    ckpt_path = agreed_checkpoint(trainer, cfg, plan)
    if ckpt_path is not None and (Path(ckpt_path) / "latest_universal").is_file():
        # DeepSpeed reads its universal format only when its config says so (set before the engine exists)
        trainer.strategy.config.setdefault("checkpoint", {})["load_universal"] = True
    stop = next((cb for cb in trainer.callbacks if isinstance(cb, GracefulStop)), None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
    except SIGTERMException:
        if stop is None or stop.received is None:
            raise
        stop.restore()
        stop.hand_over(trainer)  # a scheduler's warning: requeue now that last.ckpt is written
        # the shell's status of a process ended by the signal (130 for Ctrl+C, 143 for SIGTERM): not a
        # finished run. A launcher then sees a failed worker at once (torchrun's other agents would
        # otherwise wait in their exit barrier for the agent that took the signal)
        raise SIGTERMException(128 + int(stop.received)) from None
    finally:
        if stop is not None:
            stop.restore()
        _finish_wandb(trainer)
    at_start = next((cb for cb in trainer.callbacks if isinstance(cb, ValidateAtStart)), None)
    if at_start is not None and at_start.val_loss is not None:
        summary["initial_val_loss"] = at_start.val_loss

    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    summary.update(
        step=trainer.global_step,
        train_loss=metrics.get("train/loss"),
        val_loss=metrics.get("val/loss"),
        tokenizer_path=datamodule.tokenizer,
    )
    if cfg.export_final and trainer.is_global_zero and not is_deepspeed(trainer.strategy):
        from memoryformer.checkpoint import export_model

        eos = plan.data.eos_token
        export_dir = export_model(module.model, output_dir / "model", datamodule.tokenizer, eos_token=eos)
        summary["export_dir"] = str(export_dir)


def agreed_checkpoint(trainer: L.Trainer, cfg: DictConfig, plan: RunPlan) -> str | None:
    """The checkpoint every rank of the run resumes from (None: start fresh), chosen by global rank 0.

    Every rank searches first (`resume_checkpoint`), so that a checkpoint the run cannot continue is
    refused on every rank before a process group starts. Ranks that a launcher started (torchrun, srun)
    then start the process group early, through the strategy's own set-up (which `fit` then finds done), and
    take rank 0's choice; the ranks Lightning itself starts later inherit it from the launching process's
    environment (`RESUME_FROM_VAR`).
    """
    if not is_launching_process() and RESUME_FROM_VAR in os.environ:
        return os.environ[RESUME_FROM_VAR] or None
    mine = resume_checkpoint(cfg, plan.model, plan.max_steps, plan.world_size)
    if plan.world_size <= 1:
        return mine
    if not trainer.strategy.cluster_environment.creates_processes_externally:
        os.environ[RESUME_FROM_VAR] = mine or ""  # the ranks Lightning starts in fit read it
        return mine
    trainer.strategy.setup_environment()
    chosen = trainer.strategy.broadcast(mine, src=0)
    if chosen != mine:
        log.warning(
            f"rank {trainer.global_rank} found {mine} to resume from, global rank 0 found {chosen}; every "
            f"rank takes rank 0's choice (is the run folder on a file system all nodes share?)."
        )
    return chosen


def _finish_wandb(trainer: L.Trainer) -> None:
    # close the W&B run so that the next job of a multirun (same process) starts its own run
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
