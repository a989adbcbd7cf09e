"""MMIDIDX reader/writer: round trips, an independent writer/reader written from the format description,
and one-sentence errors for broken files."""

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from memoryformer.data.indexed import DataError, MMapIndexedDataset, MMapIndexedDatasetBuilder

CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float32: 6,
    np.float64: 7,
    np.uint16: 8,
}


def reference_write(prefix, docs, dtype, version=1, magic=b"MMIDIDX\x00\x00"):
    """Independent writer from the format description (Megatron indexed_dataset.py)."""
    sizes = [len(d) for d in docs]
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.asarray(d, dtype=dtype).tobytes())
    itemsize = np.dtype(dtype).itemsize
    pointers, p = [], 0
    for s in sizes:
        pointers.append(p)
        p += s * itemsize
    with open(prefix + ".idx", "wb") as f:
        f.write(magic + struct.pack("<Q", version) + struct.pack("<B", CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(sizes)}q", *pointers))
        f.write(struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1)))


def reference_read(prefix):
    """Independent reader: parse the header with struct, documents from the raw .bin bytes."""
    raw = Path(prefix + ".idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, n, n_doc = struct.unpack("<QBQQ", raw[9:34])
    dtype = {v: k for k, v in CODES.items()}[code]
    sizes = struct.unpack(f"<{n}i", raw[34 : 34 + 4 * n])
    pointers = struct.unpack(f"<{n}q", raw[34 + 4 * n : 34 + 12 * n])
    data = Path(prefix + ".bin").read_bytes()
    isz = np.dtype(dtype).itemsize
    return (
        version,
        dtype,
        [np.frombuffer(data[p : p + s * isz], dtype=dtype) for p, s in zip(pointers, sizes, strict=True)],
    )


def random_docs(rng, n=25, high=60000):
    return [rng.integers(0, high, size=int(rng.integers(0, 300))) for _ in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip_with_our_writer_and_reader(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = random_docs(rng, high=int(min(np.iinfo(dtype).max, 60000)))
    prefix = str(tmp_path / "corpus")
    with MMapIndexedDatasetBuilder(prefix, dtype) as b:
        for d in docs:
            b.add_document(d)
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == len(docs) and ds.dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    assert ds.num_tokens == sum(len(d) for d in docs)
    np.testing.assert_array_equal(ds.get(3, 5, 7), docs[3][5:12])
    # and an independent reader agrees byte for byte on what we wrote
    version, rdtype, rdocs = reference_read(prefix)
    assert version == 1 and rdtype == dtype
    for a, b in zip(rdocs, docs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_reader_on_independently_written_file(tmp_path):
    docs = random_docs(np.random.default_rng(1))
    prefix = str(tmp_path / "ref")
    reference_write(prefix, docs, np.uint16)
    ds = MMapIndexedDataset(prefix + ".bin")  # a pasted file name works as a prefix too
    assert len(ds) == 25
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.doc_idx, np.arange(26))


def test_missing_path_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx does not exist"):
        MMapIndexedDataset(str(tmp_path / "nope"))


def test_wrong_magic(tmp_path):
    prefix = str(tmp_path / "bad")
    reference_write(prefix, [[1, 2, 3]], np.uint16, magic=b"TNTIDX\x00\x00\x00")
    with pytest.raises(DataError, match=r"bad\.idx does not start with the MMIDIDX magic"):
        MMapIndexedDataset(prefix)


def test_wrong_version(tmp_path):
    prefix = str(tmp_path / "v2")
    reference_write(prefix, [[1, 2, 3]], np.uint16, version=2)
    with pytest.raises(DataError, match=r"v2\.idx has index version 2"):
        MMapIndexedDataset(prefix)


def test_bin_shorter_than_index_says(tmp_path):
    prefix = str(tmp_path / "short")
    reference_write(prefix, [[1, 2, 3], [4, 5, 6, 7]], np.uint16)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)  # 14 bytes needed
    with pytest.raises(DataError, match=r"short\.bin has 10 bytes but its index .* needs 14"):
        MMapIndexedDataset(prefix)


def test_truncated_index(tmp_path):
    prefix = str(tmp_path / "tidx")
    reference_write(prefix, [[1, 2, 3]] * 10, np.uint16)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(60)
    with pytest.raises(DataError, match=r"tidx\.idx has 60 bytes .* truncated"):
        MMapIndexedDataset(prefix)


def test_failed_build_leaves_nothing_behind(tmp_path):
    prefix = str(tmp_path / "half")
    with (
        pytest.raises(DataError, match="do not fit dtype uint16"),
        MMapIndexedDatasetBuilder(prefix, np.uint16) as b,
    ):
        b.add_document([1, 2, 3])
        b.add_document([70000])
    assert os.listdir(tmp_path) == []
