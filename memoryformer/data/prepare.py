"""Tokenize jsonl / parquet / txt files into one Megatron/GPT-NeoX `.bin/.idx` (the format Pythia used).

    python -m memoryformer.data.prepare --input '/data/pile/train/*.jsonl.zst' \\
        --tokenizer /models/gpt-neox-20b/tokenizer.json --output /data/pile_tok/pile_text_document \\
        --num-proc 8

Every input file is one unit of work, tokenized by one of `--num-proc` processes into
`<output>.parts/<NNNNN>.bin/.idx` (written atomically), then the parts are concatenated in input order
into `<output>.bin/.idx`. Re-running after an interruption skips the parts already done. Ids are stored
as uint16 when the vocabulary has fewer than 65,500 tokens, else int32 (GPT-NeoX's rule); one
end-of-text token follows every document unless `--no-eos`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys

import numpy as np
from tqdm import tqdm

from memoryformer.config import EOS_TOKEN
from memoryformer.data.indexed import MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype
from memoryformer.data.streaming import BadLines, expand_globs, iter_document_getters
from memoryformer.data.tokenizer import eos_id, load_tokenizer, resolve_tokenizer_path
from memoryformer.errors import DataError


def _part_prefix(output: str, i: int) -> str:
    return os.path.join(output + ".parts", f"{i:05d}")


def tokenize_file(args: tuple) -> tuple[int, int, int, int]:
    """Tokenize one file into its part prefix. Returns (index, documents, tokens, bad lines)."""
    i, path, output, tokenizer_path, text_field, eos_token, on_bad_line, batch_docs = args
    prefix = _part_prefix(output, i)
    if os.path.isfile(prefix + ".idx"):
        done = MMapIndexedDataset(prefix)
        return i, len(done), done.num_tokens, 0
    tok = load_tokenizer(tokenizer_path)
    tail = [] if eos_token is None else [eos_id(tok, eos_token, tokenizer_path)]
    dtype = best_dtype(tok.get_vocab_size())
    bad = BadLines()
    docs = tokens = 0
    with MMapIndexedDatasetBuilder(prefix, dtype) as builder:
        batch: list[str] = []

        def flush() -> None:
            nonlocal docs, tokens
            for enc in tok.encode_batch(batch, add_special_tokens=False):
                builder.add_document(np.asarray(enc.ids + tail, dtype=dtype))
                docs, tokens = docs + 1, tokens + len(enc.ids) + len(tail)
            batch.clear()

        for getter in iter_document_getters([path], text_field=text_field, on_bad_line=on_bad_line, bad=bad):
            text = getter()
            if text is not None:
                batch.append(text)
            if len(batch) >= batch_docs:
                flush()
        flush()
    return i, docs, tokens, bad.count


def prepare(
    inputs: list[str],
    tokenizer: str,
    output: str,
    num_proc: int = 1,
    text_field: str = "text",
    eos_token: str | None = EOS_TOKEN,
    on_bad_line: str = "skip",
    keep_parts: bool = False,
    batch_docs: int = 256,
) -> MMapIndexedDataset:
    """Tokenize `inputs` (globs) into `output.bin/.idx`; resumable, parallel over files."""
    files = expand_globs(inputs, "--input")
    tokenizer = resolve_tokenizer_path(tokenizer)
    tok = load_tokenizer(tokenizer)
    if eos_token is not None:
        eos_id(tok, eos_token, tokenizer)
    dtype = best_dtype(tok.get_vocab_size())
    os.makedirs(output + ".parts", exist_ok=True)
    jobs = [
        (i, f, output, tokenizer, text_field, eos_token, on_bad_line, batch_docs) for i, f in enumerate(files)
    ]
    totals = {"docs": 0, "tokens": 0, "bad": 0}
    bar = tqdm(total=len(jobs), desc="tokenizing files", unit="file", file=sys.stderr)
    with mp.get_context("spawn").Pool(num_proc) if num_proc > 1 else _Serial() as pool:
        for _, docs, tokens, bad in pool.imap_unordered(tokenize_file, jobs):
            totals["docs"] += docs
            totals["tokens"] += tokens
            totals["bad"] += bad
            bar.update(1)
            bar.set_postfix(docs=totals["docs"], tokens=totals["tokens"], bad_lines=totals["bad"])
    bar.close()
    with MMapIndexedDatasetBuilder(output, dtype) as builder:
        for i in range(len(files)):
            builder.add_index(_part_prefix(output, i))
    if not keep_parts:
        shutil.rmtree(output + ".parts", ignore_errors=True)
    if totals["bad"]:
        print(f"skipped {totals['bad']} line(s) that were not JSON documents", file=sys.stderr)
    return MMapIndexedDataset(output)


class _Serial:
    """In-process stand-in for a Pool (num_proc=1): same interface, no subprocesses."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def imap_unordered(fn, jobs):
        return map(fn, jobs)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    p = argparse.ArgumentParser(
        prog="python -m memoryformer.data.prepare", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--input", nargs="+", required=True, help="globs of .jsonl[.zst|.gz], .parquet or .txt files"
    )
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a folder holding one")
    p.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--num-proc", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument(
        "--text-field", default="text", help="JSON/parquet field holding the text (dots for nesting)"
    )
    p.add_argument("--eos-token", default=EOS_TOKEN)
    p.add_argument("--no-eos", action="store_true", help="do not append an end-of-text token to documents")
    p.add_argument("--on-bad-line", choices=("skip", "fail"), default="skip")
    p.add_argument("--keep-parts", action="store_true")
    a = p.parse_args(argv)
    try:
        ds = prepare(
            a.input,
            a.tokenizer,
            a.output,
            a.num_proc,
            a.text_field,
            None if a.no_eos else a.eos_token,
            a.on_bad_line,
            a.keep_parts,
        )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}.bin/.idx: {len(ds)} documents, {ds.num_tokens} tokens, dtype {ds.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
