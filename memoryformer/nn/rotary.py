"""Rotary position embedding, GPT-NeoX style (partial rotary, `rotate_half` layout).

Only the first `rotary_ndims` dims of each head rotate (GPT-NeoX `rotary_pct`, 25% for Pythia and the
released MemoryFormer). Within those dims, dim i is paired with dim i + rotary_ndims / 2 and the pair turns
by the angle `pos * base**(-2i / rotary_ndims)`. The angles are computed on the fly in float32 from the
positions: there is no buffer, so a model built on the meta device needs no re-initialisation here.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(
    positions: torch.Tensor, rotary_ndims: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles: positions `[T]` (int) -> two `[T, rotary_ndims]` tensors.

    The angles are the same for both halves of the rotary dims (`cat(freqs, freqs)`), as `apply_rotary`
    expects. Computed in float32, then cast to `dtype` (the activations' dtype).
    """
    even = torch.arange(0, rotary_ndims, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (base ** (even / rotary_ndims))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[..., r]` -> `[..., r]`: (x1, x2) -> (-x2, x1) with x1, x2 the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of each head. `x`: `[B, H, T, head_size]`, cos/sin `[T, r]`."""
    r = cos.shape[-1]
    if r == 0:
        return x
    x_rot, x_pass = x[..., :r], x[..., r:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1)
