"""What `make cluster-check` (scripts/cluster_check.py) observes inside each rank, as a Lightning callback.

`ClusterProbe` appends one JSON line per event to `<events_dir>/rank<global rank>.jsonl`:

- `start`: the rank's pid, host, world size, the step training starts at, the checkpoint Lightning restored
  (`trainer.ckpt_path`), torchrun's restart count and the run folder;
- `step` (global rank 0 only): the optimizer step just completed, the mean training loss of its whole
  global batch (every rank's micro-batch losses, all-reduced), so that runs on different world sizes at the
  same global batch compare step by step, and a digest of the weights rank 0 holds after the step (under
  ZeRO-3 its partition), which equals across runs only when the weights are equal bit for bit;
- `stop`: the step at which an exception (a graceful stop's included) ended training on this rank.

With `slow_save_flag` it also stretches every checkpoint save made while that file exists: after each file
a save writes (`torch.save`), it records a `saving` event and sleeps `slow_save_s`, so that the harness can
kill the processes while a save is half written. It is loaded into train.py with
`+callbacks.cluster_probe._target_=cluster_probe.ClusterProbe` and `scripts/` on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of the bytes of every parameter this rank holds: the whole parameter, or under
    ZeRO-3 this rank's partition of it (`ds_tensor`)."""
    h = hashlib.sha256()
    for p in module.parameters():
        held = getattr(p, "ds_tensor", None)
        held = p if held is None else held
        h.update(held.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class ClusterProbe(L.Callback):
    """Writes the events above to `events_dir` (see the module docstring)."""

    def __init__(self, events_dir: str, slow_save_flag: str | None = None, slow_save_s: float = 5.0) -> None:
        self.events_dir = Path(events_dir)
        self.slow_save_flag = None if slow_save_flag is None else Path(slow_save_flag)
        self.slow_save_s = slow_save_s
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self._last_step = -1
        self._rank = 0

    def _write(self, event: str, **fields: Any) -> None:
        self.events_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"event": event, "rank": self._rank, "time": time.time(), **fields})
        with open(self.events_dir / f"rank{self._rank}.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank
        if self.slow_save_flag is not None:
            self._stretch_saves(trainer)

    def _stretch_saves(self, trainer: L.Trainer) -> None:
        real_save = torch.save
        probe = self

        def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            real_save(obj, f, *args, **kwargs)
            if probe.slow_save_flag.exists() and trainer.state.fn == "fit":
                probe._write("saving", step=trainer.global_step, file=str(getattr(f, "name", f)))
                time.sleep(probe.slow_save_s)

        torch.save = slow_save

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._write(
            "start",
            pid=os.getpid(),
            host=socket.gethostname(),
            world=trainer.world_size,
            step=trainer.global_step,
            ckpt=None if trainer.ckpt_path is None else str(trainer.ckpt_path),
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            run_dir=str(trainer.default_root_dir),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands back each micro-batch's loss divided by the accumulation: their sum over one
        # optimizer step is this rank's mean loss, and the mean over the ranks is the global batch's
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._loss_sum += loss.detach().double().cpu()
        if trainer.global_step == self._last_step:
            return  # inside a gradient accumulation
        self._last_step = trainer.global_step
        total = self._loss_sum.clone()
        self._loss_sum.zero_()
        if trainer.world_size > 1:
            dist.all_reduce(total)
        if trainer.is_global_zero:
            mean = float(total) / trainer.world_size
            digest = weights_digest(pl_module)
            world = trainer.world_size
            self._write("step", step=trainer.global_step, loss=mean, world=world, digest=digest)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Record the step at which `exception` ended training on this rank."""
        self._write("stop", step=trainer.global_step, exception=type(exception).__name__)
