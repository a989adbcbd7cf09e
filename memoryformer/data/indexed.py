"""Megatron / GPT-NeoX "MMIDIDX" indexed datasets: a `.bin` of token ids plus an `.idx` index.

Layout of `PREFIX.idx` (little endian), as written by Megatron-LM and GPT-NeoX
(`megatron/data/indexed_dataset.py`, `MMapIndexedDataset.Index`) and read by Pythia's
`utils/mmap_dataset.py`:

    magic      9 bytes   b"MMIDIDX\\x00\\x00"
    version    <Q        1
    dtype code <B        1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32, 7 float64, 8 uint16
    n_seq      <Q        number of sequences (documents)
    n_doc      <Q        length of the document index
    sizes      int32[n_seq]   tokens per sequence
    pointers   int64[n_seq]   byte offset of each sequence in PREFIX.bin
    doc_idx    int64[n_doc]   sequence index where each document starts (0, 1, ..., n_seq for GPT data)

`PREFIX.bin` is the sequences' token ids back to back. Both files are memory-mapped, never read into RAM.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np

from memoryformer.errors import DataError  # the one DataError, also importable from here

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def dtype_code(dtype: np.dtype | type) -> int:
    """The MMIDIDX code of a numpy dtype (e.g. 8 for uint16)."""
    dtype = np.dtype(dtype)
    for code, candidate in DTYPES.items():
        if np.dtype(candidate) == dtype:
            return code
    raise DataError(f"dtype {dtype} cannot be stored in an MMIDIDX file; use one of {list(DTYPES.values())}.")


def best_dtype(vocab_size: int) -> type:
    """GPT-NeoX's choice: uint16 ids when the vocabulary fits in 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class MMapIndexedDataset:
    """Read-only view of `PREFIX.bin/.idx`. `len(ds)` = number of documents, `ds[i]` = document i's ids.

    `ds[i]` is a 1-D numpy array (a view into the memory map, dtype of the file); `ds.get(i, offset, length)`
    returns a slice of document i without touching the rest; `ds.sizes` is int32 `[len(ds)]`.
    """

    def __init__(self, path_prefix: str) -> None:
        if path_prefix.endswith((".bin", ".idx")):
            path_prefix = path_prefix[:-4]
        self.prefix = path_prefix
        idx_path, bin_path = path_prefix + ".idx", path_prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path} does not exist; give the prefix of an existing .bin/.idx pair.")
            if not os.access(path, os.R_OK):
                raise DataError(f"{path} cannot be read (permission denied); fix its permissions.")
        self._read_index(idx_path)
        expected = (
            int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if len(self.sizes) else 0
        )
        actual = os.path.getsize(bin_path)
        if actual < expected:
            raise DataError(
                f"{bin_path} has {actual} bytes but its index {idx_path} needs {expected}; "
                f"the .bin is truncated (re-copy or re-run prepare)."
            )
        self._bin = np.memmap(bin_path, dtype=self.dtype, mode="r") if actual else np.zeros(0, self.dtype)

    def _read_index(self, idx_path: str) -> None:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{idx_path} does not start with the MMIDIDX magic {MAGIC!r} (found {head[:9]!r}); "
                f"it is not a Megatron/GPT-NeoX mmap index."
            )
        if len(head) < _HEADER:
            raise DataError(f"{idx_path} is truncated: its header has {len(head)} of {_HEADER} bytes.")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise DataError(f"{idx_path} has index version {version}; only version {VERSION} is supported.")
        code = head[17]
        if code not in DTYPES:
            raise DataError(f"{idx_path} has unknown dtype code {code}; known codes are {sorted(DTYPES)}.")
        self.dtype = np.dtype(DTYPES[code])
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        need = _HEADER + n_seq * 4 + n_seq * 8 + n_doc * 8
        if size < need:
            raise DataError(
                f"{idx_path} has {size} bytes but its header announces {n_seq} sequences and {n_doc} "
                f"document entries ({need} bytes); the index is truncated."
            )
        buf = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=_HEADER)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=_HEADER + 4 * n_seq)
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=_HEADER + 12 * n_seq)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of document `i` (to its end when `length` is None)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {self.prefix} with {len(self)} documents")
        i = i % len(self)
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    def check_ids(self, ids: np.ndarray, vocab_size: int | None, doc: int) -> np.ndarray:
        """`ids` (tokens of document `doc`) unchanged, or `DataError` when one is >= `vocab_size`.

        Called per sample rather than once over the whole `.bin` at start-up: a max over one sample is
        free, a scan of the 300B-token Pile would take longer than many runs.
        """
        if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
            bad = int(ids.max())
            raise DataError(
                f"{self.prefix}.bin document {doc} holds token id {bad}, but model.vocab_size={vocab_size}; "
                f"set model.vocab_size > {bad} or re-tokenize the data with the model's tokenizer."
            )
        return ids

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all documents."""
        return int(self.sizes.sum(dtype=np.int64))

    def __getstate__(self) -> str:
        return self.prefix  # workers re-open the memory maps instead of pickling them

    def __setstate__(self, prefix: str) -> None:
        self.__init__(prefix)


class MMapIndexedDatasetBuilder:
    """Writes `PREFIX.bin/.idx` in the MMIDIDX format, atomically.

    Tokens go to `PREFIX.bin.tmp` as documents arrive; `finalize()` writes the index and renames both files
    into place, so an interrupted run leaves no half-written `.bin/.idx` pair behind.
    """

    def __init__(self, path_prefix: str, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = path_prefix
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
        self._tmp_bin = f"{path_prefix}.bin.tmp{os.getpid()}"
        self._file = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed in finalize/abort)
        self._sizes: list[int] = []
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        """Append one document (a 1-D sequence of token ids)."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise DataError(
                f"add_document for {self.prefix} expects a 1-D array of ids, got shape {arr.shape}."
            )
        if self._info is not None and arr.size and (arr.min() < self._info.min or arr.max() > self._info.max):
            raise DataError(
                f"token ids in [{arr.min()}, {arr.max()}] do not fit dtype {self.dtype} of {self.prefix}; "
                f"use int32 for vocabularies of 65,500 ids or more."
            )
        self._file.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def add_index(self, other_prefix: str) -> None:
        """Append every document of an existing `.bin/.idx` with the same dtype (used to merge shards)."""
        other = MMapIndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{other_prefix} has dtype {other.dtype}, but {self.prefix} is {self.dtype}.")
        with open(other_prefix + ".bin", "rb") as f:
            while chunk := f.read(64 << 20):
                self._file.write(chunk)
        self._sizes.extend(other.sizes.tolist())

    def finalize(self) -> None:
        """Write `PREFIX.idx` and move both files into place."""
        self._file.close()
        sizes = np.asarray(self._sizes, dtype=np.int64)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        tmp_idx = f"{self.prefix}.idx.tmp{os.getpid()}"
        with open(tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", VERSION))
            f.write(struct.pack("<B", dtype_code(self.dtype)))
            f.write(struct.pack("<QQ", len(sizes), len(doc_idx)))
            f.write(sizes.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        # .bin first: a reader that finds a new .idx always finds the .bin it describes
        os.replace(self._tmp_bin, self.prefix + ".bin")
        os.replace(tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        """Drop everything written so far."""
        self._file.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def __enter__(self) -> MMapIndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
