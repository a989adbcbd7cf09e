"""`LanguageModel`: token embedding -> N blocks -> final norm -> untied LM head.

One class for both architectures; `config.block` picks MemoryFormer or Pythia (GPT-NeoX) blocks. The model
knows nothing about Lightning, distribution or activation checkpointing: training wraps it
(`memoryformer.training.parallel`), evaluation calls `forward` (optionally with a `KVCache`), and
`generate` samples with the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.blocks import build_block
from memoryformer.models.init import init_weights
from memoryformer.models.kv_cache import KVCache
from memoryformer.nn.chunked_loss import DEFAULT_CHUNK_TOKENS, ChunkedLossHead
from memoryformer.nn.norms import build_norm
from memoryformer.nn.rotary import rotary_cos_sin

IGNORE_INDEX = -100


class LanguageModel(nn.Module):
    """A causal language model: ids `[B, T]` -> logits `[B, T, vocab_size]`.

    Parts: `wte` (nn.Embedding), `blocks` (nn.ModuleList of `config.n_layer` blocks), `norm_f` (final norm:
    `config.norm` for MemoryFormer, LayerNorm for Pythia) and `lm_head` (`ChunkedLossHead`: nn.Linear, no
    bias, untied, which also computes the training loss).
    Parameters are initialised as in the released code (`memoryformer.models.init`).

    Incremental decoding (evaluation, `generate`): `cache = model.new_kv_cache()`, then
    `model(prompt, kv_cache=cache)` and `model(next_tokens, kv_cache=cache)`; positions continue at
    `cache.length` and may not pass `block_size` (call `cache.reset()` and re-feed a cropped window).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layer))
        if config.is_memoryformer:
            self.norm_f = build_norm(config.norm, config.n_embd, config.resolved_norm_eps)
        else:
            self.norm_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.lm_head = ChunkedLossHead(config.n_embd, config.vocab_size)
        #: tokens per chunk of the training loss (see `forward`); a plain attribute, not a config value
        self.loss_chunk_tokens = DEFAULT_CHUNK_TOKENS
        init_weights(self, config)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(logits, loss)` for ids `idx` `[B, T]`.

        Without `targets`: logits `[B, T, vocab]` and None. With `targets` `[B, T]`: None and the mean
        cross-entropy over targets != -100 (float32), computed `loss_chunk_tokens` tokens at a time
        (`memoryformer.nn.chunked_loss`), so the `[B, T, vocab]` fp32 logits of a training micro-batch are
        never held at once; call `logits(...)` without targets for those. With `kv_cache`, `idx` continues
        the sequence at position `kv_cache.length` and the cache advances by T.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, seq] token ids, got shape {tuple(idx.shape)}.")
        start = kv_cache.length if kv_cache is not None else 0
        t = idx.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(
                f"positions {start}..{start + t - 1} exceed model.block_size={self.config.block_size}; "
                f"crop the input to the last {self.config.block_size} tokens."
            )
        x = self.wte(idx)
        positions = torch.arange(start, start + t, device=idx.device)
        cos, sin = rotary_cos_sin(positions, self.config.rotary_ndims, self.config.rotary_base, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(t)
        hidden = self.norm_f(x)
        if targets is None:
            return self.lm_head(hidden), None
        # inside the head's forward, around which DeepSpeed ZeRO-3 gathers its partitioned weight
        return None, self.lm_head(hidden, targets, IGNORE_INDEX, self.loss_chunk_tokens)

    # ------------------------------------------------------------------ utilities
    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty `KVCache` for this model, holding up to `max_len` (default `block_size`) positions."""
        return KVCache(self.config.n_layer, max_len or self.config.block_size)

    @torch.no_grad()
    def begin_training_step(self, step: int) -> None:
        """Tell step-driven modules (Performer feature redraws) that optimizer step `step` starts.

        Called by the training loop before each training batch; a pure function of `step`, so gradient
        accumulation, activation recompute and resumed runs all see the same features.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "begin_training_step"):
                module.begin_training_step(step)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; `exclude_embeddings` leaves out `wte` and `lm_head` (Pythia's convention)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.wte.weight.numel() + self.lm_head.weight.numel()
        return total

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Extend `idx` `[B, T]` by up to `max_new_tokens` tokens; returns `[B, T + n]`.

        Greedy (argmax) when `greedy` or `temperature == 0`, else samples softmax(logits / temperature),
        restricted to the `top_k` most likely tokens and then to the smallest set whose probability reaches
        `top_p` (nucleus sampling), when given. The model sees at most the last `block_size` tokens, as if
        the full (cropped) sequence were recomputed every step; the KV cache (`use_cache`) gives the same
        result and is rebuilt from the cropped window once it is full. With `eos_token_id`, finished rows
        keep emitting it and generation stops when all rows finished. `stream` yields the same tokens.
        """
        steps = self.stream(
            idx, max_new_tokens, temperature, top_k, greedy, eos_token_id, use_cache, generator, top_p
        )
        new = list(steps)
        return torch.cat((idx, torch.stack(new, dim=1)), dim=1) if new else idx

    @torch.no_grad()
    def stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of each row, `[B]`, as it is chosen (see `generate` for the arguments)."""
        block_size = self.config.block_size
        cache = self.new_kv_cache() if use_cache else None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        pending = idx  # tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -block_size:])
            else:
                if cache.length + pending.shape[1] > block_size:
                    cache.reset()
                    pending = idx[:, -block_size:]
                logits, _ = self(pending, kv_cache=cache)
            next_token = _sample_next_token(
                logits[:, -1].float(), temperature, top_k, greedy, generator, top_p
            )
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            pending = next_token[:, None]
            yield next_token
            if eos_token_id is not None and bool(finished.all()):
                break


def _sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    greedy: bool,
    generator: torch.Generator | None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Next token per row from last-position logits `[B, V]` -> `[B]`: argmax when greedy, else sampled
    after temperature, top-k and top-p (nucleus) filtering."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy).")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1]; 1 keeps every token.")
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = _nucleus(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens of `[B, V]` logits until their probability reaches `top_p`; mask the rest.

    A token is dropped when the tokens ranked above it already hold >= top_p of the mass, so the most likely
    token always stays (Holtzman et al. 2020, as in transformers' TopPLogitsWarper up to ties).
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def build_model(config_or_name: ModelConfig | str | Mapping[str, Any], **overrides: Any) -> LanguageModel:
    """A `LanguageModel` from a `ModelConfig`, a preset name (`ModelConfig.from_name`) or a plain mapping.

    `overrides` replace config fields (e.g. `build_model("nano", block_size=64)`). To build without
    allocating memory: `with torch.device("meta"): model = build_model(name)`.
    """
    if isinstance(config_or_name, str):
        config = ModelConfig.from_name(config_or_name, **overrides)
    elif isinstance(config_or_name, ModelConfig):
        config = config_or_name
        if overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    elif isinstance(config_or_name, Mapping):
        config = ModelConfig.from_dict({**dict(config_or_name), **overrides})
    else:
        raise TypeError(
            f"build_model takes a ModelConfig, a preset name or a mapping, "
            f"not {type(config_or_name).__name__}."
        )
    return LanguageModel(config)
