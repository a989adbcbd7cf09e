"""Hugging Face configuration of MemoryFormer (arXiv 2411.12992); self-contained, imports only transformers.

This file is copied into every exported MemoryFormer model directory, next to `modeling_memoryformer.py`,
so that `AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without the memoryformer package.
Field names follow transformers' conventions (`hidden_size`, `num_hidden_layers`, ...) so that tools which
read them (lm-eval's context length, `DynamicCache`) work; `memoryformer.hf.export` maps them to and from
the package's `ModelConfig`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Copies of `memoryformer.config`'s NORM_TYPES, QKV_TYPES, FFN_TYPES and WEIGHTINGS: this file must import
# only transformers (see above); tests/test_hf_export.py checks that the copies agree.
NORMS = ("rmsnorm", "layernorm")
QKV = ("memory", "linear")
FFNS = ("memory_block", "mlp")
WEIGHTINGS = ("l1_prob", "prob")


class MemoryFormerConfig(PretrainedConfig):
    """Every architectural choice of `MemoryFormerForCausalLM` (MemoryFormer blocks only).

    Shapes: tokens `[batch, seq]` with ids `< vocab_size`, width `hidden_size` split into `num_tables` (K)
    chunks of `code_length` (tau) bits (`hidden_size == K * tau`), `num_attention_heads` heads, rotary on
    `int(head_size * rotary_pct)` dims of each head. `max_position_embeddings` is the training context.

    Memory Layers (paper section 2.2-2.3): `weighting` "l1_prob" (released code, ||z||_1 * p(z; t=1)) or
    "prob" (paper Eq. 10, temperature `hash_temperature`); `memory_bias` adds a bias to every Memory Layer.
    Blocks (section 2.4): `qkv` "memory" (three Memory Layers sharing one hash) or "linear"; `ffn`
    "memory_block" (MemoryLayer -> LayerNorm -> MemoryLayer with tau + `expand_bits` bits) or "mlp" (GELU,
    width `intermediate_size`, 0 meaning 4 * hidden_size); `norm` "rmsnorm" (eps `norm_eps`, added outside
    the square root as released) or "layernorm" (eps `layer_norm_eps`).
    """

    model_type = "memoryformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 50304,
        hidden_size: int = 512,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 2048,
        rotary_pct: float = 0.25,
        rotary_base: float = 10000,
        num_tables: int = 64,
        code_length: int = 8,
        expand_bits: int = 2,
        norm: str = "rmsnorm",
        norm_eps: float = 1e-8,
        qkv: str = "memory",
        ffn: str = "memory_block",
        weighting: str = "l1_prob",
        hash_temperature: float = 1.0,
        memory_bias: bool = True,
        intermediate_size: int = 0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        for key, value, allowed in (
            ("norm", norm, NORMS), ("qkv", qkv, QKV), ("ffn", ffn, FFNS), ("weighting", weighting, WEIGHTINGS)
        ):
            if value not in allowed:
                raise ValueError(f"MemoryFormerConfig.{key}={value!r} is not supported; use one of {allowed}")
        if hidden_size != num_tables * code_length:
            raise ValueError(
                f"MemoryFormerConfig.hidden_size={hidden_size} must equal num_tables * code_length = "
                f"{num_tables * code_length}; fix num_tables or code_length."
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rotary_pct = rotary_pct
        self.rotary_base = rotary_base
        self.num_tables = num_tables
        self.code_length = code_length
        self.expand_bits = expand_bits
        self.norm = norm
        self.norm_eps = norm_eps
        self.qkv = qkv
        self.ffn = ffn
        self.weighting = weighting
        self.hash_temperature = hash_temperature
        self.memory_bias = memory_bias
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_size(self) -> int:
        """Dims per attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        """Dims per head that rotate (GPT-NeoX rule: int(head_size * rotary_pct))."""
        return int(self.head_size * self.rotary_pct)
