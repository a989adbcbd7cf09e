"""The bundled default corpus: Python standard-library source, tokenized by a BPE trained on it.

Nothing is downloaded: the text is `sysconfig.get_paths()["stdlib"]`'s `*.py` files in sorted path order
(site-packages excluded), up to `sample_max_bytes`; every `sample_val_every`-th file goes to validation.
With the pinned Python (3.11) this is the same corpus on every machine.

Built once under `<cache_dir>/sample/<key>/` (key = Python version and the sample settings):
`tokenizer.json`, `train.bin/.idx`, `val.bin/.idx` (our MMIDIDX writer, the same format as the Pile path).
The build happens in a private temporary folder that is renamed into place, so two processes starting at
once both succeed and neither sees a half-built cache.

`export_heldout(dir)` (or `python -m memoryformer.data.sample --export-eval DIR`) writes the validation
documents, as text, to `DIR/sample_heldout/validation.jsonl` (field `text`) for the lm-eval task
`sample_heldout` (held-out perplexity; `evaluate.py eval.tasks=sample eval.data_dir=DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memoryformer.config import EOS_TOKEN
from memoryformer.data.indexed import MMapIndexedDatasetBuilder, best_dtype
from memoryformer.file_lock import build_once

FORMAT_VERSION = 1


@dataclass
class SampleCorpus:
    """Paths of a built sample corpus."""

    root: str
    tokenizer: str
    train_prefix: str
    val_prefix: str


def stdlib_files(max_bytes: int) -> list[str]:
    """Sorted `.py` files of the standard library (no site-packages, no tests), until `max_bytes`."""
    root = sysconfig.get_paths()["stdlib"]
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib")
        ]
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    found.sort(key=lambda p: os.path.relpath(p, root))
    chosen, total = [], 0
    for path in found:
        size = os.path.getsize(path)
        if total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) with `<|endoftext|>` as id 0, trained on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def corpus_key(max_bytes: int, vocab_size: int, val_every: int) -> str:
    """Folder name that changes whenever the built corpus would."""
    py = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return f"v{FORMAT_VERSION}-{py}-{max_bytes}b-{vocab_size}v-val{val_every}"


def split_texts(max_bytes: int, val_every: int) -> dict[str, list[str]]:
    """The corpus text, `{"train": [...], "val": [...]}`: every `val_every`-th file goes to validation."""
    return _split([_read(p) for p in stdlib_files(max_bytes)], val_every)


def _split(texts: list[str], val_every: int) -> dict[str, list[str]]:
    return {
        "train": [t for i, t in enumerate(texts) if i % val_every != val_every - 1],
        "val": [t for i, t in enumerate(texts) if i % val_every == val_every - 1],
    }


def _build(root: str, max_bytes: int, vocab_size: int, val_every: int) -> None:
    tmp = tempfile.mkdtemp(prefix=".building-", dir=os.path.dirname(root))
    try:
        files = stdlib_files(max_bytes)
        texts = [_read(p) for p in files]
        tok = train_bpe(texts, vocab_size)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        eos = tok.token_to_id(EOS_TOKEN)
        dtype = best_dtype(tok.get_vocab_size())
        splits = _split(texts, val_every)
        for split, split_texts in splits.items():
            with MMapIndexedDatasetBuilder(os.path.join(tmp, split), dtype) as builder:
                for enc in tok.encode_batch(split_texts):
                    builder.add_document(np.asarray(enc.ids + [eos], dtype=dtype))
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write(f"{len(files)} files\n")
        try:
            os.rename(tmp, root)  # atomic; fails if another process finished first
        except OSError:
            if not os.path.isfile(os.path.join(root, "DONE")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_sample_corpus(
    cache_dir: str, max_bytes: int = 4_000_000, vocab_size: int = 4096, val_every: int = 20
) -> SampleCorpus:
    """Build (or find) the sample corpus under `cache_dir/sample/<key>` and return its paths."""
    root = os.path.join(os.path.expanduser(cache_dir), "sample", corpus_key(max_bytes, vocab_size, val_every))
    corpus = SampleCorpus(
        root, os.path.join(root, "tokenizer.json"), os.path.join(root, "train"), os.path.join(root, "val")
    )
    done = lambda: os.path.isfile(os.path.join(root, "DONE"))  # noqa: E731
    if done():
        return corpus
    os.makedirs(os.path.dirname(root), exist_ok=True)
    # one process per cache builds it (the ranks of a launch would otherwise each train the tokenizer)
    build = lambda: _build(root, max_bytes, vocab_size, val_every)  # noqa: E731
    build_once(done, build, f"{root}.lock", "the sample corpus")
    return corpus


#: lm-eval task (memoryformer/evaluation/tasks/sample_heldout.yaml) that scores the exported documents.
HELDOUT_TASK = "sample_heldout"
HELDOUT_SPLIT = "validation"


def export_heldout(
    out_dir: str | os.PathLike, max_bytes: int = 4_000_000, val_every: int = 20, max_docs: int | None = None
) -> str:
    """Write the validation documents to `out_dir/sample_heldout/validation.jsonl`; returns the file.

    One JSON object `{"text": document}` per line, in corpus order, the text exactly as trained on (the
    tokenized `val` split is these texts plus `<|endoftext|>`). `max_docs` keeps the first N only; with
    the defaults there are 12 documents (138k characters, 42k BPE-4096 tokens), which the nano model
    scores in seconds on a CPU, so all are kept unless asked.
    """
    docs = split_texts(max_bytes, val_every)["val"]
    if max_docs is not None:
        docs = docs[:max_docs]
    folder = os.path.join(os.fspath(out_dir), HELDOUT_TASK)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{HELDOUT_SPLIT}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m memoryformer.data.sample --export-eval DIR [--max-docs N]` (see `export_heldout`)."""
    parser = argparse.ArgumentParser(description="Export the sample corpus held-out documents.")
    parser.add_argument(
        "--export-eval", metavar="DIR", required=True, help="write DIR/sample_heldout/validation.jsonl"
    )
    parser.add_argument("--max-docs", type=int, default=None, help="keep only the first N documents")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="data.sample_max_bytes of the run")
    parser.add_argument("--val-every", type=int, default=20, help="data.sample_val_every of the run")
    args = parser.parse_args(argv)
    print(export_heldout(args.export_eval, args.max_bytes, args.val_every, args.max_docs))


if __name__ == "__main__":
    main()
