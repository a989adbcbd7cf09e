"""The training loop: `LMTrainingModule` (the LightningModule around the plain model) and the
callbacks that watch it (throughput and MFU, Memory Layer bucket usage, the loss lines, validation at step
0, the progress bar).

`LMTrainingModule` owns the loss bookkeeping, the optimizer and the schedule, and nothing model-specific:
the model is `self.model` (so checkpoint keys are `model.<model key>`), built from
`hyper_parameters["model"]`, a `ModelConfig.to_dict()`, which is all a loader needs to rebuild it.

FLOP convention: `memoryformer.flops.training_flops_per_token` counts a multiply-add as ONE FLOP (the
paper's convention); the TFLOP/s and MFU logged here use the usual MFU convention of TWO FLOPs per
multiply-add, so `train/tflops` is comparable with a GPU's datasheet peak (e.g. H100 SXM bf16 dense 989).
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from memoryformer.config import ModelConfig
from memoryformer.errors import NonFiniteLossError  # the one NonFiniteLossError, also importable from here
from memoryformer.flops import FLOPS_PER_MAC
from memoryformer.models import LanguageModel
from memoryformer.models.init import init_weights
from memoryformer.nn.bucket_usage import bucket_usage, watch_hashes
from memoryformer.nn.memory_layer import HashCodes
from memoryformer.training.optim import OptimConfig, build_optimizer, build_scheduler, group_lrs
from memoryformer.training.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    is_deepspeed,
    is_zero3,
    materialised_zero3,
    offloads_optimizer,
)
from memoryformer.training.resume import CHECKPOINT_KEY


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [B, T], labels [B, T])` from a dict with those keys or a 2-tuple."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"]
    input_ids, labels = batch
    return input_ids, labels


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    # numpy arrays would make the checkpoint unreadable with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def rescale_micro_batch_progress(checkpoint: dict[str, Any], accumulate: int) -> None:
    """Express the fit loop's micro-batch counters of `checkpoint` in micro-batches of `accumulate` per
    optimizer step, when it was saved by a run that took another number (a resume on more or fewer ranks at
    the same global batch).

    Lightning decides that a micro-batch ends an optimizer step when its count of micro-batches is a multiple
    of `accumulate_grad_batches`. A run saved at step 3 with 1 micro-batch per step and resumed with 2 would
    otherwise step after the first micro-batch, on half the global batch (and count validation cadence in
    the wrong units). Checkpoints are saved at step boundaries, so every count is a whole number of steps.
    """
    there = ((checkpoint.get(CHECKPOINT_KEY) or {}).get("context") or {}).get("accumulate")
    loops = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    progress = loops.get("epoch_loop.batch_progress")
    if not there or there == accumulate or not progress:
        return
    for part in ("total", "current"):
        counts = progress.get(part) or {}
        for key, value in counts.items():
            counts[key] = int(value) // int(there) * accumulate


class LMTrainingModule(L.LightningModule):
    """Next-token training of `LanguageModel(ModelConfig.from_dict(model))`.

    `model`: a `ModelConfig.to_dict()`; `optim`: the `OptimConfig` fields as a dict; `max_steps`: the
    schedule's horizon; `tokenizer_path`: stored for the evaluation loader. Batches hold `input_ids` and
    `labels` `[B, T]` int64; the logged loss is the mean token cross-entropy.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        max_steps: int,
        tokenizer_path: str | None = None,
        activation_checkpointing: bool = False,
        activation_checkpointing_every: int = 1,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig.from_dict(dict(model))
        self.optim_config = OptimConfig.from_dict(dict(optim), saved=True)
        self.optim_config.validate()  # build_optimizer / build_scheduler rely on a known name and schedule
        self._compiled: Any = None
        # Health of the optimizer steps not yet checked, as device tensors: (step, loss summed over the step's
        # micro-batches, gradient norm). Checked and logged together (`_check_steps`), so that a step costs
        # no device-to-host sync of its own.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self._step_loss: torch.Tensor | None = None
        self._clip_norm: torch.Tensor | None = None

    @property
    def model(self) -> LanguageModel:
        """The `LanguageModel`; built by `configure_model` (here on first use outside a Trainer)."""
        if "model" not in self._modules:
            self.configure_model()
        return self._modules["model"]

    def configure_model(self) -> None:
        """Build the model (once): Lightning calls this inside the strategy's sharded-init context, so that
        under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`) each rank only ever holds its shard of the weights.

        Then activation checkpointing and, when asked, a compiled wrapper (kept out of `state_dict`).
        """
        if "model" in self._modules:
            return
        model = LanguageModel(self.model_config)
        if is_zero3(self._trainer.strategy if self._trainer is not None else None):
            # zero.Init partitioned each layer's parameters as it was built, so the model-wide init of
            # LanguageModel.__init__ saw empty tensors: run it again one module at a time, each rank
            # keeping its shard, so that no rank ever holds more than one module's weights whole
            init_weights(model, self.model_config, whole=materialised_zero3)
        if self.hparams.activation_checkpointing:
            apply_activation_checkpointing(model, every=self.hparams.activation_checkpointing_every)
        self._modules["model"] = model  # add_module would call the `model` property (hasattr) and recurse
        if self.hparams.compile:
            object.__setattr__(self, "_compiled", apply_compile(model))

    def on_fit_start(self) -> None:
        """Record the data's tokenizer in the hyper-parameters, so checkpoints name it for the eval loader."""
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer:
            self.hparams["tokenizer_path"] = str(tokenizer)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """`input_ids` `[B, T]` -> `(logits [B, T, V], loss or None)`."""
        model = self._compiled if (self._compiled is not None and self.training) else self.model
        return model(input_ids, labels)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Let the model redraw step-driven randomness (Performer features) for this optimizer step."""
        self.model.begin_training_step(self.global_step)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean next-token cross-entropy of one micro-batch; its finiteness is checked with the step's."""
        input_ids, labels = split_batch(batch)
        _, loss = self(input_ids, labels)
        detached = loss.detach().float()
        self._step_loss = detached if self._step_loss is None else self._step_loss + detached
        self.log("train/loss", detached, on_step=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean next-token cross-entropy of one validation batch, averaged over the epoch and ranks."""
        input_ids, labels = split_batch(batch)
        _, loss = self(input_ids, labels)
        self.log(
            "val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=input_ids.shape[0]
        )
        return loss

    def on_validation_epoch_end(self) -> None:
        """Also log perplexity exp(val/loss) and the optimizer step it was measured at (paper tables)."""
        val = self.trainer.callback_metrics.get("val/loss")
        if val is not None:
            self.log("val/ppl", math.exp(min(float(val), 50.0)), sync_dist=False)
            # optimizer steps taken: the CSV logger's own `step` of a mid-epoch validation is one behind
            self.log("val/at_step", float(self.global_step), sync_dist=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the learning rates of the step about to be taken (the gradient norm is logged by
        `_check_steps`, from the norm that clipping computed)."""
        self.log_learning_rates(optimizer)

    def log_learning_rates(self, optimizer: torch.optim.Optimizer) -> None:
        """Log `lr/blocks`, `lr/embeddings`, `lr/other` (each lr group's lr for this optimizer step) and
        `train/lr`, the schedule's lr (`optim.lr` times the warmup/decay multiplier: the `other` group's)."""
        lrs = group_lrs(optimizer)
        for name, lr in lrs.items():
            self.log(f"lr/{name}", lr, on_step=True)
        self.log("train/lr", lrs.get("other", optimizer.param_groups[0]["lr"]), on_step=True)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global norm as Lightning does, keeping the norm it computes (the logged `grad_norm`).

        Under DeepSpeed the engine clips and reports the norm itself (`_step_grad_norm`), so nothing happens
        here; clipping by value is left to Lightning.
        """
        if is_deepspeed(self.trainer.strategy):
            return
        if gradient_clip_algorithm not in (None, "norm"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        self._clip_norm = norm

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Take the step, then queue its loss and gradient norm for `_check_steps` (run every
        `trainer.log_every_n_steps` steps and before every checkpoint)."""
        step = self.global_step
        engine = self.trainer.strategy.model if is_deepspeed(self.trainer.strategy) else None
        # Lightning calls this once per micro-batch under DeepSpeed, whose engine steps at the boundary
        boundary = engine is None or engine.is_gradient_accumulation_boundary()
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not boundary or self._step_loss is None:
            return
        norm = self._clip_norm if engine is None else engine.get_global_grad_norm()
        if norm is not None:
            norm = torch.as_tensor(norm, dtype=torch.float32).to(self._step_loss.device, non_blocking=True)
        self._pending.append((step, self._step_loss, norm))
        self._step_loss, self._clip_norm = None, None
        if len(self._pending) >= max(1, int(self.trainer.log_every_n_steps or 1)):
            self._check_steps()

    def _check_steps(self) -> None:
        """Log `train/grad_norm` of every queued optimizer step and stop at the first non-finite one.

        One device-to-host copy for all queued steps. fp16 loss scaling skips steps whose gradients
        overflow by design, so a non-finite gradient norm only stops other precisions.
        """
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        nan = torch.tensor(float("nan"), device=pending[0][1].device)
        values = torch.stack(
            [torch.stack([loss, nan if norm is None else norm]) for _, loss, norm in pending]
        )
        fp16 = str(self.trainer.precision).startswith("16")
        for (step, _, norm), (loss_value, norm_value) in zip(pending, values.tolist(), strict=True):
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"training loss is {loss_value} at step {step}; the run stops here and the newest "
                    f"checkpoint holds the last good weights. Lower optim.lr, keep optim.grad_clip > 0, or "
                    f"try trainer.precision=bf16-mixed / 32-true."
                )
            if norm is None:
                continue
            if not fp16 and not math.isfinite(norm_value):
                raise NonFiniteLossError(
                    f"gradient norm is {norm_value} at step {step}; the run stops here and the newest "
                    f"checkpoint holds the last good weights. Lower optim.lr or check the data."
                )
            for logger in self.trainer.loggers:
                logger.log_metrics({"train/grad_norm": norm_value}, step=step)

    def on_train_end(self) -> None:
        """Check and log the steps queued since the last check."""
        self._check_steps()

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW + per-step LambdaLR schedule (`memoryformer.training.optim`); DeepSpeed's CPU Adam when
        DeepSpeed offloads the optimizer step."""
        offload = offloads_optimizer(self.trainer.strategy)
        optimizer = build_optimizer(self.model, self.optim_config, offload=offload)
        scheduler = build_scheduler(optimizer, self.optim_config, int(self.hparams.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the queued steps first (a checkpoint is never written after a non-finite step), then store
        the RNG states so that a resumed run draws the same random numbers."""
        self._check_steps()
        checkpoint["rng_states"] = {
            "python": random.getstate(),
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states written by `on_save_checkpoint` (absent in foreign checkpoints), and count
        the loop's micro-batches in this run's accumulation (`rescale_micro_batch_progress`)."""
        rescale_micro_batch_progress(checkpoint, int(self.trainer.accumulate_grad_batches))
        states = checkpoint.get("rng_states")
        if not states:
            return
        random.setstate(states["python"])
        np.random.set_state(_numpy_state_from_tensors(states["numpy"]))
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


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
