"""Everything `train.py` does after the settings are resolved: build the trainer, its callbacks and
loggers, pick the checkpoint every rank resumes from, fit, stop cleanly on a signal, and export.

`train(cfg)` takes a composed `DictConfig` (from `@hydra.main` or Hydra's compose API in tests) and returns a
summary dict. Its first step, `settings.check_config`, types, checks and resolves the config into a `RunPlan`;
everything after it reads that plan, never `cfg`.

## Checkpoint files

`SafeCheckpointIO`: how every Lightning `.ckpt` of a run is written and read back.

Writing: `torch.save` streams into a temporary file beside the target, which is fsynced and renamed over
it (`memoryformer.atomic_io.atomic_write`), so a process killed mid-save or a disk that fills leaves the
previous `last.ckpt` / `step-*.ckpt` whole. Lightning's own `TorchCheckpointIO` first serialises the whole
checkpoint into memory and then writes through an fsspec transaction whose temporary file lives in the
system temp directory (a copy, not a rename, when that is another file system) and is never fsynced.

Reading (resume through `trainer.fit(ckpt_path=...)`): `memoryformer.checkpoint.safe_torch_load`, i.e.
`weights_only=True` unless the run sets `trust_checkpoint=true`.

DeepSpeed strategies do not use this class for their checkpoints: DeepSpeed's engine writes the checkpoint
directory itself (one file per rank, then the `latest` tag file, none of them renamed into place); see the
README's "Safety and recovery".

## The CSV log

`CSVLogger`: Lightning's CSV logger, except that a resumed run keeps the rows its folder already holds.

Lightning's writer deletes `metrics.csv` when its folder is not empty, so a run that resumes in its own
folder (a requeued SLURM job, a torchrun group restarted after a dead rank) would lose the history of every
step before the resume. This one keeps the file and, at its first write, drops only the rows of steps the
resumed run logs again (those an interrupted run logged after its last checkpoint, which are redone).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from memoryformer.atomic_io import atomic_write, atomic_write_text
from memoryformer.checkpoint import safe_torch_load
from memoryformer.file_lock import run_lock
from memoryformer.launch import is_launching_process
from memoryformer.training import sizing
from memoryformer.training.module import LMTrainingModule, TokenThroughputMonitor, ValidateAtStart
from memoryformer.training.parallel import build_strategy, is_deepspeed
from memoryformer.training.resume import RunFingerprint, resume_checkpoint
from memoryformer.training.settings import RunPlan, check_config, check_writable_dir, optim_for_precision

#: How the launching process hands its resume choice to the ranks Lightning starts (`agreed_checkpoint`).
RESUME_FROM_VAR = "MEMORYFORMER_RESUME_FROM"
log = logging.getLogger(__name__)
#: Loggers to which Lightning attaches its own console handler when it is imported.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


def trainer_kwargs(plan: RunPlan) -> dict[str, Any]:
    """Keyword arguments of `L.Trainer`: the run's `trainer` settings plus what the run-level keys imply."""
    kwargs = dict(plan.trainer)
    kwargs["max_steps"] = plan.max_steps
    kwargs["accumulate_grad_batches"] = plan.accumulate  # derived (batch_plan); a stated value agreed
    kwargs["strategy"] = build_strategy(
        kwargs.get("strategy"), kwargs.get("precision"), accelerator=kwargs.get("accelerator")
    )
    kwargs.setdefault("gradient_clip_val", plan.optim.grad_clip or None)
    if plan.config.val_every_n_steps:
        # Lightning counts val_check_interval in micro-batches; ours is in optimizer steps.
        kwargs["val_check_interval"] = plan.config.val_every_n_steps * plan.accumulate
        kwargs["check_val_every_n_epoch"] = None
    kwargs.setdefault("default_root_dir", str(plan.output_dir))
    if not is_deepspeed(kwargs["strategy"]):
        # DeepSpeed's engine writes its checkpoint directories itself and would not use a CheckpointIO;
        # every .ckpt is written atomically and read back without unpickling code (see checkpoint_io)
        plugins = kwargs.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        kwargs["plugins"] = [*plugins, SafeCheckpointIO(trust_checkpoint=plan.config.trust_checkpoint)]
    return kwargs


def build_callbacks(plan: RunPlan) -> list[L.Callback]:
    """Instantiate the run's `callbacks` (a name -> `_target_` mapping); fills the throughput monitor's FLOPs.

    A progress bar callback is dropped when `trainer.enable_progress_bar` is false (Lightning refuses both).
    """
    callbacks = []
    show_bar = bool(plan.trainer.get("enable_progress_bar", True))
    for spec in (plan.config.callbacks or {}).values():
        if spec is None:
            continue
        cb = instantiate(spec)
        if isinstance(cb, ProgressBar) and not show_bar:
            continue
        if isinstance(cb, TokenThroughputMonitor) and cb.flops_per_token is None:
            from memoryformer.flops import training_flops_per_token

            cb.flops_per_token = training_flops_per_token(plan.model, plan.data.seq_len)
        callbacks.append(cb)
    if plan.config.validate_at_start:
        callbacks.append(ValidateAtStart())
    # every checkpoint records the settings that define the run, so that only this run resumes it
    callbacks.append(RunFingerprint(plan.record))
    return callbacks


def build_loggers(plan: RunPlan) -> list[Any]:
    """Instantiate every entry of the run's `logger` (name -> `_target_` mapping); none means no logging."""
    return [instantiate(spec) for spec in (plan.config.logger or {}).values() if spec is not None]


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
    run = plan.config  # below this line the run reads the resolved plan only
    output_dir, ckpt_dir = plan.output_dir, plan.ckpt_dir
    check_writable_dir(output_dir, "paths.output_dir")
    if run.print_config:
        rank_zero_info(plan.config_yaml)
    report_plan(plan, output_dir, write=run.dry_run)
    if run.dry_run:
        return {"output_dir": str(output_dir), "plan": plan.memory, "dry_run": True}
    L.seed_everything(run.seed, workers=True, verbose=False)

    from memoryformer.data.datamodule import LMDataModule

    datamodule = LMDataModule(plan.data, plan.micro_batch_size, plan.model.vocab_size, plan.model.block_size)
    module = LMTrainingModule(
        model=plan.model.to_dict(),
        optim=optim_for_precision(asdict(plan.optim), plan.trainer),
        max_steps=plan.max_steps,
        activation_checkpointing=run.activation_checkpointing,
        activation_checkpointing_every=run.activation_checkpointing_every,
        compile=run.compile,
    )
    callbacks = [*build_callbacks(plan), PlanFileWriter(plan, output_dir)]
    trainer = L.Trainer(**trainer_kwargs(plan), callbacks=callbacks, logger=build_loggers(plan) or False)
    summary: dict[str, Any] = {
        "output_dir": str(output_dir),
        "ckpt_dir": str(ckpt_dir),
        "max_steps": plan.max_steps,
        "micro_batch_size": plan.micro_batch_size,
        "world_size": plan.world_size,
    }
    if run.validate_only:
        return summary
    with run_lock(output_dir, enabled=is_launching_process()):
        _fit(plan, trainer, module, datamodule, summary)
    return summary


def report_plan(plan: RunPlan, output_dir: Path, write: bool) -> None:
    """Print the memory plan; with `write`, also write it to `<output_dir>/plan.json` (launching process
    only). A real run writes the file once its data has opened (`PlanFileWriter`), so a run refused for its
    data leaves nothing behind."""
    if plan.memory is None:
        return
    rank_zero_info(sizing.format_plan(plan.memory))
    if write and is_launching_process():
        write_plan_file(plan, output_dir)


def write_plan_file(plan: RunPlan, output_dir: Path) -> None:
    """`<output_dir>/plan.json`: the memory plan as `plan_summary` states it (atomic write)."""
    atomic_write_text(output_dir / "plan.json", sizing.dumps(plan.memory))


class PlanFileWriter(L.Callback):
    """Writes the run's memory plan to `<output_dir>/plan.json` at setup: Lightning opens the data module
    before the callbacks' `setup`, so the file appears only for a run whose data loaded."""

    def __init__(self, plan: RunPlan, output_dir: Path) -> None:
        self.plan, self.output_dir, self.written = plan, output_dir, False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.plan.memory is not None and not self.written and trainer.is_global_zero:
            write_plan_file(self.plan, self.output_dir)
        self.written = True


def _fit(plan: RunPlan, trainer: L.Trainer, module, datamodule, summary: dict) -> None:
    """Save the config, pick the checkpoint to resume from, fit, and fill `summary` (run lock held)."""
    trust = plan.config.trust_checkpoint
    if trainer.is_global_zero:
        atomic_write_text(plan.ckpt_dir / "config.yaml", plan.config_yaml)
    ckpt_path = agreed_checkpoint(trainer, plan)
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
    if plan.config.export_final and trainer.is_global_zero and not is_deepspeed(trainer.strategy):
        from memoryformer.checkpoint import export_model

        eos = plan.data.eos_token
        export_dir = export_model(
            module.model, plan.output_dir / "model", datamodule.tokenizer, eos_token=eos
        )
        summary["export_dir"] = str(export_dir)


def agreed_checkpoint(trainer: L.Trainer, plan: RunPlan) -> str | None:
    """The checkpoint every rank of the run resumes from (None: start fresh), chosen by global rank 0.

    Every rank searches first (`resume_checkpoint`), so that a checkpoint the run cannot continue is
    refused on every rank before a process group starts. Ranks that a launcher started (torchrun, srun)
    then start the process group early, through the strategy's own set-up (which `fit` then finds done), and
    take rank 0's choice; the ranks Lightning itself starts later inherit it from the launching process's
    environment (`RESUME_FROM_VAR`).
    """
    if not is_launching_process() and RESUME_FROM_VAR in os.environ:
        return os.environ[RESUME_FROM_VAR] or None
    mine = resume_checkpoint(plan.resume, plan.model, plan.record)
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


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, fsynced `.ckpt` writes and code-free reads (unless `trust_checkpoint`)."""

    def __init__(self, trust_checkpoint: bool = False) -> None:
        super().__init__()
        self.trust_checkpoint = trust_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write `checkpoint` to `path` atomically; raises `AtomicWriteError` (old file intact) on failure."""
        if storage_options is not None:
            raise TypeError(
                f"storage_options={storage_options!r} is not supported by SafeCheckpointIO; drop it."
            )
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read `path` without unpickling code unless this run trusts its checkpoints.

        Lightning passes `weights_only=None` by default; only an explicit `False` from a caller or
        `trust_checkpoint=True` on this object enables full unpickling.
        """
        trust = self.trust_checkpoint or weights_only is False
        return safe_torch_load(
            path, map_location if map_location is not None else "cpu", trust_checkpoint=trust
        )


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's `ExperimentWriter` that appends to an existing `metrics.csv` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self._pending_trim = True
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep what is there (Lightning's removes `metrics.csv`); read its columns so new rows line up."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)

    def save(self) -> None:
        """Write the recorded rows; the first write first drops stored rows at or after its first step."""
        if self.metrics and self._pending_trim:
            self._pending_trim = False
            self._drop_rows_from(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) < step]
        tmp = f"{self.metrics_file_path}.tmp{os.getpid()}"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose `metrics.csv` survives a resume in the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The `KeepingExperimentWriter` of this run's `log_dir`."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


#: Environment variable by which submitit overrides its preemption signal (`core/job_environment.py`).
SUBMITIT_SIGNAL_VAR = "SUBMITIT_PREEMPT_SIGNAL"


def scheduler_warning_signal(environ: dict[str, str] | None = None) -> signal.Signals | None:
    """The signal a scheduler sends ahead of a time limit or preemption, or None outside one.

    Under submitit (hydra's `submitit_slurm` / `submitit_local` launchers) it is SIGUSR2, or the signal
    named by `SUBMITIT_PREEMPT_SIGNAL`, which submitit asks SLURM for (`--signal=USR2@<signal_delay_s>`); in
    a plain SLURM job it is SIGUSR1, which is what `#SBATCH --signal=USR1@<seconds>` asks for.
    """
    env = os.environ if environ is None else environ
    if env.get("SUBMITIT_EXECUTOR") or env.get("SUBMITIT_FOLDER"):
        name = env.get(SUBMITIT_SIGNAL_VAR, "SIGUSR2")
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    if env.get("SLURM_JOB_ID"):
        return signal.SIGUSR1
    return None


class GracefulStop(L.Callback):
    """Stops every rank at the same optimizer step, where `RunCheckpoint` saves `last.ckpt`, on SIGTERM (what
    torchrun, SLURM and Kubernetes send before they kill), SIGINT (Ctrl+C, which torchrun forwards) and a
    scheduler's early warning (`scheduler_warning_signal`), on every rank.

    A handler only records the signal: a rank cannot save alone (DeepSpeed's save and Lightning's barrier are
    collective) and must not run a collective from inside a handler, which may interrupt another one (as
    Lightning's own SIGTERM handler does: it broadcasts from whichever ranks got the signal). At every
    optimizer-step boundary the ranks all-reduce (max) whether any of them has one, on a gloo group so that
    a GPU run does not wait on its stream; then every rank takes Lightning's SIGTERM path at the end of that
    batch. After the save, a scheduler's warning is handed to the handler it displaced (submitit's
    checkpoint-and-requeue; in a plain SLURM job, `scontrol requeue` from global rank 0) by `hand_over()`.
    A second SIGINT more than `abort_after_s` after the first aborts at once (nothing is saved then when
    several ranks run).
    """

    def __init__(self, abort_after_s: float = 2.0) -> None:
        self.abort_after_s = abort_after_s
        self.received: signal.Signals | None = None
        self.stopped_at: int | None = None
        self._first_sigint: float | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._displaced: dict[signal.Signals, Any] = {}
        self._group: Any = None
        self._last_step = -1
        self._warning = scheduler_warning_signal()

    def _signals(self) -> list[signal.Signals]:
        return [signal.SIGTERM, signal.SIGINT, *([self._warning] if self._warning else [])]

    def _install(self, signums: list[signal.Signals]) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # e.g. inside a notebook worker thread: Lightning's own handling stays
        for signum in signums:
            previous = signal.signal(signum, self._on_signal)
            if previous is not self._on_signal and signum not in self._previous:
                self._previous[signum] = previous

    def _on_signal(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self.abort_after_s:
                raise KeyboardInterrupt
            self._first_sigint = self._first_sigint or now
        if self.received is None or sig == self._warning:
            self.received = sig
        rank_zero_info(f"{sig.name} received: stopping every rank after this optimizer step and saving.")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # before Lightning registers its own: it then keeps ours for SIGUSR1 instead of its SLURM requeue
        if stage == "fit":
            self._install(self._signals())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning replaced SIGTERM's handler (after setup) with one that broadcasts inside the handler
        self._install([signal.SIGTERM])
        self._last_step = trainer.global_step
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # inside a gradient accumulation: only whole optimizer steps are saved
        self._last_step = trainer.global_step
        wanted = 0 if self.received is None else int(self.received)
        if self._group is not None:  # a CPU tensor on a gloo group: reading it waits for no GPU stream
            flag = torch.tensor([wanted], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            wanted = int(flag)
        if wanted == 0:
            return
        if self.received is None:  # another rank got it: take the same path
            self.received = signal.Signals(wanted)
        self.stopped_at = trainer.global_step
        # Lightning then raises SIGTERMException at the end of this batch, on every rank alike
        trainer._signal_connector.received_sigterm = True

    def hand_over(self, trainer: L.Trainer) -> None:
        """After the save: pass a scheduler's warning on to the handler it displaced (submitit requeues the
        job and exits from there), or, in a plain SLURM job, requeue it from global rank 0."""
        if self.received is None or self.received != self._warning:
            return
        previous = self._displaced.get(self.received)
        if callable(previous):
            previous(int(self.received), None)
        elif trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            job = os.environ["SLURM_JOB_ID"]
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                rank_zero_info(f"Requeued SLURM job {job}.")
            else:
                rank_zero_warn(f"scontrol requeue {job} failed ({done.stderr.strip()}); resubmit the job.")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers this callback displaced (kept for `hand_over`). Lightning calls no teardown
        hook after an exception (a graceful stop's included) and, before that, reinstalls the handlers it
        found at its start, which were ours: whoever runs `fit` calls this once `fit` has returned."""
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, previous)
        self._displaced.update(self._previous)
        self._previous = {}
