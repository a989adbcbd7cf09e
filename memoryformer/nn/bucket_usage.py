"""Which hash buckets the Memory Layers of a model use (the paper's Fig. 4 claims near-uniform usage).

`watch_hashes` hooks every Memory Layer of a model and hands each forward's `HashCodes` to a function;
`bucket_counts` / `bucket_usage` count the buckets those codes hit. The training callback
`BucketUsageMonitor` and `reproduction/hash_stats.py` are both built on these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from memoryformer.nn.memory_layer import HashCodes, MemoryLayer


def bucket_counts(codes: torch.Tensor, code_length: int) -> torch.Tensor:
    """Hits of every bucket of every table: codes `[..., K]` in `[0, 2**tau)` -> int64 `[K, 2**tau]`."""
    k = codes.shape[-1]
    flat = codes.reshape(-1, k).long() + (torch.arange(k, device=codes.device) << code_length)
    return torch.bincount(flat.reshape(-1), minlength=k << code_length).view(k, 1 << code_length)


def bucket_usage(codes: torch.Tensor, code_length: int) -> torch.Tensor:
    """Share of the 2**tau buckets of each table hit at least once. `codes` `[..., K]` -> `[K]` in (0, 1]."""
    return (bucket_counts(codes, code_length) > 0).float().mean(dim=1)


def watch_hashes(model: nn.Module, fn: Callable[[str, HashCodes], None]) -> list[RemovableHandle]:
    """After each forward of each `MemoryLayer` in `model` (named as in `named_modules`), call
    `fn(name, hashed)` without gradient, with the `HashCodes` that forward looked up: the `hashed` it was
    passed (q, k and v share one), else the layer's hash of its input, computed again.

    Returns the hooks' handles; call `.remove()` on each to stop watching.
    """

    def hook_for(name: str):
        def hook(module: MemoryLayer, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            with torch.no_grad():
                hashed = kwargs.get("hashed") or (args[1] if len(args) > 1 else None) or module.hash(args[0])
                fn(name, hashed)

        return hook

    return [
        m.register_forward_hook(hook_for(name), with_kwargs=True)
        for name, m in model.named_modules()
        if isinstance(m, MemoryLayer)
    ]
