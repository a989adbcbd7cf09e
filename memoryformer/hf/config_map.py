"""The package's `ModelConfig` <-> the `config.json` of an exported Hugging Face MemoryFormer directory.

`HF_FIELDS` lists every `ModelConfig` field that `modeling_memoryformer.py` implements and its name in
`MemoryFormerConfig`. Export refuses a config whose other fields differ from their dataclass defaults
(`check_exportable`), so a field added to `ModelConfig` later cannot be silently dropped: until the
modeling file implements it and it is listed here, only its default value exports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from memoryformer.config import ConfigError, ModelConfig

MODEL_TYPE = "memoryformer"
ARCHITECTURE = "MemoryFormerForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_memoryformer.MemoryFormerConfig",
    "AutoModel": "modeling_memoryformer.MemoryFormerModel",
    "AutoModelForCausalLM": "modeling_memoryformer.MemoryFormerForCausalLM",
}

#: ModelConfig field -> MemoryFormerConfig key, for every field the Hugging Face modeling file implements.
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "block_size": "max_position_embeddings",
    "rotary_pct": "rotary_pct",
    "rotary_base": "rotary_base",
    "num_tables": "num_tables",
    "code_length": "code_length",
    "expand_bits": "expand_bits",
    "norm": "norm",
    "norm_eps": "norm_eps",
    "qkv": "qkv",
    "ffn": "ffn",
    "weighting": "weighting",
    "temperature": "hash_temperature",  # `temperature` would read as a sampling setting to transformers
    "memory_bias": "memory_bias",
    "intermediate_size": "intermediate_size",
    "layer_norm_eps": "layer_norm_eps",
}
#: Fields that do not change the function the model computes: kept as metadata or dropped.
#: `memory_impl` picks a compute path of the same lookup; the modeling file has its own torch path;
#: `table_init_std` only sets the initialisation, which the exported weights already hold.
NON_ARCHITECTURAL = {"name": "memoryformer_name", "memory_impl": None, "table_init_std": None}


def check_exportable(config: ModelConfig) -> None:
    """Raise `ConfigError` unless the Hugging Face MemoryFormer implements every setting of `config`."""
    if config.block != "memoryformer":
        raise ConfigError(
            f"model.block={config.block!r} is not a MemoryFormer; Pythia blocks export as GPTNeoXForCausalLM."
        )
    for f in dataclasses.fields(ModelConfig):
        if f.name in HF_FIELDS or f.name in NON_ARCHITECTURAL or f.name == "block":
            continue
        default = f.default
        value = getattr(config, f.name)
        if value != default:
            raise ConfigError(
                f"model.{f.name}={value!r} is not implemented by the Hugging Face MemoryFormer "
                f"(memoryformer/hf/modeling_memoryformer.py), which only supports its default {default!r}; "
                f"implement it there and list it in memoryformer.hf.config_map.HF_FIELDS to export it."
            )


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `MemoryFormerConfig` keys of `config` (no transformers bookkeeping); checks `check_exportable`."""
    check_exportable(config)
    out: dict[str, Any] = {hf: getattr(config, ours) for ours, hf in HF_FIELDS.items()}
    out["memoryformer_name"] = config.name
    return out


def from_hf_config(raw: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a MemoryFormer `config.json` mapping (raises `ConfigError` on a missing key)."""
    missing = [hf for hf in HF_FIELDS.values() if hf not in raw]
    if missing:
        raise ConfigError(
            f"the MemoryFormer config.json lacks {missing}; re-export the model with memoryformer.export."
        )
    values: dict[str, Any] = {ours: raw[hf] for ours, hf in HF_FIELDS.items()}
    values["name"] = raw.get("memoryformer_name") or "memoryformer"
    return ModelConfig(block="memoryformer", **values)
