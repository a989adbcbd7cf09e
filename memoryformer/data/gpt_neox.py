"""GPT-NeoX's index mapping: which `seq_len + 1` tokens make sample i, so a run sees Pythia's order.

Follows EleutherAI/gpt-neox `megatron/data/gpt2_dataset.py` (`_build_index_mappings` with the default
"packed" implementation, `_num_epochs`, `_build_doc_idx`, `_build_sample_idx` (C++ in `helpers.cpp`),
`_build_shuffle_idx`) and `megatron/data/blendable_dataset.py` / `helpers.build_blending_indices`:

- `doc_idx`: the document ids repeated for `num_epochs` epochs, one `np.random.RandomState(seed)` shuffle
  over all epochs together (int32).
- `sample_idx [n + 1, 2]`: (position in doc_idx, token offset) where sample k starts. Consecutive samples
  share one token: sample k is tokens `[k * seq_len, k * seq_len + seq_len]` of the doc_idx-ordered stream.
- `shuffle_idx [n]`: a permutation of the samples, drawn next from the same RandomState (uint32).

The sample-index loop is written here in vectorised numpy (one `searchsorted`) instead of C++; the tests
compare it with a literal port of the reference loop.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import uuid
from collections.abc import Sequence

import numpy as np

from memoryformer.data.indexed import MMapIndexedDataset
from memoryformer.errors import DataError
from memoryformer.file_lock import build_once


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Smallest number of epochs whose tokens give `num_samples` samples (GPT-NeoX `_num_epochs`)."""
    if tokens_per_epoch <= 1:
        raise DataError(f"the dataset has {tokens_per_epoch} tokens; at least {seq_len + 1} are needed.")
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_len < num_samples:
        epochs += 1
    return epochs


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """`num_epochs` copies of `documents`, shuffled together with `rng` (int32 `[num_epochs * len(docs)]`)."""
    doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(doc_idx)
    return doc_idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """Start (index into doc_idx, offset) of every sample, shape `[num_samples + 1, 2]`.

    Entry k locates stream position `k * seq_len`; the last entry is where the last sample ends (inclusive).
    """
    doc_sizes = sizes[doc_idx].astype(np.int64)
    starts = np.zeros(len(doc_sizes) + 1, dtype=np.int64)
    np.cumsum(doc_sizes, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    if positions[-1] >= starts[-1]:
        raise DataError(f"{num_samples} samples of {seq_len + 1} tokens need more than {starts[-1]} tokens.")
    # side="right" - 1: the document holding that token; empty documents are skipped, as the loop does
    which = np.searchsorted(starts, positions, side="right") - 1
    dtype = np.int32 if 2 * (num_samples + 1) < np.iinfo(np.int32).max else np.int64
    sample_idx = np.empty((num_samples + 1, 2), dtype=dtype)
    sample_idx[:, 0] = which
    sample_idx[:, 1] = positions - starts[which]
    sample_idx[0] = (0, 0)  # the reference starts at doc_idx[0] even when that document is empty
    return sample_idx


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    """A `rng`-shuffled `arange(size)` (uint32 unless it does not fit)."""
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    idx = np.arange(size, dtype=dtype)
    rng.shuffle(idx)
    return idx


def build_index_mappings(
    sizes: np.ndarray, documents: np.ndarray, seq_len: int, num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """doc_idx, sample_idx, shuffle_idx exactly as GPT-NeoX builds them for `num_samples` samples."""
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = build_doc_idx(documents, epochs, rng)
    total = (epochs * tokens_per_epoch - 1) // seq_len  # every sample the epochs hold, not only num_samples
    sample_idx = build_sample_idx(sizes, doc_idx, seq_len, total)
    shuffle_idx = build_shuffle_idx(sample_idx.shape[0] - 1, rng)
    return doc_idx, sample_idx, shuffle_idx


class GPTSampleDataset:
    """Map-style dataset of `seq_len + 1`-token samples of one `.bin/.idx` prefix, in GPT-NeoX order.

    `ds[i]` -> int64 `[seq_len + 1]`. Mappings are cached as `.npy` files under `cache_dir` (written to a
    temporary name and renamed, so concurrent ranks never read half a file) and memory-mapped back.
    """

    def __init__(
        self,
        indexed: MMapIndexedDataset,
        seq_len: int,
        num_samples: int,
        seed: int,
        cache_dir: str,
        documents: np.ndarray | None = None,
        name: str = "train",
        vocab_size: int | None = None,
    ) -> None:
        self.indexed, self.seq_len, self.vocab_size = indexed, seq_len, vocab_size
        documents = np.arange(len(indexed), dtype=np.int32) if documents is None else documents
        if len(documents) == 0:
            raise DataError(f"{indexed.prefix} has no documents for the {name} split.")
        tokens = int(indexed.sizes[documents].sum(dtype=np.int64))
        if tokens < seq_len + 1:
            raise DataError(
                f"{indexed.prefix} holds {tokens} tokens in its {name} split, fewer than one sample of "
                f"data.seq_len + 1 = {seq_len + 1}; add data or lower data.seq_len."
            )
        tag = hashlib.sha1(np.ascontiguousarray(documents).tobytes()).hexdigest()[:10]
        base = os.path.join(
            os.path.expanduser(cache_dir),
            "index_maps",
            f"{os.path.basename(indexed.prefix)}_{name}_indexmap_{num_samples}ns_{seq_len}sl_{seed}s_{tag}",
        )
        paths = [f"{base}_{kind}_idx.npy" for kind in ("doc", "sample", "shuffle")]

        def build() -> None:
            try:
                arrays = build_index_mappings(indexed.sizes, documents, seq_len, num_samples, seed)
            except DataError as exc:
                raise DataError(f"{indexed.prefix} ({name} split): {exc}") from None
            for path, arr in zip(paths, arrays, strict=True):
                # unique across nodes: containers on different nodes may run their ranks under equal pids
                tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
                np.save(tmp, arr)
                os.replace(tmp, path)

        if not all(os.path.isfile(p) for p in paths):
            os.makedirs(os.path.dirname(base), exist_ok=True)
            # one process per cache builds the mapping; the other ranks (of this node or, on a shared cache,
            # of every node) wait for its files instead of each building the mapping of the whole corpus
            built = lambda: all(os.path.isfile(p) for p in paths)  # noqa: E731
            what = f"the {name} index mapping {os.path.basename(base)}"
            build_once(built, build, f"{base}.lock", what=what)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(p, mmap_mode="r") for p in paths)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        k = int(self.shuffle_idx[i])
        (d0, o0), (d1, o1) = self.sample_idx[k], self.sample_idx[k + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        if d0 == d1:
            return self._get(int(self.doc_idx[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [self._get(int(self.doc_idx[d0]), o0)]
        parts += [self._get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
        parts.append(self._get(int(self.doc_idx[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def _get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        return self.indexed.check_ids(self.indexed.get(doc, offset, length), self.vocab_size, doc)


class PreshuffledDataset:
    """Pythia's pre-shuffled Pile: document i *is* training sample i (each exactly `seq_len + 1` tokens).

    `ds[i]` -> int64 `[seq_len + 1]`; batch b of Pythia is samples `[b * 1024, (b + 1) * 1024)`.
    """

    def __init__(
        self,
        indexed: MMapIndexedDataset,
        seq_len: int,
        documents: np.ndarray | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.indexed, self.seq_len, self.vocab_size = indexed, seq_len, vocab_size
        self.documents = np.arange(len(indexed)) if documents is None else documents
        bad = np.flatnonzero(indexed.sizes[self.documents] != seq_len + 1)
        if len(bad):
            i = int(self.documents[bad[0]])
            raise DataError(
                f"{indexed.prefix}.idx document {i} has {indexed.sizes[i]} tokens, but "
                f"data.index_mapping=preshuffled needs every document to hold seq_len + 1 = {seq_len + 1}; "
                f"use index_mapping=gpt_neox or set data.seq_len={int(indexed.sizes[i]) - 1}."
            )

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> np.ndarray:
        doc = int(self.documents[i])
        return self.indexed.check_ids(self.indexed.get(doc), self.vocab_size, doc).astype(np.int64)


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: sample i comes from the dataset furthest behind its share.

    Returns `dataset_index [size]` (uint8) and `dataset_sample_index [size]` (int64), as
    `helpers.build_blending_indices` does: error_d = w_d * max(i, 1) - taken_d, first maximum wins.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    taken = np.zeros(len(w), dtype=np.int64)
    which = np.empty(size, dtype=np.uint8)
    local = np.empty(size, dtype=np.int64)
    for i in range(size):
        d = int(np.argmax(w * max(float(i), 1.0) - taken))
        which[i], local[i] = d, taken[d]
        taken[d] += 1
    return which, local


class BlendedDataset:
    """Sample datasets mixed by weight (GPT-NeoX `BlendableDataset`). `ds[i]` -> int64 `[seq_len + 1]`."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int) -> None:
        self.datasets = list(datasets)
        self.size = size
        self.which, self.local = build_blending_indices(weights, size)
        for d, ds in enumerate(self.datasets):
            need = int((self.which == d).sum())
            if need > len(ds):
                raise DataError(f"blend needs {need} samples from dataset {d} but it has only {len(ds)}.")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.which[i])][int(self.local[i])]


def blend_sizes(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples to map per dataset for a blend of `num_samples` (GPT-NeoX adds 0.5% head-room)."""
    total = float(sum(weights))
    return [int(math.ceil(num_samples * w / total * 1.005)) for w in weights]
