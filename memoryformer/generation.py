"""Text generation from a checkpoint, streamed to a text stream: what `generate.py` runs.

`GenerateConfig.from_mapping(cfg)` checks every option (one-sentence `ConfigError`s); `run_generation`
loads the model and tokenizer (any format `memoryformer.checkpoint.load_model` reads), encodes the prompt,
and for each sample prints the prompt and then each new piece of text as soon as it decodes to whole
characters (`IncrementalDecoder`), so a multi-byte character split over several BPE tokens is printed once,
complete.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from memoryformer.config import (
    DTYPES,
    EOS_TOKEN,
    ConfigError,
    check_choice,
    entry_point_options,
    reject_unknown_keys,
)

REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder gives for an incomplete UTF-8 sequence


@dataclass
class GenerateConfig:
    """Options of `generate.py` and their defaults (conf/generate.yaml composes on them); `validate` names a
    bad one and the fix."""

    checkpoint: str | None = None  # exported / Hugging Face model dir, Lightning .ckpt or DeepSpeed dir
    prompt: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens (None: all)
    top_p: float = 1.0  # nucleus sampling: keep the most likely tokens up to this probability mass
    greedy: bool = False  # argmax decoding (ignores temperature, top_k, top_p)
    seed: int = 0  # samples are reproducible for a given seed
    num_samples: int = 1
    tokenizer: str | None = None  # overrides the tokenizer stored with the checkpoint
    eos_token: str = EOS_TOKEN  # generation stops at this token
    device: str = "cpu"
    dtype: str = "float32"

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> GenerateConfig:
        """Build from generate.py's Hydra config or a plain mapping (unknown keys are errors); validate."""
        values = entry_point_options(cfg)
        reject_unknown_keys("", values, cls, noun="option")
        if values.get("prompt") is not None and not isinstance(values["prompt"], str):
            # Hydra reads prompt=3456 as an int; the user meant the text (quote it to keep e.g. 1e3 as typed).
            values["prompt"] = str(values["prompt"])
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise `ConfigError` for any option that cannot work."""
        if not self.checkpoint:
            raise ConfigError("no checkpoint given; pass checkpoint=PATH (model dir, .ckpt, DeepSpeed dir).")
        if self.prompt is None or str(self.prompt) == "":
            raise ConfigError('the prompt is empty; pass prompt="some text".')
        if int(self.max_new_tokens) < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be a positive integer.")
        if float(self.temperature) < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy decoding).")
        if self.top_k is not None and int(self.top_k) < 1:
            raise ConfigError(f"top_k={self.top_k} must be a positive integer, or null to keep every token.")
        if not 0 < float(self.top_p) <= 1:
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1]; 1 keeps every token.")
        if int(self.num_samples) < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be a positive integer.")
        check_choice("dtype", self.dtype, DTYPES)
        import torch  # here, not at the top: entry points compose GenerateConfig without loading torch

        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device} was requested but CUDA is unavailable; use device=cpu.")


class IncrementalDecoder:
    """Turns a growing list of token ids into the text each new token adds.

    `push(token)` returns the new text, or "" while the tokens since the last output end inside a
    multi-byte character (the decoder then shows U+FFFD); that text comes out, whole, with a later token.
    Only a short window of recent tokens is re-decoded per step, so streaming stays linear in the length.
    `flush()` returns whatever is still held back at the end.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # tokens [prefix, read) decode to text already printed (context for the next piece)
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        """Add one token id; return the text it completes (possibly "")."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT_CHAR):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of tokens not yet returned (it may contain U+FFFD if the output ended mid-character)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


def load_for_generation(config: GenerateConfig) -> tuple[Any, Any]:
    """`(LanguageModel on config.device in config.dtype, tokenizers.Tokenizer)` for `config.checkpoint`."""
    import torch

    from memoryformer.checkpoint import load_model
    from memoryformer.data.tokenizer import load_tokenizer

    model, stored = load_model(config.checkpoint)
    path = config.tokenizer or stored
    if path is None:
        raise ConfigError(
            f"no tokenizer is stored with {config.checkpoint}; pass tokenizer=PATH (a tokenizer.json)."
        )
    model = model.to(device=config.device, dtype=getattr(torch, config.dtype)).eval()
    return model, load_tokenizer(path)


def run_generation(config: GenerateConfig, out: TextIO = sys.stdout) -> list[list[int]]:
    """Stream `config.num_samples` continuations of `config.prompt` to `out`; returns the new ids of each."""
    import torch

    model, tokenizer = load_for_generation(config)
    prompt_ids = tokenizer.encode(config.prompt, add_special_tokens=False).ids
    block = model.config.block_size
    if not prompt_ids:
        raise ConfigError('the prompt encodes to no tokens; pass prompt="some text".')
    if len(prompt_ids) > block:
        raise ConfigError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {block}; shorten the prompt."
        )
    eos = tokenizer.token_to_id(config.eos_token)
    generator = torch.Generator(device=config.device).manual_seed(int(config.seed))
    idx = torch.tensor([prompt_ids], device=config.device)
    samples = []
    for i in range(int(config.num_samples)):
        if int(config.num_samples) > 1:
            out.write(f"--- sample {i + 1} of {config.num_samples} ---\n")
        out.write(config.prompt)
        out.flush()
        decoder = IncrementalDecoder(tokenizer)
        new: list[int] = []
        for token in model.stream(
            idx, int(config.max_new_tokens), temperature=float(config.temperature),
            top_k=None if config.top_k is None else int(config.top_k), greedy=bool(config.greedy),
            eos_token_id=eos, generator=generator, top_p=float(config.top_p),
        ):
            t = int(token[0])
            if t == eos:
                break
            new.append(t)
            out.write(decoder.push(t))
            out.flush()
        out.write(decoder.flush() + "\n")
        out.flush()
        samples.append(new)
    return samples
