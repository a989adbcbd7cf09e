"""Typed model configuration: one dataclass for every architecture knob, with named presets.

`ModelConfig.from_name("mf_tiny")` returns the paper's MF-tiny. `PRESETS` below is the only home of the
named models: `memoryformer.conf_schema` registers each as the Hydra option `model=NAME`, and the same
dataclass is the schema every composed `model` node is validated against. Every impossible
combination fails in `__post_init__` with one sentence naming the key and the fix, so a bad command line
never reaches a stack trace deep inside the model.

Sources for the presets: `docs/paper-notes.md` §2, §3 and §6 (MemoryFormer, from the paper's Table 1 and
the authors' released configs) and EleutherAI's Pythia configs (GPT-NeoX shapes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memoryformer.errors import ConfigError  # the one ConfigError, also importable from here

BLOCK_TYPES = ("memoryformer", "pythia")
NORM_TYPES = ("rmsnorm", "layernorm")
QKV_TYPES = ("memory", "linear")
FFN_TYPES = ("memory_block", "mlp")
WEIGHTINGS = ("l1_prob", "prob")
MEMORY_IMPLS = ("auto", "torch")  # Memory Layer compute paths, see memoryformer.nn.memory_ops
#: `memory_impl` values that are gone -> the value that computes the same path.
RETIRED_MEMORY_IMPLS = {"fused": "auto"}
MEMORY_BLOCK_ACTIVATIONS = ("none", "gelu")
MAX_CODE_LENGTH = 16
ATTENTION_TYPES = ("softmax", "linformer", "cosformer", "performer")
#: Weight dtypes a model is evaluated or sampled in (`eval.dtype`, generate.py's `dtype`, the lm-eval
#: model's `dtype=`), spelt as torch spells them: `getattr(torch, name)` is the dtype.
DTYPES = ("float32", "bfloat16", "float16")
#: GPT-NeoX's end-of-text token: the document separator of the data, where generation stops, and the
#: exported tokenizer's eos/bos/pad.
EOS_TOKEN = "<|endoftext|>"


@dataclass
class ModelConfig:
    """Every architectural choice of a `LanguageModel`.

    Shapes: tokens `[batch, seq]` with ids `< vocab_size`, hidden width `n_embd`, `n_head` heads of
    `n_embd // n_head` dims, at most `block_size` positions. MemoryFormer blocks split the hidden vector
    into `num_tables` (K) chunks of `code_length` (tau) bits, so `n_embd == num_tables * code_length`.
    """

    name: str = "custom"
    block: str = "memoryformer"  # "memoryformer" | "pythia" (GPT-NeoX)
    vocab_size: int = 50304
    n_layer: int = 6
    n_embd: int = 512
    n_head: int = 8
    block_size: int = 2048
    rotary_pct: float = 0.25
    rotary_base: int = 10000

    # --- MemoryFormer block (paper §2.4; released code: docs/paper-notes.md §2) ---
    num_tables: int = 64  # K
    code_length: int = 8  # tau
    expand_bits: int = 2  # Memory Block layer 2 reads chunks of tau + expand_bits bits (Table 5)
    norm: str = "rmsnorm"  # norm before the hashes: rmsnorm (released code) | layernorm
    norm_eps: float = 1e-8  # RMSNorm eps (released code); norm=layernorm uses layer_norm_eps instead
    qkv: str = "memory"  # "memory" (three Memory Layers, one shared hash) | "linear" (authors' ablation)
    ffn: str = "memory_block"  # "memory_block" | "mlp" (4x GELU MLP)
    weighting: str = "l1_prob"  # released code: ||z||_1 * p(z; t=1); "prob": paper's p(z; t)
    temperature: float = 1.0
    memory_bias: bool = True  # released code gives every Memory Layer a bias; the paper's Eq. 11 has none
    memory_impl: str = "auto"  # Memory Layer lookup: "auto" (the fused kernel of the device) | "torch"
    # Table 6: activation between the two Memory Block layers, before their LayerNorm (see MemoryBlock)
    memory_block_activation: str = "none"  # "none" (the paper's MemoryFormer) | "gelu"
    # Table 3's d = 510 row: the Memory Layers hash the first hashed_width = K * tau dims of the n_embd-wide
    # normalised input; outputs and the residual stream stay n_embd wide. 0 means n_embd (every other row).
    hashed_width: int = 0
    # std of the Memory Block tables' N(0, std^2) initialisation (the released code's 0.02); the Q/K/V
    # Memory Layers keep GPT-NeoX's small_init (memoryformer.models.init)
    table_init_std: float = 0.02

    # --- Pythia (GPT-NeoX) block ---
    intermediate_size: int = 0  # 0 means 4 * n_embd
    layer_norm_eps: float = 1e-5  # every nn.LayerNorm (Pythia's, and MemoryFormer's with norm=layernorm)
    parallel_residual: bool = True

    # --- attention core (paper Table 2; both blocks; `memoryformer.models.attention_cores`) ---
    attention: str = "softmax"  # "softmax" | "linformer" | "cosformer" | "performer"
    performer_features: int = 0  # m random features per head; 0 = int(head_size * ln(head_size)) (266 at 64)
    performer_redraw_interval: int = 0  # redraw the features every n optimizer steps; 0 = never (default)
    linformer_k: int = 64  # compressed rows per completed block (causal blockwise Linformer)
    linformer_block: int = 256  # block length L; L >= sequence length is exact causal softmax
    cosformer_m: int = 0  # M of the cos re-weighting; 0 = block_size (fixed, so decoding is well-defined)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def head_size(self) -> int:
        """Dims per attention head."""
        return self.n_embd // self.n_head

    @property
    def rotary_ndims(self) -> int:
        """Dims per head that receive rotary position embedding (GPT-NeoX rule: int(head_size * pct))."""
        return int(self.head_size * self.rotary_pct)

    @property
    def mlp_hidden(self) -> int:
        """Width of the dense MLP (Pythia block, or MemoryFormer with `ffn=mlp`)."""
        return self.intermediate_size or 4 * self.n_embd

    @property
    def memory_block_hidden(self) -> int:
        """Width between the two Memory Block layers: K * (tau + expand_bits) (paper section 2.4)."""
        return self.num_tables * (self.code_length + self.expand_bits)

    @property
    def performer_num_features(self) -> int:
        """m, the Performer's random features per head: `performer_features`, or int(hs * ln hs) when 0."""
        if self.performer_features:
            return self.performer_features
        return max(1, int(self.head_size * math.log(self.head_size))) if self.head_size > 1 else 1

    @property
    def cosformer_horizon(self) -> int:
        """M of cosFormer's cos(pi/2 * (i - j) / M): `cosformer_m`, or `block_size` when 0."""
        return self.cosformer_m or self.block_size

    @property
    def resolved_hashed_width(self) -> int:
        """Input dims the Memory Layers hash: `hashed_width`, or all of `n_embd` when it is 0."""
        return self.hashed_width or self.n_embd

    @property
    def resolved_norm_eps(self) -> float:
        """eps of the MemoryFormer's `norm` layers: `norm_eps` for RMSNorm, `layer_norm_eps` for LayerNorm."""
        return self.norm_eps if self.norm == "rmsnorm" else self.layer_norm_eps

    @property
    def is_memoryformer(self) -> bool:
        """True for the MemoryFormer block, False for the Pythia (GPT-NeoX) block."""
        return self.block == "memoryformer"

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `ConfigError` with one sentence naming the key and the fix for any impossible value."""
        check_choice("model.block", self.block, BLOCK_TYPES)
        for key in ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be a positive integer.")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose n_head among the divisors of n_embd."
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"model.rotary_pct={self.rotary_pct} must lie in [0, 1].")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"model.rotary_pct={self.rotary_pct} gives {self.rotary_ndims} rotary dims per head, "
                f"which must be even; pick rotary_pct so that head_size * rotary_pct is even."
            )
        if self.intermediate_size < 0:
            raise ConfigError(
                f"model.intermediate_size={self.intermediate_size} must be >= 0 (0 = 4*n_embd)."
            )
        self._validate_attention()
        if self.block == "pythia":
            return
        check_choice("model.norm", self.norm, NORM_TYPES)
        check_choice("model.qkv", self.qkv, QKV_TYPES)
        check_choice("model.ffn", self.ffn, FFN_TYPES)
        check_weighting(self.weighting, self.temperature, prefix="model.")
        check_memory_impl("model.memory_impl", self.memory_impl)
        if self.num_tables <= 0:
            raise ConfigError(f"model.num_tables={self.num_tables} must be positive.")
        if not self.table_init_std > 0:
            raise ConfigError(
                f"model.table_init_std={self.table_init_std} must be > 0 (the released code's is 0.02)."
            )
        check_code_length("model.code_length", self.code_length)
        check_choice("model.memory_block_activation", self.memory_block_activation, MEMORY_BLOCK_ACTIVATIONS)
        if not 0 <= self.hashed_width <= self.n_embd:
            raise ConfigError(
                f"model.hashed_width={self.hashed_width} must lie in [0, model.n_embd={self.n_embd}] "
                f"(0 hashes all n_embd dims)."
            )
        width, what = (
            (self.hashed_width, "model.hashed_width") if self.hashed_width else (self.n_embd, "model.n_embd")
        )
        if self.num_tables * self.code_length != width:
            raise ConfigError(
                f"{what}={width} must equal model.num_tables (K={self.num_tables}) * "
                f"model.code_length (tau={self.code_length}) = {self.num_tables * self.code_length}; "
                f"set model.num_tables={width // self.code_length} or change {what}."
                if width % self.code_length == 0
                else f"{what}={width} must equal model.num_tables (K={self.num_tables}) * "
                f"model.code_length (tau={self.code_length}); {width} is not a multiple of tau, so change "
                f"model.code_length, or set "
                f"model.hashed_width={width // self.code_length * self.code_length} to hash only the "
                f"first K * tau dims (paper Table 3's d = 510 row)."
            )
        if not 0 <= self.expand_bits <= 3:
            raise ConfigError(f"model.expand_bits={self.expand_bits} must be 0, 1, 2 or 3 (paper Table 5).")
        # the Memory Block's layer 2 reads chunks of tau + expand_bits bits
        check_code_length("model.code_length + model.expand_bits", self.code_length + self.expand_bits)

    def _validate_attention(self) -> None:
        """The attention core and its knobs (`model.attention`, `model.performer_*`, `linformer_*`, ...)."""
        check_choice("model.attention", self.attention, ATTENTION_TYPES)
        for key in ("performer_features", "performer_redraw_interval", "cosformer_m"):
            if int(getattr(self, key)) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0 (0 = the default).")
        for key in ("linformer_k", "linformer_block"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be a positive integer.")
        if self.cosformer_m and self.cosformer_m < self.block_size:
            raise ConfigError(
                f"model.cosformer_m={self.cosformer_m} is shorter than model.block_size={self.block_size}, "
                f"so distant tokens would get negative weights; set cosformer_m=0 (= block_size) or larger."
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """The named preset (see `PRESETS`), with `overrides` applied; unknown names list the known ones."""
        if name not in PRESETS:
            raise ConfigError(
                f"model name {name!r} is unknown; choose one of: {', '.join(sorted(PRESETS))}."
            )
        values = {**PRESETS[name], **overrides}
        values.setdefault("name", name)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain mapping (a checkpoint's saved config, a resolved Hydra node)."""
        reject_unknown_keys("model.", values, cls)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, stable enough to store in checkpoints."""
        return dataclasses.asdict(self)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """Fail with a `ConfigError` naming `key` and the allowed values unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of: {', '.join(allowed)}.")


# The checks below are shared by `ModelConfig.validate` (keys named `model.<key>`) and the layers in
# `memoryformer.nn` (keys named as their arguments), which can also be built without a ModelConfig.
def check_memory_impl(key: str, impl: str) -> None:
    """Fail with a `ConfigError` naming `key` unless `impl` is one of `MEMORY_IMPLS`; a retired value names
    its replacement."""
    if impl in RETIRED_MEMORY_IMPLS:
        raise ConfigError(
            f"{key}={impl!r} was another name for the path {RETIRED_MEMORY_IMPLS[impl]!r} takes (the fused "
            f"kernel of the device) and is gone; set {key}={RETIRED_MEMORY_IMPLS[impl]}."
        )
    check_choice(key, impl, MEMORY_IMPLS)


def check_code_length(key: str, bits: int) -> None:
    """Fail with a `ConfigError` naming `key` unless Memory Layer chunks of `bits` bits are possible: 1 to
    `MAX_CODE_LENGTH` bits, since each table has 2**bits rows."""
    if not 1 <= bits <= MAX_CODE_LENGTH:
        raise ConfigError(
            f"{key}={bits} is out of range; keep it <= {MAX_CODE_LENGTH} bits per chunk and at least 1 "
            f"(each table has 2**bits rows; the paper uses 8, and 10 in its Memory Block)."
        )


def check_weighting(weighting: str, temperature: float, prefix: str = "") -> None:
    """Fail with a `ConfigError` unless `weighting` is one of `WEIGHTINGS` and the temperature t suits it:
    t > 0, and t = 1 with "l1_prob" (the released code fixes it). Keys are named `<prefix>weighting` and
    `<prefix>temperature`."""
    check_choice(f"{prefix}weighting", weighting, WEIGHTINGS)
    if not temperature > 0:
        raise ConfigError(f"{prefix}temperature={temperature} must be > 0.")
    if weighting == "l1_prob" and temperature != 1.0:
        raise ConfigError(
            f"{prefix}temperature={temperature} has no effect with {prefix}weighting=l1_prob (the released "
            f"code fixes t = 1); set {prefix}weighting=prob to use a temperature."
        )


def reject_unknown_keys(prefix: str, values: Mapping[str, Any], cls: type, noun: str = "key") -> None:
    """Fail with a `ConfigError` naming every key of `values` that is not a field of dataclass `cls`
    (written `prefix` + key, e.g. `eval.taskz`) and listing the known ones; `noun` is what the entry point
    calls its keys (generate.py: "option")."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(prefix + key for key in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(
            f"unknown {noun}{plural} {names}; known {noun}s are: {', '.join(sorted(known))}."
        )


def entry_point_options(node: Any) -> dict[str, Any]:
    """An entry point's resolved config (an OmegaConf node or a mapping) as a plain dict, without the
    `hydra` node: Hydra's own settings, never one of the entry point's options."""
    return {k: v for k, v in dict(to_plain(node)).items() if k != "hydra"}


def field_defaults(cls: type) -> dict[str, Any]:
    """The declared default of every field of dataclass `cls`, as plain values, without running its checks.

    Nested dataclass fields (`default_factory=SomeDataclass`) recurse. An entry point registers this as the
    node its Hydra config is composed on, so each option's default is written once, in the dataclass, and
    the YAML file only adds Hydra's own settings.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif dataclasses.is_dataclass(f.default_factory):
            values[f.name] = field_defaults(f.default_factory)
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    return values


def to_plain(node: Any) -> Any:
    """An OmegaConf container as resolved plain dicts and lists; anything else is returned unchanged.

    Lightning saves hparams as given and Hydra hands over `DictConfig`s; the dataclasses want plain values.
    """
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return node
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


#: Named model presets, each stating only what differs from `ModelConfig`'s defaults (which are MF-tiny's
#: knobs: tau = 8, two expanding bits, RMSNorm, GPT-NeoX's rotary 25%, vocabulary 50304, sequence 2048).
#: MemoryFormer rows: K = 64 / 96 / 128 (paper section 3); small and base take Pythia-160M / 410M's layer
#: and head counts as in Table 1; `mf_small_released` is the authors' released 6-layer, 8-head config.
#: Pythia rows: EleutherAI's shapes (LayerNorm eps 1e-5 and the parallel residual are defaults too).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(vocab_size=4096, n_layer=2, n_embd=128, n_head=4, block_size=256, num_tables=16),
    "mf_tiny": dict(n_layer=6, n_embd=512, n_head=8, num_tables=64),
    "mf_small": dict(n_layer=12, n_embd=768, n_head=12, num_tables=96),
    "mf_small_released": dict(n_layer=6, n_embd=768, n_head=8, num_tables=96),
    "mf_base": dict(n_layer=24, n_embd=1024, n_head=16, num_tables=128),
    "pythia_70m": dict(block="pythia", n_layer=6, n_embd=512, n_head=8),
    "pythia_160m": dict(block="pythia", n_layer=12, n_embd=768, n_head=12),
    "pythia_410m": dict(block="pythia", n_layer=24, n_embd=1024, n_head=16),
}

@dataclass(frozen=True)
class PaperRow:
    """One model row of the paper's Table 1.

    `name` is the row's only name: the model preset (`model=NAME`, `ModelConfig.from_name(NAME)`), the
    experiment with the paper's recipe (`experiment=NAME`) and that experiment's run name. `baseline` is the
    Pythia row of the same width that a MemoryFormer row is compared with in Table 1.
    """

    name: str
    label: str  # as the paper prints it
    baseline: str | None = None


#: The paper's Table 1, in its row order; every list of paper rows in the project derives from this one.
PAPER_ROWS = (
    PaperRow("pythia_70m", "Pythia-70M"),
    PaperRow("mf_tiny", "MF-tiny", baseline="pythia_70m"),
    PaperRow("pythia_160m", "Pythia-160M"),
    PaperRow("mf_small", "MF-small", baseline="pythia_160m"),
    PaperRow("pythia_410m", "Pythia-410M"),
    PaperRow("mf_base", "MF-base", baseline="pythia_410m"),
)
PAPER_MODELS = tuple(row.name for row in PAPER_ROWS)
