"""Training callbacks: throughput/MFU, Memory Layer bucket usage, loss printing, checkpoints, interrupts.

FLOP convention: `memoryformer.flops.training_flops_per_token` counts a multiply-add as ONE FLOP (the
paper's convention); the TFLOP/s and MFU logged here use the usual MFU convention of TWO FLOPs per
multiply-add, so `train/tflops` is comparable with a GPU's datasheet peak (e.g. H100 SXM bf16 dense 989).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from memoryformer.flops import FLOPS_PER_MAC
from memoryformer.nn.bucket_usage import bucket_usage, watch_hashes
from memoryformer.nn.memory_layer import HashCodes


def _batch_tokens(batch: Any) -> int:
    ids = batch["input_ids"] if isinstance(batch, dict) else batch[0]
    return int(ids.numel())


class TokenThroughputMonitor(L.Callback):
    """Logs `train/tokens_seen`, `train/tokens_per_s`, `train/tflops` and (with a peak) `train/mfu`.

    Measured per optimizer step, all ranks together (`tokens per rank x world size`), wall time between
    consecutive step ends with validation time excluded. `flops_per_token` is in multiply-adds (paper
    convention) and is doubled here; `peak_tflops_per_device` uses the same 2-FLOPs-per-MAC convention.
    Not Lightning's `ThroughputMonitor`: that one needs a batch-size function and logs samples, not tokens.
    """

    def __init__(
        self, flops_per_token: float | None = None, peak_tflops_per_device: float | None = None
    ) -> None:
        self.flops_per_token = flops_per_token
        self.peak_tflops_per_device = peak_tflops_per_device
        self.tokens_seen = 0
        self._step_tokens = 0
        self._last_step = -1
        self._t_last: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._t_last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._step_tokens += _batch_tokens(batch) * trainer.world_size
        if trainer.global_step == self._last_step:
            return  # still accumulating gradients
        self._last_step = trainer.global_step
        now = time.perf_counter()
        dt = now - (self._t_last or now)
        self._t_last = now
        self.tokens_seen += self._step_tokens
        metrics = {"train/tokens_seen": float(self.tokens_seen)}
        if dt > 0:
            tps = self._step_tokens / dt
            metrics["train/tokens_per_s"] = tps
            if self.flops_per_token:
                tflops = FLOPS_PER_MAC * self.flops_per_token * tps / 1e12
                metrics["train/tflops"] = tflops
                if self.peak_tflops_per_device:
                    metrics["train/mfu"] = tflops / (self.peak_tflops_per_device * trainer.world_size)
        self._step_tokens = 0
        pl_module.log(
            "train/tokens_per_s", metrics.pop("train/tokens_per_s", 0.0), prog_bar=True, on_step=True
        )
        pl_module.log_dict(metrics, on_step=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last = time.perf_counter()  # validation time is not training throughput

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])


class BucketUsageMonitor(L.Callback):
    """Every `every_n_steps`, logs per Memory Layer the mean hash weight and the share of buckets used.

    Keys: `hash/<layer>/weight_mean`, `buckets/<layer>/used_min` and `used_mean` (over the K tables), and
    model-wide `buckets/used_min` and `hash/weight_mean`. A table whose codes collapse onto a few buckets is
    a training bug, so a table using at most `collapse_share` of its buckets also triggers a warning.
    """

    def __init__(self, every_n_steps: int = 50, collapse_share: float = 1 / 64) -> None:
        self.every_n_steps = every_n_steps
        self.collapse_share = collapse_share
        self._hooks: list[Any] = []
        self._stats: dict[str, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.every_n_steps <= 0 or self._hooks or trainer.global_step % self.every_n_steps:
            return
        self._hooks = watch_hashes(getattr(pl_module, "model", pl_module), self._record)

    def _record(self, name: str, hashed: HashCodes) -> None:
        # reduced at once: keeping every layer's codes until the batch ends would cost GPU memory
        self._stats[name] = {
            "used": bucket_usage(hashed.codes(), hashed.code_length),
            "weight_mean": hashed.weights.float().mean(),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._hooks:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not self._stats:
            return
        metrics: dict[str, float] = {}
        for name, s in self._stats.items():
            metrics[f"buckets/{name}/used_min"] = float(s["used"].min())
            metrics[f"buckets/{name}/used_mean"] = float(s["used"].mean())
            metrics[f"hash/{name}/weight_mean"] = float(s["weight_mean"])
        used_min = min(float(s["used"].min()) for s in self._stats.values())
        metrics["buckets/used_min"] = used_min
        metrics["hash/weight_mean"] = sum(float(s["weight_mean"]) for s in self._stats.values()) / len(
            self._stats
        )
        if used_min <= self.collapse_share:
            worst = min(self._stats, key=lambda n: float(self._stats[n]["used"].min()))
            rank_zero_warn(
                f"Memory Layer {worst!r} has a table using only {used_min:.2%} of its buckets at step "
                f"{trainer.global_step}: its hash has collapsed (check the norm before the hash and the lr)."
            )
        self._stats = {}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


@rank_zero_only
def _print(line: str) -> None:
    print(line, flush=True)


class LossPrinter(L.Callback):
    """Prints one plain line every `every_n_steps` optimizer steps and after each validation (rank 0).

    The rich progress bar redraws in place; these lines stay in `make train`'s output and in log files.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        self.every_n_steps = every_n_steps
        self._last = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last or step % self.every_n_steps:
            return
        self._last = step
        m = trainer.callback_metrics
        parts = [f"step {step:>6}/{trainer.max_steps}"]
        for key, fmt in (("train/loss", ".4f"), ("train/lr", ".2e"), ("train/tokens_per_s", ",.0f")):
            if key in m:
                parts.append(f"{key.split('/')[-1]} {float(m[key]):{fmt}}")
        _print(" | ".join(parts))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val/loss")
        if val is not None:
            _print(f"step {trainer.global_step:>6} | val/loss {float(val):.4f}")


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


class ValidateAtStart(L.Callback):
    """Validates the untrained model once, inside `fit`, before the first step of a fresh run (`val/loss` at
    step 0); a resumed run (step > 0) skips it.

    It runs the fit loop's own validation loop on the engine that trains, so every strategy takes the same
    path on CPU and CUDA. `trainer.validate()` before `fit` would instead make Lightning build a DeepSpeed
    inference engine first (which fails on DeepSpeed's CPU accelerator for want of a device index, and on
    CUDA sets ZeRO up twice). `val_loss` holds the result.
    """

    def __init__(self) -> None:
        self.val_loss: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            return
        trainer.validating = True
        trainer.fit_loop.epoch_loop.val_loop.run()
        trainer.training = True
        val = trainer.callback_metrics.get("val/loss")
        self.val_loss = None if val is None else float(val)


class StepProgressBar(RichProgressBar):
    """Rich's progress bar counting optimizer steps of `trainer.max_steps`: `step 120/8000`.

    Runs here are sized by `max_steps` with `max_epochs=-1`, so Lightning's own bar would read `Epoch 0/-2`
    and count micro-batches of one epoch; this one shows the run's real progress.

    The metrics beside it (`prog_bar=True`: train/loss, train/tokens_per_s) are read from the Trainer only
    at the logging cadence during training (`get_metrics`): Lightning turns each into a Python number with
    `.item()`, a device-to-host sync, and its own bar does so after every micro-batch.
    """

    _shown: dict[str, Any] | None = None
    _shown_step = -1

    @property
    def total_train_batches(self) -> int | float:
        """The bar's total: `max_steps` when the run is sized in steps, else Lightning's batch count."""
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Lightning's bar metrics, read again during training only when the optimizer step count reaches a
        new multiple of `trainer.log_every_n_steps` (in the micro-batch that completes that step, where
        Lightning logs and `LossPrinter` prints too); otherwise the numbers last read."""
        if trainer.training and self._shown is not None:
            step, every = trainer.global_step, max(1, int(trainer.log_every_n_steps or 1))
            if step == self._shown_step or step % every:
                return self._shown
        self._shown = super().get_metrics(trainer, pl_module)
        self._shown_step = trainer.global_step
        return self._shown

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_step(trainer)

    def _show_step(self, trainer: L.Trainer) -> None:
        if self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        total = self.total_train_batches
        text = f"step {trainer.global_step}/{total}"
        if self.theme.description:  # the markup Lightning's bar puts around its descriptions
            text = f"[{self.theme.description}]{text}"
        self.progress.update(self.train_progress_bar_id, completed=trainer.global_step, total=total,
                             description=text)
        self.refresh()
