"""The two transformer blocks: MemoryFormer (released code) and Pythia (GPT-NeoX).

MemoryFormer, pre-norm sequential residual (paper section 2.4, released `ParallelTransformerLayer`):
    x1  = x + Attn(Norm1(x))                   Attn = Memory-Layer Q/K/V, shared hash, no W_O
    out = x1 + MemoryBlock(Norm2(x1))          MemoryBlock = MemoryLayer -> LayerNorm -> MemoryLayer
                                               (-> GELU -> LayerNorm -> with memory_block_activation=gelu)
Pythia, GPT-NeoX parallel residual:
    out = x + Attn(LN1(x)) + MLP(LN2(x))       (sequential when `parallel_residual` is False)
Both blocks name their parts `norm1`, `attn`, `norm2`, `ffn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.attention import MemoryFormerAttention, NeoXAttention, hashed_part
from memoryformer.models.kv_cache import KVCache
from memoryformer.nn.memory_layer import MemoryLayer
from memoryformer.nn.norms import build_norm

#: LayerNorm between the two Memory Block layers: the released code's torch default.
MEMORY_BLOCK_NORM_EPS = 1e-5


class MemoryBlock(nn.Module):
    """The Memory Block that replaces the FFN: `[B, T, d]` -> `[B, T, d]`, no activation by default.

    `layer1`: MemoryLayer(hashed width -> K(tau+e), tau bits); `act`: identity, or GELU with
    `memory_block_activation=gelu` (paper Table 6); `norm`: LayerNorm(K(tau+e), eps 1e-5);
    `layer2`: MemoryLayer(K(tau+e) -> d, tau+e bits), with e = `expand_bits`. Layer 2 reads the same K
    chunks as layer 1, each now tau+e wide, so its tables have 2**e times as many rows (paper Table 5).
    Layer 1 hashes the first `config.resolved_hashed_width` dims of its input (all d but in Table 3's d = 510
    row).

    The GELU sits BEFORE the LayerNorm. The norm is there to zero-centre layer 2's hash input so that its sign
    bits are balanced (paper section 2.4); GELU's output is skewed positive, so applying it after the norm
    would undo that, and since sign(GELU(x)) = sign(x) it would not change a single hash code there, only
    the weights. Before the norm it acts like the FFN's activation between its two layers.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hidden, tau = config.n_embd, config.memory_block_hidden, config.code_length
        self.hashed_width = config.resolved_hashed_width
        common = dict(
            weighting=config.weighting, temperature=config.temperature, bias=config.memory_bias,
            impl=config.memory_impl,
        )
        self.layer1 = MemoryLayer(self.hashed_width, hidden, code_length=tau, **common)
        self.act: nn.Module = nn.GELU() if config.memory_block_activation == "gelu" else nn.Identity()
        self.norm = nn.LayerNorm(hidden, eps=MEMORY_BLOCK_NORM_EPS)
        self.layer2 = MemoryLayer(hidden, d, code_length=tau + config.expand_bits, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, d]` -> `[B, T, d]`."""
        return self.layer2(self.norm(self.act(self.layer1(hashed_part(x, self.hashed_width)))))


class MLP(nn.Module):
    """Dense feed-forward `fc_out(gelu(fc_in(x)))`, biases, exact (erf) GELU: `[..., d]` -> `[..., d]`."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d, hidden)
        self.fc_out = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d]` -> `[..., d]`."""
        return self.fc_out(F.gelu(self.fc_in(x)))


class MemoryFormerBlock(nn.Module):
    """One MemoryFormer layer (pre-norm, sequential residual): `[B, T, d]` -> `[B, T, d]`.

    Norms are `config.norm` with eps `config.resolved_norm_eps` (RMSNorm's as released, or LayerNorm's);
    the FFN is the Memory Block or, with `config.ffn == "mlp"`, a 4x GELU MLP.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.norm1 = build_norm(config.norm, config.n_embd, config.resolved_norm_eps)
        self.attn = MemoryFormerAttention(config, layer_idx)
        self.norm2 = build_norm(config.norm, config.n_embd, config.resolved_norm_eps)
        if config.ffn == "memory_block":
            self.ffn: nn.Module = MemoryBlock(config)
        else:
            self.ffn = MLP(config.n_embd, config.mlp_hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """`x` `[B, T, d]`, rotary cos/sin `[T, r]` -> `[B, T, d]`."""
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache)
        return x + self.ffn(self.norm2(x))


class PythiaBlock(nn.Module):
    """One GPT-NeoX (Pythia) layer: LayerNorms, fused-QKV attention with dense output, 4x GELU MLP.

    Parallel residual `x + attn(ln1(x)) + mlp(ln2(x))` (Pythia), or sequential when
    `config.parallel_residual` is False. `[B, T, d]` -> `[B, T, d]`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.norm1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = NeoXAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.ffn = MLP(config.n_embd, config.mlp_hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """`x` `[B, T, d]`, rotary cos/sin `[T, r]` -> `[B, T, d]`."""
        attn_out = self.attn(self.norm1(x), cos, sin, kv_cache)
        if self.parallel_residual:
            return x + attn_out + self.ffn(self.norm2(x))
        x = x + attn_out
        return x + self.ffn(self.norm2(x))


def build_block(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The block `config.block` names, for layer `layer_idx` (its index into the KV cache)."""
    if config.block == "memoryformer":
        return MemoryFormerBlock(config, layer_idx)
    return PythiaBlock(config, layer_idx)
