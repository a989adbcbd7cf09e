"""Hugging Face implementation of MemoryFormer (arXiv 2411.12992); self-contained, imports only torch and
transformers.

This file is copied into every exported MemoryFormer model directory, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without the memoryformer package.
It re-implements, in plain torch, the package's `LanguageModel` with MemoryFormer blocks; parameter names
are the package's with a `model.` prefix (the LM head stays `lm_head`). tests/test_hf_export.py holds the
logits of the two equal on random configs, so a change to one that the other lacks fails there.

    x1  = x + Attn(Norm1(x))            [Q | K | V]: one Memory Layer (one hash, three tables side by side)
                                        or one Linear, no W_O
    out = x1 + FFN(Norm2(x1))           FFN: Memory Block (MemoryLayer -> LayerNorm -> MemoryLayer) or MLP

Memory Layer (paper Eq. 10-11): split x `[..., K * tau]` into K chunks z_k of tau values; the sign bits of
z_k (MSB first, 0 counts as +) pick row code_k of table k; the output is sum_k w_k * row_k (+ bias), with
w_k = ||z_k||_1 * prod_j sigmoid(2|z_kj|) ("l1_prob") or prod_j sigmoid(2|z_kj| / t) ("prob").

The KV cache is a transformers `Cache` (a `DynamicCache` unless the caller passes another), holding keys
(after rotary) and values `[batch, heads, seq, head_size]` per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_memoryformer import MemoryFormerConfig

try:  # transformers >= 5: these initialisers skip tensors already loaded from the checkpoint
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4.x
    from torch.nn import init

#: LayerNorm eps between the two Memory Block layers (the released code's torch default).
MEMORY_BLOCK_NORM_EPS = 1e-5


# ------------------------------------------------------------------------------------------ rotary
def rotary_cos_sin(
    positions: torch.Tensor, rotary_ndims: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-NeoX rotary angles: positions `[B, T]` -> cos, sin `[B, 1, T, rotary_ndims]` (float32 math)."""
    even = torch.arange(0, rotary_ndims, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (base ** (even / rotary_ndims))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first r dims of each head (pairs i, i + r/2). x `[B, H, T, hs]`, cos/sin `[B, 1, T, r]`."""
    r = cos.shape[-1]
    if r == 0:
        return x
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


# ------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    """`scale * x / (sqrt(mean(x**2)) + eps)` in >= float32 (released code): `[..., d]` -> `[..., d]`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d]` -> `[..., d]`, same dtype as `x`."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rms = torch.linalg.vector_norm(xf, ord=2, dim=-1, keepdim=True) * self.dim**-0.5
        return (xf / (rms + self.eps) * self.scale).to(x.dtype)


def build_norm(config: MemoryFormerConfig) -> nn.Module:
    """The pre-hash norm `config.norm` names, of width `hidden_size`."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class MemoryLayer(nn.Module):
    """`nn.Linear(in_features, out_features)` computed by K = in_features / code_length table lookups.

    `tables` `[K * 2**code_length, out_features]` (row = code + k * 2**code_length), optional `bias`.
    Forward: `[..., in_features]` -> `[..., out_features]`; `hash(x)` gives rows and weights `[..., K]`
    that layers reading the same input can share (`forward(x, hashed=...)`).
    """

    def __init__(
        self, in_features: int, out_features: int, code_length: int, weighting: str, temperature: float,
        bias: bool,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.code_length = code_length
        self.num_tables = in_features // code_length
        self.weighting, self.temperature = weighting, temperature
        self.tables = nn.Parameter(torch.empty(self.num_tables << code_length, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def hash(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[..., K * tau]` -> (int64 rows `[..., K]` into `tables`, float weights `[..., K]`, >= fp32)."""
        tau = self.code_length
        z = x.unflatten(-1, (self.num_tables, tau))
        bit_weights = 1 << torch.arange(tau - 1, -1, -1, device=x.device, dtype=torch.int64)
        offsets = torch.arange(self.num_tables, device=x.device, dtype=torch.int64) << tau
        rows = ((z >= 0).to(torch.int64) * bit_weights).sum(dim=-1) + offsets
        a = z.to(torch.promote_types(z.dtype, torch.float32)).abs()
        if self.weighting == "prob":
            weights = torch.exp(F.logsigmoid(a * (2.0 / self.temperature)).sum(dim=-1))
        else:  # the product as exp(sum(logsigmoid)), so that long codes do not underflow
            weights = a.sum(dim=-1) * torch.exp(F.logsigmoid(2.0 * a).sum(dim=-1))
        return rows, weights

    def forward(
        self, x: torch.Tensor, hashed: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`[..., in_features]` -> `[..., out_features]` in the tables' dtype (sums in at least fp32)."""
        rows, weights = self.hash(x) if hashed is None else hashed
        lead = rows.shape[:-1]
        rows, weights = rows.reshape(-1, self.num_tables), weights.reshape(-1, self.num_tables)
        tables = self.tables
        if tables.device.type == "cpu" and tables.dtype not in (torch.float32, torch.float64):
            # CPU embedding_bag would sum low-precision rows in their own dtype: read an fp32 copy instead.
            y = F.embedding_bag(rows, tables.float(), mode="sum", per_sample_weights=weights.float())
            y = y.to(tables.dtype)
        else:
            y = F.embedding_bag(rows, tables, mode="sum", per_sample_weights=weights.to(tables.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def memory_layer(config: MemoryFormerConfig, d_in: int, d_out: int, code_length: int) -> MemoryLayer:
    """A Memory Layer with the config's weighting, temperature and bias."""
    return MemoryLayer(
        d_in, d_out, code_length, config.weighting, config.hash_temperature, config.memory_bias
    )


class MemoryBlock(nn.Module):
    """FFN replacement: MemoryLayer(d -> K(tau+e)) -> LayerNorm -> MemoryLayer(K(tau+e) -> d, tau+e bits)."""

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__()
        d, tau, e = config.hidden_size, config.code_length, config.expand_bits
        hidden = config.num_tables * (tau + e)
        self.layer1 = memory_layer(config, d, hidden, tau)
        self.norm = nn.LayerNorm(hidden, eps=MEMORY_BLOCK_NORM_EPS)
        self.layer2 = memory_layer(config, hidden, d, tau + e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, d]` -> `[B, T, d]`."""
        return self.layer2(self.norm(self.layer1(x)))


class MLP(nn.Module):
    """`fc_out(gelu(fc_in(x)))` with exact (erf) GELU: `[..., d]` -> `[..., d]`."""

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__()
        hidden = config.intermediate_size or 4 * config.hidden_size
        self.fc_in = nn.Linear(config.hidden_size, hidden)
        self.fc_out = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., d]` -> `[..., d]`."""
        return self.fc_out(F.gelu(self.fc_in(x)))


class MemoryFormerAttention(nn.Module):
    """Causal multi-head attention with no output projection: `[B, T, d]` -> `[B, T, d]`.

    `qkv` gives `[q | k | v]` `[B, T, 3d]`: one Memory Layer whose tables hold Q's, K's and V's side by side
    (the three share one hash of the input, so one lookup reads all three), or one Linear(d, 3d).
    """

    def __init__(self, config: MemoryFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.num_attention_heads
        self.layer_idx = layer_idx
        d = config.hidden_size
        if config.qkv == "memory":
            self.qkv: nn.Module = memory_layer(config, d, 3 * d, config.code_length)
        else:
            self.qkv = nn.Linear(d, 3 * d)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """x `[B, T, d]`, cos/sin `[B, 1, T, r]`, mask bool `[B, 1, T, S]` (True = attend) or None for plain
        causal attention over the cache plus the new tokens -> `[B, T, d]`."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        t_all = k.shape[-2]
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif t == t_all:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # queries start mid-sequence: is_causal would align the mask to the wrong corner
            q_pos = torch.arange(t_all - t, t_all, device=q.device)
            causal = torch.arange(t_all, device=q.device)[None, :] <= q_pos[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return y.transpose(1, 2).reshape(b, t, d)


class MemoryFormerBlock(nn.Module):
    """One pre-norm, sequential-residual MemoryFormer layer: `[B, T, d]` -> `[B, T, d]`."""

    def __init__(self, config: MemoryFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = build_norm(config)
        self.attn = MemoryFormerAttention(config, layer_idx)
        self.norm2 = build_norm(config)
        self.ffn = MemoryBlock(config) if config.ffn == "memory_block" else MLP(config)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        """See `MemoryFormerAttention.forward` for the arguments; `[B, T, d]` -> `[B, T, d]`."""
        x = x + self.attn(self.norm1(x), cos, sin, mask, cache)
        return x + self.ffn(self.norm2(x))


# ------------------------------------------------------------------------------------------ models
class MemoryFormerPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading glue shared by the MemoryFormer models."""

    config_class = MemoryFormerConfig
    config: MemoryFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["MemoryFormerBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        # Only used for a freshly built model; from_pretrained fills every tensor from model.safetensors.
        std = self.config.initializer_range
        if isinstance(module, MemoryLayer):
            init.normal_(module.tables, mean=0.0, std=std)
            if module.bias is not None:
                init.normal_(module.bias, mean=0.0, std=0.001)
        elif isinstance(module, RMSNorm):
            init.ones_(module.scale)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


def _new_cache(config: MemoryFormerConfig) -> Cache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4.x: DynamicCache() takes no config
        return DynamicCache()


class MemoryFormerModel(MemoryFormerPreTrainedModel):
    """Embedding -> blocks -> final norm: ids `[B, T]` -> hidden states `[B, T, hidden_size]`."""

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(MemoryFormerBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = build_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """ids `[B, T]` (or `inputs_embeds` `[B, T, d]`), continuing the cache -> hidden states `[B, T, d]`.

        `attention_mask` `[B, past + T]` (1 = token, 0 = padding) masks padded keys; positions count the
        unpadded tokens (`cumsum(mask) - 1`) unless `position_ids` `[B, T]` are given.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds to MemoryFormerModel.")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = _new_cache(self.config)
        cache = past_key_values if use_cache or past_key_values is not None else None
        past = cache.get_seq_length() if cache is not None else 0
        b, t = x.shape[:2]
        mask = _padding_mask(attention_mask, past, t, x.device)
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=x.device)[None].expand(b, t)
        cos, sin = rotary_cos_sin(position_ids, self.config.rotary_ndims, self.config.rotary_base, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        x = self.norm_f(x)
        out = BaseModelOutputWithPast(last_hidden_state=x, past_key_values=cache if use_cache else None)
        return out if return_dict is not False else out.to_tuple()


def _padding_mask(
    attention_mask: torch.Tensor | None, past: int, t: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean `[B, 1, T, past + T]` mask (True = attend), or None when nothing is padded (plain causal)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:  # already expanded: bool (True = attend) or additive float (0 = attend)
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if bool(attention_mask.all()):
        return None  # the causal fast path, the same kernels as the memoryformer package's model
    s = past + t
    keep = attention_mask[:, -s:].bool()
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None] & keep[:, None, :]
    # A padding query would see no key at all (a NaN row): let every query see itself.
    mask |= (k_pos == q_pos)[None]
    return mask[:, None]


class MemoryFormerForCausalLM(MemoryFormerPreTrainedModel, GenerationMixin):
    """`MemoryFormerModel` plus an untied LM head: ids `[B, T]` -> logits `[B, T, vocab_size]`.

    Supports `generate` with a KV cache (`past_key_values`, a transformers `Cache`); `labels` `[B, T]`
    give the mean next-token cross-entropy (labels shifted inside, -100 ignored).
    """

    def __init__(self, config: MemoryFormerConfig) -> None:
        super().__init__(config)
        self.model = MemoryFormerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits `[B, T, V]` (the last `logits_to_keep` positions when > 0), loss, and the cache."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
        return result if return_dict is not False else result.to_tuple()


__all__ = ["MemoryFormerForCausalLM", "MemoryFormerModel", "MemoryFormerPreTrainedModel"]
