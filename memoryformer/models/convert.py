"""Conversion between our Pythia-block `LanguageModel` and Hugging Face `GPTNeoXForCausalLM`.

Keys are mapped one by one (`hf_key_map`); tensors are copied unchanged, because our fused QKV linear uses
GPT-NeoX's per-head [q | k | v] layout. The LM head is `lm_head` in transformers >= 5 and `embed_out` in
older versions; both are handled. transformers is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from memoryformer.config import ConfigError, ModelConfig
from memoryformer.models.language_model import LanguageModel

if TYPE_CHECKING:  # pragma: no cover
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

#: Ours -> Hugging Face, per layer (the `{i}` is the layer index).
_LAYER_KEYS = {
    "norm1.weight": "input_layernorm.weight",
    "norm1.bias": "input_layernorm.bias",
    "attn.query_key_value.weight": "attention.query_key_value.weight",
    "attn.query_key_value.bias": "attention.query_key_value.bias",
    "attn.dense.weight": "attention.dense.weight",
    "attn.dense.bias": "attention.dense.bias",
    "norm2.weight": "post_attention_layernorm.weight",
    "norm2.bias": "post_attention_layernorm.bias",
    "ffn.fc_in.weight": "mlp.dense_h_to_4h.weight",
    "ffn.fc_in.bias": "mlp.dense_h_to_4h.bias",
    "ffn.fc_out.weight": "mlp.dense_4h_to_h.weight",
    "ffn.fc_out.bias": "mlp.dense_4h_to_h.bias",
}


def hf_key_map(n_layer: int, head_key: str = "lm_head.weight") -> dict[str, str]:
    """Our state-dict key -> the `GPTNeoXForCausalLM` key, for every parameter of an `n_layer` model."""
    keys = {
        "wte.weight": "gpt_neox.embed_in.weight",
        "norm_f.weight": "gpt_neox.final_layer_norm.weight",
        "norm_f.bias": "gpt_neox.final_layer_norm.bias",
        "lm_head.weight": head_key,
    }
    for i in range(n_layer):
        for ours, theirs in _LAYER_KEYS.items():
            keys[f"blocks.{i}.{ours}"] = f"gpt_neox.layers.{i}.{theirs}"
    return keys


def config_from_hf(hf_config: GPTNeoXConfig) -> ModelConfig:
    """The Pythia-block `ModelConfig` equivalent to a `GPTNeoXConfig` (raises `ConfigError` if none is)."""
    # transformers >= 5 keeps rotary settings in `rope_parameters`; 4.x in `rotary_pct` / `rope_scaling`.
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"GPTNeoXConfig uses rope scaling {rope_type!r}; only plain rotary is supported.")
    if getattr(hf_config, "hidden_act", "gelu") != "gelu":
        raise ConfigError(
            f"GPTNeoXConfig.hidden_act={hf_config.hidden_act!r}; our Pythia block uses exact GELU ('gelu')."
        )
    if not getattr(hf_config, "attention_bias", True):
        raise ConfigError("GPTNeoXConfig.attention_bias=False; our Pythia block has attention biases.")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        raise ConfigError(f"GPTNeoXConfig.head_dim={head_dim} must equal hidden_size / num_attention_heads.")
    pct = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25))
    base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000))
    return ModelConfig(
        name=str(getattr(hf_config, "_name_or_path", "") or "gpt_neox"),
        block="pythia",
        vocab_size=hf_config.vocab_size,
        n_layer=hf_config.num_hidden_layers,
        n_embd=hf_config.hidden_size,
        n_head=hf_config.num_attention_heads,
        block_size=hf_config.max_position_embeddings,
        rotary_pct=float(pct),
        rotary_base=int(base) if float(base).is_integer() else base,
        intermediate_size=hf_config.intermediate_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        parallel_residual=hf_config.use_parallel_residual,
    )


def hf_config_from(config: ModelConfig) -> GPTNeoXConfig:
    """The `GPTNeoXConfig` of a Pythia-block `ModelConfig` (raises `ConfigError` for MemoryFormer)."""
    from transformers import GPTNeoXConfig

    if config.block != "pythia":
        raise ConfigError(
            f"model.block={config.block!r} has no Hugging Face GPT-NeoX equivalent; only model.block=pythia "
            f"converts to transformers."
        )
    return GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.mlp_hidden,
        hidden_act="gelu",
        rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_base,
        max_position_embeddings=config.block_size,
        layer_norm_eps=config.layer_norm_eps,
        use_parallel_residual=config.parallel_residual,
        tie_word_embeddings=False,
    )


def _load_hf(source: Any) -> GPTNeoXForCausalLM:
    from transformers import GPTNeoXForCausalLM

    if isinstance(source, (str, os.PathLike)):
        if not os.path.isdir(source):
            raise FileNotFoundError(
                f"{os.fspath(source)!r} is not a directory; pass a GPTNeoXForCausalLM or a local checkpoint "
                f"directory written by save_pretrained."
            )
        return GPTNeoXForCausalLM.from_pretrained(os.fspath(source), local_files_only=True)
    if not isinstance(source, GPTNeoXForCausalLM):
        raise TypeError(f"from_hf expects a GPTNeoXForCausalLM or a directory, not {type(source).__name__}.")
    return source


def _head_key(hf_params: dict[str, torch.Tensor]) -> str:
    return "embed_out.weight" if "embed_out.weight" in hf_params else "lm_head.weight"


def from_hf(hf_model_or_dir: GPTNeoXForCausalLM | str | os.PathLike) -> LanguageModel:
    """Our Pythia-block `LanguageModel` with the weights of a `GPTNeoXForCausalLM` or local checkpoint dir.

    Tensors keep their dtype and device; the result is in the HF model's train/eval mode.
    """
    hf_model = _load_hf(hf_model_or_dir)
    config = config_from_hf(hf_model.config)
    hf_params = dict(hf_model.named_parameters(remove_duplicate=False))
    head = hf_model.get_output_embeddings()
    key_map = hf_key_map(config.n_layer, _head_key(hf_params))
    unmapped = sorted(set(hf_params) - set(key_map.values()))
    if unmapped:
        raise ConfigError(f"GPTNeoXForCausalLM has parameters our model lacks, e.g. {unmapped[:5]}.")
    state = {}
    for ours, theirs in key_map.items():
        tensor = head.weight if ours == "lm_head.weight" else hf_params[theirs]
        state[ours] = tensor.detach().clone()
    with torch.device("meta"):
        model = LanguageModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.train(hf_model.training)


def to_hf(model: LanguageModel) -> GPTNeoXForCausalLM:
    """A `GPTNeoXForCausalLM` with the weights of our Pythia-block `model` (same dtype and device)."""
    from transformers import GPTNeoXForCausalLM

    hf_config = hf_config_from(model.config)
    params = dict(model.named_parameters())
    reference = params["wte.weight"]
    hf_model = GPTNeoXForCausalLM(hf_config).to(device=reference.device, dtype=reference.dtype)
    hf_params = dict(hf_model.named_parameters(remove_duplicate=False))
    key_map = hf_key_map(model.config.n_layer, _head_key(hf_params))
    missing = sorted(set(hf_params) - set(key_map.values()))
    if missing:
        raise ConfigError(f"GPTNeoXForCausalLM has parameters this converter does not fill: {missing[:5]}.")
    with torch.no_grad():
        for ours, theirs in key_map.items():
            hf_params[theirs].copy_(params[ours])
    return hf_model.train(model.training)
