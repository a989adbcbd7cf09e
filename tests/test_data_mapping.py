"""GPT-NeoX index mapping (Pythia's sample order) against a literal port of the reference loops,
plus packing invariants: no token lost or duplicated, samples of seq_len + 1, labels = inputs shifted."""

import numpy as np
import pytest

from memoryformer.data.gpt_neox import (
    BlendedDataset,
    GPTSampleDataset,
    PreshuffledDataset,
    build_blending_indices,
    build_index_mappings,
)
from memoryformer.data.indexed import DataError, MMapIndexedDataset, MMapIndexedDatasetBuilder


# ---- literal port of EleutherAI/gpt-neox megatron/data/gpt2_dataset.py (packed) and helpers.cpp ----
def ref_num_epochs(tokens_per_epoch, seq_length, num_samples):
    num_epochs, total = 0, 0
    while True:
        num_epochs += 1
        total += tokens_per_epoch
        if ((total - 1) // seq_length) >= num_samples:
            return num_epochs


def ref_doc_idx(documents, num_epochs, rng):
    doc_idx = np.mgrid[0:num_epochs, 0 : len(documents)][1]
    doc_idx[:] = documents
    doc_idx = doc_idx.reshape(-1).astype(np.int32)
    rng.shuffle(doc_idx)
    return doc_idx


def ref_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.zeros([num_samples + 1, 2], dtype=np.int64)
    sample_index, doc_idx_index, doc_offset = 1, 0, 0
    while sample_index <= num_samples:
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sizes[doc_idx[doc_idx_index]] - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        sample_idx[sample_index] = (doc_idx_index, doc_offset)
        sample_index += 1
    return sample_idx


def ref_mappings(sizes, documents, num_samples, seq_length, seed):
    tokens = int(np.sum(sizes[documents]))
    epochs = ref_num_epochs(tokens, seq_length, num_samples)
    rng = np.random.RandomState(seed=seed)
    doc_idx = ref_doc_idx(documents, epochs, rng)
    sample_idx = ref_sample_idx(sizes, doc_idx, seq_length, epochs, tokens)
    shuffle_idx = np.arange(sample_idx.shape[0] - 1, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return doc_idx, sample_idx, shuffle_idx


def ref_blending(weights, size):
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    current = [0] * len(weights)
    which, local = [], []
    for i in range(size):
        x = max(float(i), 1.0)
        best, best_err = 0, weights[0] * x - current[0]
        for d in range(1, len(weights)):
            err = weights[d] * x - current[d]
            if err > best_err:
                best, best_err = d, err
        which.append(best)
        local.append(current[best])
        current[best] += 1
    return np.array(which), np.array(local)


# ------------------------------------------------------------------------------------------------------


def write_corpus(prefix, sizes, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 50000, size=s) for s in sizes]
    with MMapIndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in docs:
            b.add_document(d)
    return docs


@pytest.mark.parametrize("seq_len,num_samples,seed", [(16, 40, 1234), (7, 500, 1), (64, 10, 1234)])
def test_mappings_match_gpt_neox_reference(seq_len, num_samples, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 40, size=37).astype(np.int32)  # includes empty documents
    sizes[0] = 0
    documents = np.arange(3, 37, dtype=np.int32)
    ours = build_index_mappings(sizes, documents, seq_len, num_samples, seed)
    ref = ref_mappings(sizes, documents, num_samples, seq_len, seed)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_array_equal(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
    assert ours[0].dtype == np.int32 and ours[2].dtype == np.uint32


def test_samples_match_reference_getitem_and_pack_without_loss(tmp_path):
    sizes = [5, 0, 33, 1, 17, 64, 2, 9, 40, 3]
    docs = write_corpus(str(tmp_path / "c"), sizes)
    ds = MMapIndexedDataset(str(tmp_path / "c"))
    seq_len = 8
    gpt = GPTSampleDataset(ds, seq_len, num_samples=10, seed=1234, cache_dir=str(tmp_path / "cache"))
    doc_idx, sample_idx, shuffle_idx = ref_mappings(
        np.array(sizes, np.int32), np.arange(10, dtype=np.int32), 10, seq_len, 1234
    )
    stream = np.concatenate([docs[d] for d in doc_idx])
    for i in range(len(gpt)):
        k = shuffle_idx[i]
        s = gpt[i]
        assert s.shape == (seq_len + 1,) and s.dtype == np.int64
        np.testing.assert_array_equal(s, stream[k * seq_len : k * seq_len + seq_len + 1])
    # unshuffled, the samples minus their shared last token tile the stream: nothing lost or duplicated
    ordered = [gpt[int(np.flatnonzero(shuffle_idx == k)[0])] for k in range(len(gpt))]
    rebuilt = np.concatenate([s[:-1] for s in ordered] + [ordered[-1][-1:]])
    np.testing.assert_array_equal(rebuilt, stream[: len(rebuilt)])
    assert len(stream) - len(rebuilt) < seq_len  # only the incomplete tail is left over
    # the cache is reused: a second instance loads the same arrays
    again = GPTSampleDataset(ds, seq_len, num_samples=10, seed=1234, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.shuffle_idx, gpt.shuffle_idx)


def test_blending_matches_megatron_helper():
    for weights in ([0.7, 0.3], [1, 1, 2], [0.05, 0.9, 0.05]):
        ours = build_blending_indices(weights, 333)
        ref = ref_blending(weights, 333)
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(ours[1], ref[1])


def test_blended_dataset_reads_from_each_part():
    a = [np.full(3, 1)] * 100
    b = [np.full(3, 2)] * 100
    mix = BlendedDataset([a, b], [3, 1], 40)
    firsts = [int(mix[i][0]) for i in range(40)]
    assert firsts.count(1) == 30 and firsts.count(2) == 10


def test_preshuffled_document_is_sample(tmp_path):
    docs = write_corpus(str(tmp_path / "p"), [9] * 6)
    ds = PreshuffledDataset(MMapIndexedDataset(str(tmp_path / "p")), seq_len=8)
    assert len(ds) == 6
    np.testing.assert_array_equal(ds[4], docs[4])
    with pytest.raises(DataError, match=r"p\.idx document 0 has 9 tokens.*seq_len \+ 1 = 5"):
        PreshuffledDataset(MMapIndexedDataset(str(tmp_path / "p")), seq_len=4)
