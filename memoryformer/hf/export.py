"""Write a `LanguageModel` as a Hugging Face model directory (what `memoryformer.checkpoint.export_model`
and `python -m memoryformer.export` produce).

MemoryFormer blocks: `config.json` (`model_type` "memoryformer", `architectures`, `auto_map`),
`configuration_memoryformer.py` + `modeling_memoryformer.py` (copied from this package, self-contained),
`model.safetensors` (our keys with a `model.` prefix, `lm_head.weight` unchanged).
Pythia blocks: a plain `GPTNeoXForCausalLM` directory (`config.json` from transformers' `GPTNeoXConfig`,
keys mapped by `memoryformer.models.convert.hf_key_map`), no remote code.
Both: the tokenizer (`tokenizer.json`, `tokenizer_config.json` with eos = bos = pad = the end-of-text token)
when one is given, and `generation_config.json`. Nothing is pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from memoryformer.config import EOS_TOKEN, ConfigError, ModelConfig
from memoryformer.hf.config_map import ARCHITECTURE, AUTO_MAP, MODEL_TYPE, check_exportable, to_hf_config

HERE = Path(__file__).resolve().parent
#: Files copied into a MemoryFormer export; `modeling_...` imports `configuration_...` relatively.
CODE_FILES = ("configuration_memoryformer.py", "modeling_memoryformer.py")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: Key prefix of the base model in `MemoryFormerForCausalLM` (everything but the LM head).
BASE_PREFIX = "model."
HEAD_KEY = "lm_head.weight"


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MemoryFormer state dict -> `MemoryFormerForCausalLM` keys (`model.` prefix, LM head unchanged)."""
    return {k if k == HEAD_KEY else BASE_PREFIX + k: v for k, v in state.items()}


def from_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state`."""
    return {k[len(BASE_PREFIX) :] if k.startswith(BASE_PREFIX) else k: v for k, v in state.items()}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage; our weights are untied, so a clone is exact.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def _dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def write_tokenizer(out: Path, tokenizer_path: str, eos_token: str, block_size: int) -> int | None:
    """Copy `tokenizer_path` to `out/tokenizer.json` and write `tokenizer_config.json`; returns the id of
    `eos_token` (used as eos, bos and pad, the GPT-NeoX convention), or None when the vocabulary lacks it."""
    from tokenizers import Tokenizer

    shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    eos_id = Tokenizer.from_file(str(out / TOKENIZER_FILE)).token_to_id(eos_token)
    meta: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,  # our training data has no BOS; the end-of-text token separates documents
        "add_eos_token": False,
    }
    if eos_id is not None:
        meta.update(bos_token=eos_token, eos_token=eos_token, pad_token=eos_token)
    _write_json(out / TOKENIZER_CONFIG_FILE, meta)
    return eos_id


def _special_ids(eos_id: int | None) -> dict[str, int]:
    return {} if eos_id is None else {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}


def hf_unsupported(config: ModelConfig) -> str | None:
    """Why `config` cannot be written as a Hugging Face model (one sentence), or None when it can."""
    if config.is_memoryformer:
        try:
            check_exportable(config)
        except ConfigError as err:
            return str(err)
        return None
    if config.attention != "softmax":
        return (
            f"model.attention={config.attention!r} has no GPTNeoXForCausalLM equivalent (Hugging Face's "
            f"GPT-NeoX only has softmax attention)."
        )
    return None


def export_hf(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer_path: str | None = None,
    eos_token: str = EOS_TOKEN,
) -> Path:
    """Write `model` (a `LanguageModel`) as a Hugging Face directory `out_dir` (see the module docstring).

    Weights keep their dtype, which `config.json` records. Raises `memoryformer.config.ConfigError` when
    the model uses a setting the Hugging Face MemoryFormer does not implement (nothing is written then).
    """
    config: ModelConfig = model.config
    hf_config = to_hf_config(config) if config.is_memoryformer else None  # check before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, *CODE_FILES):  # a re-export must not mix models
        (out / stale).unlink(missing_ok=True)
    eos_id = None
    if tokenizer_path is not None:
        eos_id = write_tokenizer(out, tokenizer_path, eos_token, config.block_size)
    special = _special_ids(eos_id)
    state = model.state_dict()
    if hf_config is not None:
        for name in CODE_FILES:
            shutil.copyfile(HERE / name, out / name)
        meta = {
            **hf_config,
            **special,
            "model_type": MODEL_TYPE,
            "architectures": [ARCHITECTURE],
            "auto_map": AUTO_MAP,
            "dtype": _dtype_name(model),
            "tie_word_embeddings": False,
            "use_cache": True,
        }
        _write_json(out / CONFIG_FILE, meta)
        _save_weights(to_hf_state(state), out / WEIGHTS_FILE)
    else:
        _export_gpt_neox(model, out, special)
    _write_json(out / GENERATION_CONFIG_FILE, {**special, "do_sample": False})
    return out


def _export_gpt_neox(model: torch.nn.Module, out: Path, special: dict[str, int]) -> None:
    from memoryformer.models.convert import hf_config_from, hf_key_map

    hf_config = hf_config_from(model.config)
    hf_config.architectures = ["GPTNeoXForCausalLM"]
    for key, value in special.items():
        setattr(hf_config, key, value)
    hf_config.dtype = next(model.parameters()).dtype
    hf_config.save_pretrained(str(out))
    key_map = hf_key_map(model.config.n_layer)
    _save_weights({key_map[k]: v for k, v in model.state_dict().items()}, out / WEIGHTS_FILE)
