"""Load a trained `LanguageModel` from any checkpoint format we write, and export one for evaluation.

Three formats are recognised by `load_model(path)`:

1. An exported model directory (`export_model`), a Hugging Face model directory (`memoryformer.hf.export`):
   `config.json` with `model_type` "memoryformer" (our remote-code `MemoryFormerForCausalLM`) or "gpt_neox"
   (Pythia rows, plain `GPTNeoXForCausalLM`), `model.safetensors` and optionally `tokenizer.json`.
   The package's own format, written for a model Hugging Face cannot run (`export_model`): `config.json` =
   `{"model": ModelConfig.to_dict(), "tokenizer": "tokenizer.json" | null}`, our state dict in
   `model.safetensors`.
2. A Lightning `.ckpt` file: `state_dict` keys are `model.<our key>`; `hyper_parameters["model"]` holds
   the model config (a dict, or a preset name); `hyper_parameters["tokenizer_path"]` optionally the tokenizer.
3. A DeepSpeed checkpoint directory written by Lightning's `DeepSpeedStrategy` (a `latest` file and one
   folder per tag). It is consolidated to fp32 with Lightning's `convert_zero_checkpoint_to_fp32_state_dict`
   (needs `pip install memoryformer[deepspeed]`) and then read like format 2.

Every failure is a `CheckpointError` whose message is one sentence naming the file and the fix.

Files are read with `torch.load(weights_only=True)` (`safe_torch_load`): unpickling runs no code, and a
file that needs more than tensors and plain containers is refused with `UnsafeCheckpointError` unless the
caller passes `trust_checkpoint=True` (the user's explicit opt-in for a file from a source they trust).
Exports are written to a temporary directory and renamed into place (`memoryformer.atomic_io`).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memoryformer.atomic_io import atomic_directory
from memoryformer.config import EOS_TOKEN, ConfigError, ModelConfig, to_plain
from memoryformer.errors import CheckpointError, UnsafeCheckpointError, first_line  # also importable here

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
LIGHTNING_PREFIX = "model."
#: `model_type` values of the Hugging Face directories we export (and read back).
HF_MODEL_TYPES = ("memoryformer", "gpt_neox")


#: Globals a checkpoint may reference besides tensors and plain containers: pure value types whose
#: reconstruction runs no user code (Lightning may store a `dirpath` or hyper-parameter as a path).
SAFE_GLOBALS: list[Any] = [
    pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath
]
TRUST_HINT = "trust_checkpoint=true"


# ----------------------------------------------------------------------------------------------- export
def export_model(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_path: str | None = None,
    eos_token: str = EOS_TOKEN,
    strict: bool = False,
) -> Path:
    """Write `model` (a `LanguageModel`) as a Hugging Face model directory and return its path.

    MemoryFormer: remote-code `MemoryFormerForCausalLM` (load with `trust_remote_code=True`); Pythia:
    `GPTNeoXForCausalLM`. Weights keep their dtype, in `model.safetensors`; `tokenizer_path`, when given,
    is copied in as `tokenizer.json` with a `tokenizer_config.json` whose eos/bos/pad is `eos_token`.
    See `memoryformer.hf.export`.

    A model with a setting that Hugging Face cannot run (an efficient attention, Table 6's GeLU, ...) is
    written in the package's own format instead (`config.json` = `{"model": ..., "tokenizer": ...}`,
    safetensors weights), which `load_model` and `evaluate.py` read, with a warning; with `strict` it
    raises `CheckpointError` instead.

    The directory is built under a temporary name beside `out_dir` and renamed into place when complete,
    so `out_dir` never holds a partial export.
    """
    from memoryformer.hf.export import export_hf, hf_unsupported

    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise CheckpointError(
            f"tokenizer file {tokenizer_path} does not exist; pass the path of a tokenizers JSON file."
        )
    reason = hf_unsupported(model.config)
    if reason is not None:
        if strict:
            raise CheckpointError(f"cannot export to {out_dir}: {reason}")
        warnings.warn(
            f"exported {out_dir} in memoryformer's own format, not as a Hugging Face model: {reason}",
            RuntimeWarning,
            stacklevel=2,
        )
    with atomic_directory(Path(out_dir)) as tmp:
        if reason is None:
            export_hf(model, tmp, tokenizer_path=tokenizer_path, eos_token=eos_token)
        else:
            _export_native(model, tmp, tokenizer_path)
    return Path(out_dir)


def _export_native(model: torch.nn.Module, out: Path, tokenizer_path: str | None) -> Path:
    """The package's own export format (format 1 above, `{"model": ...}` config): any `ModelConfig`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; our weights are untied, so a clone is exact.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer_name = None
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
        tokenizer_name = TOKENIZER_FILE
    meta = {"model": model.config.to_dict(), "tokenizer": tokenizer_name}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------- load
def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", *, trust_checkpoint: bool = False
) -> tuple[Any, str | None]:
    """`(LanguageModel in eval mode, tokenizer path or None)` from an exported dir, .ckpt or DeepSpeed dir.

    `.ckpt` files and DeepSpeed directories are read without unpickling code unless `trust_checkpoint`.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {p} does not exist; pass checkpoint=PATH to an exported model directory, a "
            f"Lightning .ckpt file or a DeepSpeed checkpoint directory."
        )
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        model_cfg, state, tokenizer = _read_exported(p)
    elif p.is_dir() and _is_deepspeed_dir(p):
        model_cfg, state, tokenizer = _read_lightning(_consolidate_deepspeed(p, trust_checkpoint), p)
    elif p.is_file():
        ckpt = safe_torch_load(p, map_location, trust_checkpoint=trust_checkpoint)
        model_cfg, state, tokenizer = _read_lightning(ckpt, p)
    else:
        raise CheckpointError(
            f"{p} is neither an exported model directory (no {CONFIG_FILE}), a DeepSpeed checkpoint "
            f"directory (no 'latest' file) nor a checkpoint file; point checkpoint= at one of those."
        )
    model = _build_and_fill(model_cfg, state, p)
    return model.to(map_location).eval(), tokenizer


def _read_exported(d: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{d / CONFIG_FILE} is not valid JSON ({err}); re-export the model.") from err
    if isinstance(meta, dict) and "model" not in meta and meta.get("model_type") in HF_MODEL_TYPES:
        return _read_hf_exported(d, meta)
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(
            f"{d / CONFIG_FILE} has neither a 'model' key nor model_type "
            f"{' or '.join(map(repr, HF_MODEL_TYPES))}; re-export with python -m memoryformer.export."
        )
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"{weights} is missing; re-export the model with memoryformer.checkpoint.export_model."
        )
    tokenizer = None
    if meta.get("tokenizer"):
        tok = d / meta["tokenizer"]
        if not tok.is_file():
            raise CheckpointError(
                f"{d / CONFIG_FILE} names tokenizer {tok}, which does not exist; copy it there."
            )
        tokenizer = str(tok)
    return _model_config(meta["model"], d / CONFIG_FILE), load_file(str(weights)), tokenizer


def _read_hf_exported(
    d: Path, meta: dict[str, Any]
) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    """A Hugging Face directory written by `memoryformer.hf.export` (MemoryFormer or GPT-NeoX)."""
    from safetensors.torch import load_file

    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(
            f"{weights} is missing; re-export the model with python -m memoryformer.export."
        )
    state = load_file(str(weights))
    try:
        if meta["model_type"] == "memoryformer":
            from memoryformer.hf.config_map import from_hf_config
            from memoryformer.hf.export import from_hf_state

            config, state = from_hf_config(meta), from_hf_state(state)
        else:
            from transformers import GPTNeoXConfig

            from memoryformer.models.convert import config_from_hf, hf_key_map

            config = config_from_hf(GPTNeoXConfig.from_pretrained(str(d), local_files_only=True))
            inverse = {theirs: ours for ours, theirs in hf_key_map(config.n_layer).items()}
            inverse["embed_out.weight"] = "lm_head.weight"  # transformers 4.x name of the head
            state = {inverse.get(k, k): v for k, v in state.items()}
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"the model config stored in {d / CONFIG_FILE} is invalid: {err}") from err
    tokenizer = d / TOKENIZER_FILE
    return config, state, str(tokenizer) if tokenizer.is_file() else None


def _read_lightning(ckpt: Any, src: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None]:
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{src} has no 'state_dict'; it is not a Lightning checkpoint (export the model or pass a .ckpt)."
        )
    hparams = ckpt.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise CheckpointError(
            f"{src} has no hyper_parameters['model'] (the model config); it was not written by our "
            f"training module, so rebuild it with memoryformer.checkpoint.export_model."
        )
    raw = ckpt["state_dict"]
    state = {k[len(LIGHTNING_PREFIX) :]: v for k, v in raw.items() if k.startswith(LIGHTNING_PREFIX)}
    if not state:
        raise CheckpointError(
            f"{src} has no state_dict keys starting with '{LIGHTNING_PREFIX}'; it holds no model."
        )
    tokenizer = hparams.get("tokenizer_path")
    return _model_config(hparams["model"], src), state, str(tokenizer) if tokenizer else None


def _model_config(raw: Any, src: Path) -> ModelConfig:
    try:
        if isinstance(raw, ModelConfig):
            return raw
        if isinstance(raw, str):
            return ModelConfig.from_name(raw)
        if isinstance(raw, Mapping):
            return ModelConfig.from_dict(dict(to_plain(raw)))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"the model config stored in {src} is invalid: {err}") from err
    raise CheckpointError(
        f"the model config stored in {src} is a {type(raw).__name__}, not a mapping or a name."
    )


def weights_mismatch(config: ModelConfig, state: Mapping[str, Any]) -> str | None:
    """Why the tensors in `state` (our model keys) do not fit `LanguageModel(config)`, or None when they do.

    The model is built on the meta device, so the check costs no memory even for MF-base's tables.
    """
    from memoryformer.models import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(config)
    return _mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)


def _mismatch(expected: dict[str, tuple], state: Mapping[str, Any]) -> str | None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    parts = []
    if wrong:
        parts.append(f"shapes differ for {len(wrong)} tensor(s), e.g. {wrong[0]} (checkpoint vs config)")
    if missing:
        parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    return "; ".join(parts) or None


def _build_and_fill(config: ModelConfig, state: dict[str, torch.Tensor], src: Path):
    from memoryformer.models import LanguageModel

    # Build on the meta device: a mismatch is reported before any memory is spent on MF-base's tables.
    with torch.device("meta"):
        model = LanguageModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = _mismatch(expected, state)
    if problem:
        raise CheckpointError(
            f"the weights in {src} do not match its model config ({config.name}): {problem}; "
            f"load it with the config it was trained with."
        )
    if any(name not in expected for name, _ in model.named_buffers()):
        model = LanguageModel(config)  # non-persistent buffers must be computed, not left empty
    else:
        model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model


def safe_torch_load(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    *,
    trust_checkpoint: bool = False,
    mmap: bool = False,
) -> Any:
    """`torch.load(path)` that runs no code from the file unless `trust_checkpoint` (the user's opt-in).

    Only tensors, plain containers and `SAFE_GLOBALS` are accepted; anything else raises
    `UnsafeCheckpointError` naming the file, the offending global and `trust_checkpoint=true`. A file that is
    not a readable checkpoint (torn, truncated, not a zip) raises `CheckpointError`.
    """
    p = Path(path)
    try:
        if trust_checkpoint:
            return torch.load(p, map_location=map_location, weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise UnsafeCheckpointError(
                f"{p} needs the global {found.group(1)} to be unpickled, which can run arbitrary code; "
                f"load it only if you trust its source, by passing {TRUST_HINT}."
            ) from err
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        detail = found.group(1).strip() if found else "UnpicklingError"
        raise CheckpointError(
            f"{p} could not be read as a PyTorch checkpoint without unpickling code ({detail}); it is "
            f"corrupt or not a checkpoint, or an old-format file that loads with {TRUST_HINT} if you trust "
            f"its source."
        ) from err
    except Exception as err:  # noqa: BLE001 - any other read failure means the same thing to the user
        reason = f"{type(err).__name__}: {first_line(err, default='')}"
        raise CheckpointError(
            f"{p} could not be read as a PyTorch checkpoint ({reason}); "
            f"it is truncated, corrupt or not a checkpoint, so pass another one."
        ) from err


# -------------------------------------------------------------------------------------------- deepspeed
def _is_deepspeed_dir(d: Path) -> bool:
    return (d / "latest").is_file() or any(d.glob("*/*mp_rank_00_model_states.pt"))


@dataclass
class DeepSpeedLayout:
    """What a DeepSpeed checkpoint directory holds, read from its file names and rank 0's model states.

    DeepSpeed writes `<dir>/latest` (the tag) and `<dir>/<tag>/`: under ZeRO 0-2 one
    `mp_rank_00_model_states.pt` (module and Lightning's client state); under ZeRO-3 one
    `zero_pp_rank_{r}_mp_rank_00_model_states.pt` per data-parallel rank r; and under ZeRO 1-3 one
    `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` per rank (`runtime/engine.py`, `_get_ckpt_name` and
    `_get_zero_ckpt_name`). `missing` lists the per-rank files a whole checkpoint has and this one lacks;
    `states` is rank 0's model-states dict (memory-mapped), which holds Lightning's client state.
    `universal` marks DeepSpeed's universal format (`latest_universal`, one folder per parameter under
    `<tag>/zero/`), which loads at any number of ranks.
    """

    tag_dir: Path
    states_file: Path
    states: dict[str, Any]
    zero_stage: int
    dp_world_size: int
    missing: list[str]
    universal: bool = False


def deepspeed_layout(d: Path, trust_checkpoint: bool = False) -> DeepSpeedLayout:
    """The `DeepSpeedLayout` of checkpoint directory `d`; raises `CheckpointError` (one sentence) when `d`
    has no `latest` tag, no tag folder or no model-states file, or that file does not load."""
    universal = not (d / "latest").is_file() and (d / "latest_universal").is_file()
    tag_file = d / ("latest_universal" if universal else "latest")
    if not tag_file.is_file():
        raise CheckpointError(f"{d} is a directory without a DeepSpeed 'latest' file; pass a checkpoint.")
    tag = tag_file.read_text().strip()
    tag_dir = d / tag
    if not tag_dir.is_dir():
        raise CheckpointError(
            f"{d}/latest names tag {tag!r}, which has no folder there; the checkpoint is incomplete."
        )
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    states_file = next((tag_dir / n for n in names if (tag_dir / n).is_file()), None)
    if states_file is None:
        raise CheckpointError(
            f"{tag_dir} has neither mp_rank_00_model_states.pt (ZeRO 0-2) nor "
            f"zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO-3); the checkpoint is incomplete."
        )
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        states = safe_torch_load(states_file, "cpu", trust_checkpoint=trust_checkpoint, mmap=True)
    stage = int(((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    world = int(states.get("dp_world_size", 1))
    missing = []
    for rank in range(world) if stage > 0 and not universal else ():
        if not any(tag_dir.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")):
            missing.append(f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if stage == 3 and not (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file():
            missing.append(f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    return DeepSpeedLayout(tag_dir, states_file, states, stage, world, missing, universal)


def _consolidate_deepspeed(d: Path, trust_checkpoint: bool = False) -> dict[str, Any]:
    """The Lightning checkpoint dict (fp32 `state_dict` plus client state) of a ZeRO checkpoint directory.

    DeepSpeed's consolidation unpickles its files without restriction, so every `.pt` file of the directory
    is first read with `safe_torch_load`: unless `trust_checkpoint`, a file that would run code is refused
    before DeepSpeed opens it.
    """
    if not trust_checkpoint:
        check_deepspeed_dir(d)
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise CheckpointError(
            f"{d} is a DeepSpeed checkpoint directory and consolidating it needs DeepSpeed; run "
            f"`pip install memoryformer[deepspeed]`, or export the model on the training machine."
        ) from err
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "consolidated.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(d), str(out))
        # written just now by DeepSpeed from files that passed the check above
        return torch.load(out, map_location="cpu", weights_only=False)


def deepspeed_safe_globals() -> list[Any]:
    """Value classes DeepSpeed pickles into its checkpoints (stage enum, loss scalers), when installed."""
    found: list[Any] = []
    for module, names in (
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),  # a (numel, start) dataclass
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except Exception:  # noqa: BLE001 - deepspeed absent or its layout changed: allow nothing extra
            continue
        found.extend(getattr(mod, n) for n in names if hasattr(mod, n))
    return found


def check_deepspeed_dir(d: Path) -> None:
    """Raise `UnsafeCheckpointError` when a `.pt` file under DeepSpeed directory `d` would unpickle code."""
    extra = deepspeed_safe_globals()
    for f in sorted(d.rglob("*.pt")):
        with torch.serialization.safe_globals(extra):
            safe_torch_load(f, "cpu", mmap=True)
