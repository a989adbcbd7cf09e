"""The KV cache of generation and evaluation: per layer, the keys and values (or a recurrent core's state)
of the positions already processed. A leaf module: the attention modules and every attention core use it.
"""

from __future__ import annotations

from typing import Any

import torch


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
