"""Typed data configuration: one dataclass, the schema of Hydra's `data` group (`conf/data/*.yaml`).

`source` picks the pipeline:

- ``sample``: the bundled corpus built at first use from the Python standard library (no download).
- ``indexed``: Megatron / GPT-NeoX `.bin/.idx` prefixes (e.g. Pythia's tokenized Pile), optionally blended.
- ``files``: local jsonl / jsonl.zst / json.gz / parquet / txt files, tokenized and packed on the fly.
- ``hf``: a dataset on the Hugging Face hub (or a local dataset directory), streamed through `datasets`.

Every field is a primitive, list or Optional, so OmegaConf can use the class as a structured config.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from memoryformer.config import EOS_TOKEN, ConfigError, check_choice

SOURCES = ("sample", "indexed", "files", "hf")
INDEX_MAPPINGS = ("gpt_neox", "preshuffled")
BAD_LINE_POLICIES = ("skip", "fail")
#: False inside `files_unchecked()`: configs are checked without looking for their files (a dry run).
_CHECK_FILES: ContextVar[bool] = ContextVar("check_data_files", default=True)


@contextlib.contextmanager
def files_unchecked() -> Iterator[None]:
    """Build `DataConfig`s whose values are checked but whose files are not looked for (`dry_run=true`
    plans a run for a cluster whose data this machine does not have)."""
    token = _CHECK_FILES.set(False)
    try:
        yield
    finally:
        _CHECK_FILES.reset(token)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into `seq_len + 1`-token samples.

    A batch holds `input_ids [B, seq_len]` and `labels [B, seq_len]` taken from one sample of
    `seq_len + 1` tokens (labels are the inputs shifted left by one).
    """

    source: str = "sample"  # "sample" | "indexed" | "files" | "hf"
    seq_len: int = 256
    num_workers: int = 0
    seed: int = 1234  # GPT-NeoX's default seed; Pythia used it for its index mappings
    cache_dir: str = "~/.cache/memoryformer/data"  # sample corpus, tokenizer and index-mapping caches

    # --- tokenizer (files / hf; sample trains its own; indexed only needs it for decoding/vocab check)
    tokenizer: str | None = None  # path to a tokenizer.json (or a folder holding one)
    eos_token: str = EOS_TOKEN
    append_eos: bool = True  # one end-of-text token after every document (GPT-NeoX --append-eod)

    # --- sample
    sample_max_bytes: int = 4_000_000  # text taken from the stdlib, in sorted path order
    sample_vocab_size: int = 4096
    sample_val_every: int = 20  # every 20th file (sorted order) goes to validation

    # --- indexed
    paths: list[str] = field(default_factory=list)  # .bin/.idx prefixes (no extension)
    weights: list[float] = field(default_factory=list)  # blend weights, one per path (empty: by size)
    val_paths: list[str] = field(default_factory=list)  # held-out prefixes; empty: val_fraction of docs
    index_mapping: str = "gpt_neox"  # "gpt_neox" (doc/sample/shuffle idx) | "preshuffled" (doc i = sample i)
    num_samples: int | None = (
        None  # train samples to map; None: trainer.max_steps * global batch, else 1 epoch
    )

    # --- files
    files: list[str] = field(default_factory=list)  # globs, expanded in sorted order
    val_files: list[str] = field(default_factory=list)
    text_field: str = "text"
    on_bad_line: str = "skip"  # "skip" (count and warn) | "fail"

    # --- hf
    hf_name: str | None = None  # hub name or a local dataset directory
    hf_config: str | None = None
    hf_split: str = "train"
    hf_val_split: str | None = None

    # --- validation
    val_fraction: float = 0.01  # share of documents held out when no val_paths / val_files are given
    val_samples: int = 256  # validation samples per evaluation (all ranks together)

    def __post_init__(self) -> None:
        self.validate(check_files=_CHECK_FILES.get())

    def validate(self, check_files: bool = True) -> None:
        """Raise `ConfigError` naming the key and the fix for any value that cannot work; `check_files`
        also requires the data files and the tokenizer to exist."""
        check_choice("data.source", self.source, SOURCES)
        check_choice("data.index_mapping", self.index_mapping, INDEX_MAPPINGS)
        check_choice("data.on_bad_line", self.on_bad_line, BAD_LINE_POLICIES)
        if self.seq_len <= 0:
            raise ConfigError(f"data.seq_len={self.seq_len} must be a positive integer.")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must lie in [0, 1).")
        if self.val_samples < 0:
            raise ConfigError(f"data.val_samples={self.val_samples} must be >= 0.")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ConfigError(f"data.num_samples={self.num_samples} must be positive or null.")
        if self.source == "sample" and self.sample_vocab_size < 257:
            raise ConfigError(
                f"data.sample_vocab_size={self.sample_vocab_size} must be > 256 "
                f"(byte-level BPE starts from 256 bytes)."
            )
        if self.source == "indexed":
            self._validate_indexed(check_files)
        if self.source == "files":
            if not self.files:
                raise ConfigError("data.files is empty; give at least one glob of jsonl/parquet/txt files.")
            for key in ("files", "val_files") if check_files else ():
                for i, pattern in enumerate(getattr(self, key)):
                    if not glob.glob(os.path.expanduser(pattern)):
                        raise ConfigError(
                            f"data.{key}[{i}]={pattern!r} matches no file; "
                            f"fix the glob or the PILE_DIR variable."
                        )
        if self.source in ("files", "hf") and not self.tokenizer:
            raise ConfigError(
                f"data.tokenizer is required for data.source={self.source}; give a tokenizer.json."
            )
        if self.source == "hf" and not self.hf_name:
            raise ConfigError(
                "data.hf_name is required for data.source=hf; give a hub name or a local folder."
            )
        if check_files and self.tokenizer and not os.path.exists(os.path.expanduser(self.tokenizer)):
            raise ConfigError(
                f"data.tokenizer={self.tokenizer!r} does not exist; give a tokenizer.json path."
            )

    def _validate_indexed(self, check_files: bool) -> None:
        if not self.paths:
            raise ConfigError(
                "data.paths is empty; give at least one .bin/.idx prefix for data.source=indexed."
            )
        for key in ("paths", "val_paths") if check_files else ():
            for i, prefix in enumerate(getattr(self, key)):
                prefix = strip_extension(os.path.expanduser(prefix))
                for ext in (".idx", ".bin"):
                    if not os.path.isfile(prefix + ext):
                        raise ConfigError(
                            f"data.{key}[{i}]={prefix!r} has no {ext} file ({prefix + ext} does not exist); "
                            f"give the prefix without extension, or fix the PILE_DIR variable."
                        )
        if self.weights and len(self.weights) != len(self.paths):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries but data.paths has {len(self.paths)}; "
                f"give one weight per path or leave weights empty."
            )
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"data.weights={list(self.weights)} must be >= 0 with a positive sum.")


def strip_extension(prefix: str) -> str:
    """`foo.bin` / `foo.idx` / `foo` -> `foo` (users often paste a file name instead of a prefix)."""
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
