"""Training callbacks: throughput/MFU, Memory Layer bucket usage, loss printing, checkpoints, interrupts.

FLOP convention: `memoryformer.flops.training_flops_per_token` counts a multiply-add as ONE FLOP (the
paper's convention); the TFLOP/s and MFU logged here use the usual MFU convention of TWO FLOPs per
multiply-add, so `train/tflops` is comparable with a GPU's datasheet peak (e.g. H100 SXM bf16 dense 989).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import lightning as L
import torch
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
    SIGTERM or SIGINT (see `GracefulInterrupt`) stops the run at a batch end, so that `ckpt_path=last`
    always continues from the newest state. Other exceptions (e.g. a NaN loss) save nothing, so the newest
    checkpoint stays the last good one.
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
        """On SIGTERM / SIGINT write `last.ckpt` and say how to resume; other exceptions keep the old one."""
        super().on_exception(trainer, pl_module, exception)  # honours save_on_exception if a user sets it
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        path = self._write_last(trainer)
        if path:
            rank_zero_info(
                f"Interrupted at step {trainer.global_step}: saved {path}; resume with ckpt_path=last or "
                f"ckpt_path={path}."
            )


class GracefulInterrupt(L.Callback):
    """SIGINT (Ctrl+C) takes SIGTERM's path: finish the current batch, save `last.ckpt`, exit.

    Lightning turns SIGTERM into a `SIGTERMException` at the next batch end, from which `RunCheckpoint`
    saves. A plain Ctrl+C would raise KeyboardInterrupt in the middle of a step instead, so while training
    this callback answers SIGINT by sending the process SIGTERM, through Lightning's own public handler.
    """

    def __init__(self) -> None:
        self._previous: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler after on_fit_start, before on_train_start.
        if trainer.is_global_zero or trainer.world_size == 1:
            try:
                self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                self._previous = None

    @staticmethod
    def _on_sigint(signum: int, frame: Any) -> None:
        rank_zero_info("SIGINT received: stopping after this batch and saving a checkpoint.")
        os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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
