"""Training-time transformations of a plain `LanguageModel`, applied from outside as torchtitan's
`parallelize` does, so that the model's own forward stays pure data flow.

- `apply_activation_checkpointing(model, every)`: blocks 0, n, 2n, ... recompute their activations in
  backward instead of storing them. Parameter names, `state_dict` keys and numbers are unchanged.
- `apply_compile(model)`: `torch.compile`, returning the compiled wrapper for the training forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memoryformer.models.kv_cache import KVCache


class _CheckpointedForward:
    """Stands in for `block.forward`: recomputes the block in backward when training without a KV cache.

    A plain object rather than a closure or a wrapper module: module names stay `blocks.<i>.<...>` (so
    checkpoints and optimizer groups do not change), and `copy.deepcopy` / pickling of the model copy it
    with the block it belongs to.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        forward = type(self.block).forward
        # Decoding appends to the cache, which a recompute would do twice; evaluation stores nothing.
        if self.block.training and kv_cache is None and torch.is_grad_enabled():
            return checkpoint(forward, self.block, x, cos, sin, use_reentrant=False)
        return forward(self.block, x, cos, sin, kv_cache)


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> list[int]:
    """Checkpoint blocks 0, every, 2 * every, ... of `model.blocks`; returns their indices.

    Memory falls by about that share of the blocks' activations while the recompute cost grows by the same
    share (one more forward of each checkpointed block), so `every` trades the two.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"activation checkpointing every={every!r} must be an int >= 1 (1 = every block).")
    indices = list(range(0, len(model.blocks), every))
    for i in indices:
        block = model.blocks[i]
        if not isinstance(block.__dict__.get("forward"), _CheckpointedForward):  # applying twice is a no-op
            block.forward = _CheckpointedForward(block)
    return indices


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks of `model.blocks` that recompute their activations in backward."""
    blocks = enumerate(model.blocks)
    return [i for i, block in blocks if isinstance(block.__dict__.get("forward"), _CheckpointedForward)]


def apply_compile(model: nn.Module) -> nn.Module:
    """`torch.compile(model)`: a wrapper sharing `model`'s parameters, to call for the training forward."""
    return torch.compile(model)
