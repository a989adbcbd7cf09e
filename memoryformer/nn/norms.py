"""Normalisation layers used before every hash: RMSNorm as in the released code, or LayerNorm.

The released MemoryFormer code (a GPT-NeoX fork) normalises with GPT-NeoX's RMSNorm: it divides by
`rms(x) + eps` (eps outside the square root, default 1e-8) and has a learnable `scale` and no bias.
We keep that exact formula so that the authors' checkpoints load and behave the same.
"""

from __future__ import annotations

import torch
from torch import nn

from memoryformer.config import NORM_TYPES, check_choice


class RMSNorm(nn.Module):
    """`y = scale * x / (sqrt(mean(x**2)) + eps)` over the last dim; `[..., dim]` -> `[..., dim]`.

    Computed in at least float32 (then cast back) so that bf16/fp16 activations do not lose the small
    coordinates whose signs the following Memory Layer hashes.
    """

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Scale to 1."""
        nn.init.ones_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., dim]` -> `[..., dim]`, same dtype as `x`."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rms = torch.linalg.vector_norm(xf, ord=2, dim=-1, keepdim=True) * self.dim**-0.5
        return (xf / (rms + self.eps) * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """`RMSNorm(dim, eps)` for kind "rmsnorm", `nn.LayerNorm(dim, eps)` for "layernorm"."""
    check_choice("norm", kind, NORM_TYPES)
    return RMSNorm(dim, eps=eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)
