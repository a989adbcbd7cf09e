"""`LMTrainingModule`: the LightningModule that trains a plain `LanguageModel`.

It owns the loss bookkeeping, the optimizer and the schedule, and nothing model-specific: the model is
`self.model` (so checkpoint keys are `model.<model key>`), built from `hyper_parameters["model"]`, a
`ModelConfig.to_dict()`, which is all a loader needs to rebuild it.
"""

from __future__ import annotations

import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch

from memoryformer.conf_schema import OptimConfig
from memoryformer.config import ModelConfig
from memoryformer.errors import NonFiniteLossError  # the one NonFiniteLossError, also importable from here
from memoryformer.models import LanguageModel
from memoryformer.training.optim import build_optimizer, build_scheduler, group_lrs
from memoryformer.training.parallelize import apply_activation_checkpointing, apply_compile


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
        self.model = LanguageModel(self.model_config)
        if activation_checkpointing:
            apply_activation_checkpointing(self.model, every=activation_checkpointing_every)
        self._compiled: Any = None

    def setup(self, stage: str) -> None:
        """Compile the model for training when asked; the compiled wrapper is kept out of `state_dict`."""
        if self.hparams.compile and self._compiled is None:
            object.__setattr__(self, "_compiled", apply_compile(self.model))

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
        """Mean next-token cross-entropy of one micro-batch; stops the run on a non-finite loss."""
        input_ids, labels = split_batch(batch)
        _, loss = self(input_ids, labels)
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at step {self.global_step} (batch {batch_idx}); the run "
                f"stops "
                f"here and the last checkpoint written before this step is the newest good one. Lower "
                f"optim.lr, keep optim.grad_clip > 0, or try trainer.precision=bf16-mixed / 32-true."
            )
        self.log("train/loss", loss.detach(), on_step=True, prog_bar=True)
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
        """Log the pre-clipping global gradient norm and lr; stop on NaN/inf gradients (not under fp16)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            # fp16 loss scaling skips steps with inf gradients by design: only check other precisions.
            fp16 = str(self.trainer.precision).startswith("16")
            if not fp16 and not torch.isfinite(norm):
                raise NonFiniteLossError(
                    f"gradient norm is {norm.item()} at step {self.global_step}; the run stops before this "
                    f"update, so the newest checkpoint holds the last good weights. Lower optim.lr or "
                    f"check the data."
                )
            self.log("train/grad_norm", norm, on_step=True)
        self.log_learning_rates(optimizer)

    def log_learning_rates(self, optimizer: torch.optim.Optimizer) -> None:
        """Log `lr/blocks`, `lr/embeddings`, `lr/other` (each lr group's lr for this optimizer step) and
        `train/lr`, the schedule's lr (`optim.lr` times the warmup/decay multiplier: the `other` group's)."""
        lrs = group_lrs(optimizer)
        for name, lr in lrs.items():
            self.log(f"lr/{name}", lr, on_step=True)
        self.log("train/lr", lrs.get("other", optimizer.param_groups[0]["lr"]), on_step=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW + per-step LambdaLR schedule (`memoryformer.training.optim`)."""
        optimizer = build_optimizer(self.model, self.optim_config)
        scheduler = build_scheduler(optimizer, self.optim_config, int(self.hparams.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the RNG states so that a resumed run draws the same random numbers."""
        checkpoint["rng_states"] = {
            "python": random.getstate(),
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states written by `on_save_checkpoint` (absent in foreign checkpoints)."""
        states = checkpoint.get("rng_states")
        if not states:
            return
        random.setstate(states["python"])
        np.random.set_state(_numpy_state_from_tensors(states["numpy"]))
        torch.set_rng_state(states["torch"])
        if states["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])
