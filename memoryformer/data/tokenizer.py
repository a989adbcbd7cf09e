"""Loading a `tokenizers` tokenizer.json and checking it against the model it will feed."""

from __future__ import annotations

import os

from tokenizers import Tokenizer

from memoryformer.config import ConfigError


def resolve_tokenizer_path(path: str) -> str:
    """`path` itself, or `path/tokenizer.json` when `path` is a folder (a transformers checkpoint)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"data.tokenizer={path!r} does not exist; give a tokenizer.json file or its folder."
        )
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` stored at `path` (a tokenizer.json or a folder holding one)."""
    path = resolve_tokenizer_path(path)
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed json
        raise ConfigError(f"data.tokenizer={path!r} is not a valid tokenizer.json ({exc}).") from exc


def eos_id(tokenizer: Tokenizer, eos_token: str, path: str = "") -> int:
    """Id of the end-of-text token; fails with the file name if the vocabulary lacks it."""
    tid = tokenizer.token_to_id(eos_token)
    if tid is None:
        raise ConfigError(
            f"data.eos_token={eos_token!r} is not in the vocabulary of {path or 'the tokenizer'}; "
            f"set data.eos_token to its end-of-text token."
        )
    return tid


def check_vocab_fits(tokenizer_vocab_size: int, model_vocab_size: int, path: str = "") -> None:
    """Every token id must index the model's embedding: tokenizer vocab <= model.vocab_size."""
    if tokenizer_vocab_size > model_vocab_size:
        raise ConfigError(
            f"tokenizer {path or ''} has {tokenizer_vocab_size} tokens "
            f"but model.vocab_size={model_vocab_size}; "
            f"set model.vocab_size >= {tokenizer_vocab_size} or use a smaller tokenizer."
        )
