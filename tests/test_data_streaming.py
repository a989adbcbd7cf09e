"""Streaming path (raw Pile shards, local files, a local HF dataset folder) and the prepare command."""

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from memoryformer.data.config import DataConfig
from memoryformer.data.datamodule import LMDataModule
from memoryformer.data.indexed import DataError, MMapIndexedDataset
from memoryformer.data.prepare import main as prepare_main
from memoryformer.data.streaming import PackedStream

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")
TOK = os.path.join(FIX, "tokenizer.json")
SHARDS = [os.path.join(FIX, "shard_00.jsonl.zst"), os.path.join(FIX, "shard_01.jsonl")]


def expected_stream(paths=SHARDS):
    """Independent reference: parse every valid line with json, tokenize, append eos (id 0)."""
    tok = Tokenizer.from_file(TOK)
    import zstandard

    ids = []
    for p in paths:
        raw = Path(p).read_bytes()
        text = zstandard.ZstdDecompressor().decompressobj().decompress(raw) if p.endswith(".zst") else raw
        for line in text.decode().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                ids += tok.encode(json.loads(line)["text"]).ids + [0]
    return np.array(ids)


def test_packing_keeps_every_token_once():
    stream = PackedStream(dict(files=SHARDS), TOK, 0, seq_len=16)
    samples = [s.numpy() for s in stream]
    assert all(s.shape == (17,) for s in samples)
    ref = expected_stream()
    rebuilt = np.concatenate([s[:-1] for s in samples] + [samples[-1][-1:]])
    np.testing.assert_array_equal(rebuilt, ref[: len(rebuilt)])
    assert len(ref) - len(rebuilt) < 16
    assert stream.bad.count == 1 and "shard_00.jsonl.zst line 18" in stream.bad.first


def test_bad_line_fails_when_asked():
    stream = PackedStream(dict(files=SHARDS, on_bad_line="fail"), TOK, 0, seq_len=16)
    with pytest.raises(DataError, match=r"shard_00\.jsonl\.zst line 18 is not a JSON object"):
        list(stream)


@pytest.mark.slow  # DataLoader worker / Pool processes re-import torch and datasets
def test_two_ranks_two_workers_split_the_documents_disjointly():
    stream = PackedStream(dict(files=SHARDS), TOK, 0, seq_len=8)
    every = list(stream._documents(0, 1))
    shards = [list(stream._documents(s, 4)) for s in range(4)]  # 2 ranks x 2 workers
    assert sorted(t for sh in shards for t in sh) == sorted(every) and len(every) == 70
    assert len({t for sh in shards for t in sh}) == 70  # each document text is unique (#i suffix): disjoint
    assert shards[1][:4] == every[1:17:4]  # dealt round-robin by record number (the bad line is record 17)

    def samples(rank, workers):
        c = DataConfig(
            source="files", files=SHARDS, tokenizer=TOK, seq_len=8, val_fraction=0.0, num_workers=workers
        )
        dm = LMDataModule(c, 2, 320, 64)
        dm._dist = lambda: (rank, 2)
        return torch.cat([b["input_ids"] for b in dm.train_dataloader()])

    got = sum(len(samples(r, 2)) for r in range(2)) * 8
    assert 0.8 * len(expected_stream()) < got <= len(expected_stream())  # only per-shard tails are dropped


@pytest.mark.slow  # DataLoader worker / Pool processes re-import torch and datasets
def test_stream_resume_skips_consumed_batches():
    c = DataConfig(source="files", files=SHARDS, tokenizer=TOK, seq_len=8, val_fraction=0.0, num_workers=2)
    full = [b["input_ids"] for b in LMDataModule(c, 2, 320, 64).train_dataloader()]
    dm = LMDataModule(c, 2, 320, 64)
    dm.load_state_dict({"consumed_samples": 10, "num_workers": 2})  # 5 micro-batches already trained on
    rest = [b["input_ids"] for b in dm.train_dataloader()]
    assert len(rest) == len(full) - 5
    assert all(torch.equal(x, y) for x, y in zip(rest, full[5:], strict=True))


def test_hf_source_on_a_local_dataset_folder():
    c = DataConfig(
        source="hf",
        hf_name=os.path.join(FIX, "hf_local"),
        hf_split="train",
        hf_val_split="validation",
        tokenizer=TOK,
        seq_len=8,
        val_samples=4,
    )
    dm = LMDataModule(c, 2, 320, 64)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    tok = Tokenizer.from_file(TOK)
    first = json.loads(Path(FIX, "hf_local", "data", "train.jsonl").read_text().splitlines()[0])["text"]
    np.testing.assert_array_equal(batch["input_ids"][0].numpy(), tok.encode(first).ids[:8])
    assert sum(len(b["input_ids"]) for b in dm.val_dataloader()) == 4


@pytest.mark.slow  # DataLoader worker / Pool processes re-import torch and datasets
def test_prepare_writes_gpt_neox_files_and_resumes(tmp_path):
    out = str(tmp_path / "pile_text_document")
    args = ["--input", *SHARDS, "--tokenizer", TOK, "--output", out, "--num-proc", "2", "--keep-parts"]
    assert prepare_main(args) == 0
    ds = MMapIndexedDataset(out)
    assert ds.dtype == np.uint16 and len(ds) == 70  # 40 + 30 records, the bad line skipped
    np.testing.assert_array_equal(np.concatenate([ds[i] for i in range(len(ds))]), expected_stream())
    # interrupted after the first file: drop the second part and the output, run again
    os.remove(out + ".idx")
    for ext in (".bin", ".idx"):
        os.remove(os.path.join(out + ".parts", "00001" + ext))
    before = os.path.getmtime(os.path.join(out + ".parts", "00000.bin"))
    assert prepare_main(args) == 0
    assert os.path.getmtime(os.path.join(out + ".parts", "00000.bin")) == before  # not redone
    np.testing.assert_array_equal(MMapIndexedDataset(out).sizes, ds.sizes)


def test_prepare_reports_a_missing_input(tmp_path, capsys):
    rc = prepare_main(
        ["--input", str(tmp_path / "none*.jsonl"), "--tokenizer", TOK, "--output", str(tmp_path / "o")]
    )
    assert rc == 2 and "matches no file" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "o.bin"))
