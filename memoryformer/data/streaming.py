"""Streaming path: documents from local files or the HF hub, tokenized and packed on the fly.

Documents are numbered in reading order (files in sorted glob order, lines in file order). Document j
belongs to shard `j % num_shards`, with one shard per (rank, DataLoader worker); each shard tokenizes only
its own documents, appends `eos` after each, and cuts the token stream into samples of `seq_len + 1`
tokens that overlap by one token (sample k = stream tokens `[k*seq_len, k*seq_len + seq_len]`, as on the
GPT-NeoX memmap path, so every token is a target exactly once).

Jsonl input (`.jsonl`, `.json`, `.jsonl.zst`, `.jsonl.gz`, the raw Pile's shape) is read line by line through
`datasets`' "text" builder so that a line that is not JSON can be skipped and counted instead of aborting
the whole file. Parquet goes through the "parquet" builder, `.txt` files are one document each, and a hub
name (or a local dataset folder) through `datasets.load_dataset(..., streaming=True)`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from memoryformer.errors import DataError

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".txt.zst", ".txt.gz")


def expand_globs(patterns: list[str], key: str = "data.files") -> list[str]:
    """Files matching `patterns`, each glob sorted, duplicates dropped, order kept; each one readable."""
    files: list[str] = []
    for i, pattern in enumerate(patterns):
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise DataError(f"{key}[{i}]={pattern!r} matches no file; fix the glob or the PILE_DIR variable.")
        files += [f for f in matched if f not in files]
    for path in files:
        check_readable(path, key)
    return files


def check_readable(path: str, key: str = "data.files") -> None:
    """Fail with one sentence when `path` is a folder, cannot be opened, or is empty (0 bytes).

    Checked before streaming starts because an unreadable file would otherwise surface as a traceback from
    inside `datasets`, and an empty one as a training loop that waits forever for its first batch.
    """
    if os.path.isdir(path):
        raise DataError(
            f"{key} entry {path} is a folder, not a data file; give a glob of files (e.g. DIR/*.jsonl)."
        )
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise DataError(
            f"{key} entry {path} cannot be read ({exc.strerror}); fix its permissions or the path."
        ) from None
    if os.path.getsize(path) == 0:
        raise DataError(f"{key} entry {path} is empty (0 bytes); remove it from {key} or re-create it.")


@dataclass
class BadLines:
    """Counts lines that were not valid JSON documents (skipped when `on_bad_line=skip`)."""

    count: int = 0
    first: str = ""


def _rows(ds) -> Iterator[dict]:
    """Rows of a streaming `datasets.IterableDataset`, in order, even inside a DataLoader worker.

    `IterableDataset.__iter__` would shard itself over DataLoader workers by file (and silently stop
    workers when there are fewer files than workers); our own document sharding does that job, so we
    read through `.iter(batch_size)`, which does not.
    """
    for batch in ds.iter(batch_size=256):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            yield dict(zip(keys, values, strict=True))


def _field(record: dict, path: str):
    for part in path.split("."):
        record = record[part]
    return record


def _jsonl_texts(path: str, text_field: str, on_bad_line: str, bad: BadLines) -> Iterator[Callable[[], str]]:
    import datasets

    stream = datasets.load_dataset("text", data_files=[path], split="train", streaming=True)
    for lineno, row in enumerate(_rows(stream), start=1):
        line = row["text"]
        if not line.strip():
            continue

        def parse(line: str = line, lineno: int = lineno) -> str | None:
            try:
                text = _field(json.loads(line), text_field)
                if not isinstance(text, str):
                    raise TypeError(f"field {text_field!r} is {type(text).__name__}, not a string")
                return text
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                where = f"{path} line {lineno}"
                if on_bad_line == "fail":
                    raise DataError(
                        f"{where} is not a JSON object with a string {text_field!r} field ({exc}); "
                        f"fix the file or set data.on_bad_line=skip."
                    ) from None
                bad.count += 1
                bad.first = bad.first or where
                log.warning(
                    "skipping %s: not a JSON object with a string %r field (%s)", where, text_field, exc
                )
                return None

        yield parse


def _dataset_texts(ds, text_field: str, where: str) -> Iterator[Callable[[], str]]:
    for row in _rows(ds):

        def get(row=row) -> str:
            try:
                return _field(row, text_field)
            except KeyError:
                raise DataError(
                    f"{where} has no field {text_field!r} (fields: {sorted(row)}); set data.text_field."
                ) from None

        yield get


def iter_document_getters(
    files: list[str] | None = None,
    hf_name: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    text_field: str = "text",
    on_bad_line: str = "skip",
    bad: BadLines | None = None,
) -> Iterator[Callable[[], str | None]]:
    """One cheap callable per document, in reading order; calling it parses the document (None = skipped).

    Parsing is deferred so that a shard skips the documents of other shards without decoding them.
    """
    import datasets

    bad = bad if bad is not None else BadLines()
    if hf_name:
        try:
            ds = datasets.load_dataset(hf_name, hf_config, split=hf_split, streaming=True)
        except Exception as exc:
            raise DataError(
                f"data.hf_name={hf_name!r} (config {hf_config!r}, split {hf_split!r}) could not be opened "
                f"with datasets.load_dataset ({type(exc).__name__}: {exc})."
            ) from exc
        yield from _dataset_texts(ds, text_field, f"dataset {hf_name}")
        return
    for path in files or []:
        if path.endswith(JSONL_SUFFIXES):
            yield from _jsonl_texts(path, text_field, on_bad_line, bad)
        elif path.endswith(PARQUET_SUFFIXES):
            ds = datasets.load_dataset("parquet", data_files=[path], split="train", streaming=True)
            yield from _dataset_texts(ds, text_field, path)
        elif path.endswith(TEXT_SUFFIXES):
            ds = datasets.load_dataset(
                "text", data_files=[path], split="train", streaming=True, sample_by="document"
            )
            yield from _dataset_texts(ds, "text", path)
        else:
            raise DataError(
                f"{path} has an unknown extension; "
                f"use one of {JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES}."
            )


def pack(token_lists: Iterator[list[int]], seq_len: int) -> Iterator[np.ndarray]:
    """Cut the concatenation of `token_lists` into int64 `[seq_len + 1]` samples overlapping by one token."""
    buf = np.zeros(0, dtype=np.int64)
    for ids in token_lists:
        buf = np.concatenate([buf, np.asarray(ids, dtype=np.int64)])
        n = (len(buf) - 1) // seq_len
        for k in range(n):
            yield buf[k * seq_len : k * seq_len + seq_len + 1]
        buf = buf[n * seq_len :]


class PackedStream(IterableDataset):
    """Iterable of int64 `[seq_len + 1]` samples from a document stream, sharded over ranks and workers.

    `skip_batches` (set before iterating) is the number of micro-batches of `micro_batch_size` this rank
    already consumed; the worker in role r of N produced batches r, r+N, ... (DataLoader's round-robin
    order), so it skips its share and the resumed run continues exactly (until the first worker runs dry
    at the end of the data, where DataLoader's order depends on which shard ends first).
    """

    def __init__(
        self,
        source: dict,
        tokenizer_path: str,
        eos_id: int | None,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        micro_batch_size: int = 1,
        doc_filter: tuple[int, int, bool] | None = None,
        limit: int | None = None,
        batch_docs: int = 64,
    ) -> None:
        self.source, self.tokenizer_path, self.eos_id, self.seq_len = source, tokenizer_path, eos_id, seq_len
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.doc_filter = (
            doc_filter  # (every, remainder, keep): keep documents with j % every == rem (or not)
        )
        self.limit, self.batch_docs = limit, batch_docs
        self.skip_batches = 0
        self.bad = BadLines()

    def _shard(self) -> tuple[int, int, int, int]:
        """(role, workers, shard, num_shards) of this DataLoader worker.

        DataLoader takes batches from workers 0, 1, ..., N-1 in turn and a resumed loader starts again at
        worker 0, so after `skip_batches` batches worker w plays the role (w + skip_batches) % N: the
        worker whose batch came next in the interrupted run.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self.skip_batches) % workers
        return role, workers, role * self.world_size + self.rank, workers * self.world_size

    def _documents(self, shard: int, num_shards: int) -> Iterator[str]:
        kept = 0  # documents are dealt to shards by their number among the split's documents
        for j, getter in enumerate(iter_document_getters(bad=self.bad, **self.source)):
            if self.doc_filter is not None:
                every, rem, keep = self.doc_filter
                if (j % every == rem) != keep:
                    continue
            if kept % num_shards == shard:
                text = getter()
                if text is not None:
                    yield text
            kept += 1

    def _token_lists(self, texts: Iterator[str]) -> Iterator[list[int]]:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(self.tokenizer_path)
        tail = [] if self.eos_id is None else [self.eos_id]
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == self.batch_docs:
                yield from (e.ids + tail for e in tok.encode_batch(batch, add_special_tokens=False))
                batch = []
        if batch:
            yield from (e.ids + tail for e in tok.encode_batch(batch, add_special_tokens=False))

    def count_samples(self, at_most: int, worker: int = 0, workers: int = 1) -> int:
        """Samples (up to `at_most`) that DataLoader worker `worker` of `workers` would yield on this rank.

        Reads only as many documents as it takes, so probing a 300B-token corpus costs a few documents.
        """
        shard, num_shards = worker * self.world_size + self.rank, workers * self.world_size
        count = 0
        for _ in pack(self._token_lists(self._documents(shard, num_shards)), self.seq_len):
            count += 1
            if count >= at_most:
                break
        return count

    def __iter__(self) -> Iterator[torch.Tensor]:
        role, workers, shard, num_shards = self._shard()
        skip = len(range(role, self.skip_batches, workers)) * self.micro_batch_size
        produced = 0
        for k, sample in enumerate(pack(self._token_lists(self._documents(shard, num_shards)), self.seq_len)):
            if k < skip:
                continue
            if self.limit is not None and produced >= self.limit:
                break
            produced += 1
            yield torch.from_numpy(np.array(sample))
        if self.bad.count:
            log.warning("skipped %d bad line(s) (first: %s)", self.bad.count, self.bad.first)
