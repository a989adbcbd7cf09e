"""Causal multi-head attention for both block types, and the KV cache used by generation/evaluation.

`MemoryFormerAttention` computes Q, K, V with one Memory Layer whose tables hold the paper's three side by
side (they share one hash of the input) and has no output projection (paper section 2.4 and 3.1; released
code `del_dense: true`). `NeoXAttention` is
GPT-NeoX's: one fused `query_key_value` linear whose output is laid out per head as [q | k | v], and a
`dense` output projection. Both hand Q, K, V to an attention core chosen by `config.attention`: the
default `softmax` core applies rotary and calls `attend`; the efficient ones of the paper's Table 2 live in
`memoryformer.models.efficient_attention`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.efficient_attention import build_attention_core
from memoryformer.nn.memory_layer import MemoryLayer
from memoryformer.nn.rotary import apply_rotary


class KVCache:
    """Keys and values of the positions already processed, for every layer.

    Use: `cache = model.new_kv_cache()`; `logits, _ = model(prompt, kv_cache=cache)` processes the prompt
    at positions `0..T-1`; each later `model(next_tokens, kv_cache=cache)` continues at position
    `cache.length`. The model advances `length` after each forward. `reset()` empties it (keeps memory).

    Buffers per layer: keys and values `[B, n_head, max_len, head_size]`, allocated on first use with the
    dtype and device of the keys, so the same cache works on CPU, GPU, fp32 or bf16. Recurrent attention
    cores (Performer, cosFormer) store a per-layer state object instead (`get_state` / `set_state`): their
    memory does not grow with the number of positions.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer = n_layer
        self.max_len = max_len
        self.length = 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.states: list[Any] = [None] * n_layer

    def get_state(self, layer: int) -> Any:
        """The recurrent state a core stored for `layer` (None before its first forward)."""
        return self.states[layer]

    def set_state(self, layer: int, state: Any) -> None:
        """Store `layer`'s recurrent state after the new positions (the model advances `length` later)."""
        self.states[layer] = state

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` `[B, H, T, hs]` at positions `length..length+T-1`; return all keys/values so far.

        Returns two `[B, H, length + T, hs]` views. `length` itself moves only in `advance`, once all layers
        have stored the same new positions.
        """
        start, end = self.length, self.length + k.shape[-2]
        if end > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions but {end} were requested; build it with a "
                f"larger max_len or call reset()."
            )
        cached_k = self.keys[layer]
        if cached_k is None or cached_k.shape[0] != k.shape[0] or cached_k.dtype != k.dtype:
            if start:
                raise ValueError("the KV cache got a new batch size or dtype mid-sequence; call reset().")
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.empty(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark `n` more positions as stored (called by the model after all layers ran)."""
        self.length += n

    def reset(self) -> None:
        """Forget all positions; the key/value buffers are reused, recurrent states dropped."""
        self.length = 0
        self.states = [None] * self.n_layer


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: KVCache | None = None,
    layer_idx: int = 0,
) -> torch.Tensor:
    """Rotary + causal softmax attention. q, k, v `[B, H, T, hs]`, cos/sin `[T, r]` -> `[B, T, H * hs]`.

    Scale 1/sqrt(hs). With a cache, the new queries sit at positions `cache.length..` and see every cached
    key plus the new keys up to their own position.
    """
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv_cache is not None:
        k, v = kv_cache.update(layer_idx, k, v)
    t_new, t_all = q.shape[-2], k.shape[-2]
    if t_new == t_all:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif t_new == 1:
        y = F.scaled_dot_product_attention(q, k, v)
    else:
        # is_causal aligns the mask to the top-left corner, which is wrong when queries start mid-sequence.
        q_pos = torch.arange(t_all - t_new, t_all, device=q.device)
        mask = torch.arange(t_all, device=q.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, t, hs = y.shape
    return y.transpose(1, 2).reshape(b, t, h * hs)


#: Q, K and V: the parts of `MemoryFormerAttention.qkv`'s output, each `n_embd` wide.
QKV_PARTS = 3


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """`[B, T, H * hs]` -> `[B, H, T, hs]` (a view; `x` may be a column slice of a wider tensor)."""
    b, t, d = x.shape
    return x.view(b, t, n_head, d // n_head).transpose(1, 2)


class MemoryFormerAttention(nn.Module):
    """MemoryFormer attention: Q, K, V from the input, causal MHA, no output projection.

    `qkv` computes `[q | k | v]`, `[B, T, 3d]`, in one layer. With `config.qkv == "memory"` it is one
    `MemoryLayer(hash_width, 3d)` (tau = `config.code_length`): the paper's three Memory Layers Q, K and V
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
        self.hash_width = config.hash_width if config.qkv == "memory" else d
        if config.qkv == "memory":
            self.qkv: nn.Module = MemoryLayer(
                self.hash_width, QKV_PARTS * d, code_length=config.code_length, weighting=config.weighting,
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
            x = hashed_part(x, self.hash_width)
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
