"""`SafeCheckpointIO`: how every Lightning `.ckpt` of a run is written and read back.

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
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from memoryformer.atomic_io import atomic_write
from memoryformer.checkpoint import safe_torch_load


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
