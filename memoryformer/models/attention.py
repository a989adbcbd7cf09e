"""Causal multi-head attention for both block types: the projections around an attention core.

`MemoryFormerAttention` computes Q, K, V with one Memory Layer whose tables hold the paper's three side by
side (they share one hash of the input) and has no output projection (paper section 2.4 and 3.1; released
code `del_dense: true`). `NeoXAttention` is
GPT-NeoX's: one fused `query_key_value` linear whose output is laid out per head as [q | k | v], and a
`dense` output projection. Both hand Q, K, V to an attention core chosen by `config.attention`
(`memoryformer.models.attention_cores`: the default `softmax` core applies rotary and calls `attend`, the
efficient ones are the paper's Table 2); generation's `KVCache` lives in `memoryformer.models.kv_cache`.
"""

from __future__ import annotations

import torch
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.attention_cores import build_attention_core
from memoryformer.models.kv_cache import KVCache
from memoryformer.nn.memory_layer import MemoryLayer

#: Q, K and V: the parts of `MemoryFormerAttention.qkv`'s output, each `n_embd` wide.
QKV_PARTS = 3


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """`[B, T, H * hs]` -> `[B, H, T, hs]` (a view; `x` may be a column slice of a wider tensor)."""
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


class MemoryFormerAttention(nn.Module):
    """MemoryFormer attention: Q, K, V from the input, causal MHA, no output projection.

    `qkv` computes `[q | k | v]`, `[B, T, 3d]`, in one layer. With `config.qkv == "memory"` it is one
    `MemoryLayer(hashed_width, 3d)` (tau = `config.code_length`): the paper's three Memory Layers Q, K and V
    hash the same input, so they share every code and weight (released code `_forward_memory_qkv`) and differ
    only in their tables and biases; storing the three tables side by side, `tables[:, :d]` = Q's,
    `[:, d:2d]` = K's, `[:, 2d:]` = V's (and the bias alike), turns three lookups and three table-gradient
    scatters into one of rows three times as wide. With "linear" it is `nn.Linear(d, 3d)` (the authors'
    ablation), rows laid out the same way. Forward: `[B, T, d]` -> `[B, T, d]`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.n_embd = d = config.n_embd
        # Table 3's d = 510 row: hash the first K * tau dims, output the full d (see ModelConfig.hashed_width)
        self.hashed_width = config.resolved_hashed_width if config.qkv == "memory" else d
        if config.qkv == "memory":
            self.qkv: nn.Module = MemoryLayer(
                self.hashed_width, QKV_PARTS * d, code_length=config.code_length, weighting=config.weighting,
                temperature=config.temperature, bias=config.memory_bias, impl=config.memory_impl,
            )
        else:
            self.qkv = nn.Linear(d, QKV_PARTS * d)
        self.core = build_attention_core(config, layer_idx)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """`x` `[B, T, d]` (already normalised) -> `[B, T, d]`."""
        if isinstance(self.qkv, MemoryLayer):
            x = hashed_part(x, self.hashed_width)
        q, k, v = (split_heads(t, self.n_head) for t in self.qkv(x).split(self.n_embd, dim=-1))
        return self.core(q, k, v, cos, sin, kv_cache)


def hashed_part(x: torch.Tensor, width: int) -> torch.Tensor:
    """The first `width` dims of `x` `[..., d]`: the part a Memory Layer hashes (all of `x` if width = d)."""
    return x if x.shape[-1] == width else x[..., :width].contiguous()


class NeoXAttention(nn.Module):
    """GPT-NeoX attention: fused QKV linear (per-head [q | k | v] layout), causal MHA, dense output.

    `query_key_value`: `nn.Linear(d, 3d)`; its output viewed as `[B, T, H, 3 * hs]` splits into q, k, v
    along the last dim, exactly as GPT-NeoX and Hugging Face `GPTNeoXAttention` do, so weights map 1:1.
    Forward: `[B, T, d]` -> `[B, T, d]`.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        d = config.n_embd
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)
        self.core = build_attention_core(config, layer_idx)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """`x` `[B, T, d]` (already normalised) -> `[B, T, d]`."""
        b, t, d = x.shape
        qkv = self.query_key_value(x).view(b, t, self.n_head, 3 * (d // self.n_head)).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.dense(self.core(q, k, v, cos, sin, kv_cache))
