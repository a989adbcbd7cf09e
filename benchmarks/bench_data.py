"""Data-loading throughput: tokens/s delivered by the memmap (indexed) path and the streaming path.

    python benchmarks/bench_data.py [--quick]

Uses the bundled sample corpus (Python stdlib + its BPE) so it runs anywhere without a download; the
streaming path reads the same text as jsonl. Numbers depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memoryformer.data.config import DataConfig  # noqa: E402
from memoryformer.data.datamodule import LMDataModule  # noqa: E402
from memoryformer.data.sample import _read, stdlib_files  # noqa: E402


def _tokens_per_s(loader, max_batches: int) -> tuple[float, int]:
    it = iter(loader)
    next(it)  # exclude worker start-up and the first mapping load
    n, t0 = 0, time.perf_counter()
    for i, batch in enumerate(it):
        n += batch["input_ids"].numel()
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t0), n


def run(quick: bool) -> str:
    """Markdown section `## Data loading` with tokens/s of each path."""
    cache = os.path.expanduser(os.environ.get("MEMORYFORMER_CACHE", "~/.cache/memoryformer")) + "/data"
    seq_len, mb = 256, 16
    rows = []
    base = DataConfig(source="sample", cache_dir=cache, seq_len=seq_len, val_fraction=0.0)
    for workers in (0, 2):
        cfg = DataConfig(**{**base.__dict__, "num_workers": workers})
        dm = LMDataModule(cfg, mb, 4096, 2048)
        dm.prepare_data()
        dm.setup()
        rate, n = _tokens_per_s(dm.train_dataloader(), 100 if quick else 400)
        rows.append(("memmap (sample corpus, GPT-NeoX mapping)", workers, rate, n))
        tokenizer = dm.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stdlib.jsonl")
        with open(path, "w") as f:
            for p in stdlib_files(1_000_000 if quick else 3_000_000):
                f.write(json.dumps({"text": _read(p)}) + "\n")
        for workers in (0, 2):
            cfg = DataConfig(
                source="files",
                files=[path],
                tokenizer=tokenizer,
                seq_len=seq_len,
                val_fraction=0.0,
                num_workers=workers,
            )
            rate, n = _tokens_per_s(LMDataModule(cfg, mb, 4096, 2048).train_dataloader(), 10**9)
            rows.append(("streaming (jsonl, tokenize + pack)", workers, rate, n))
    lines = [
        "## Data loading",
        "",
        f"Micro-batch {mb} x seq_len {seq_len}, CPU only, {os.cpu_count()} cores; tokens/s of batches",
        "delivered by `LMDataModule.train_dataloader()` (first batch excluded).",
        "",
        "| path | num_workers | tokens/s | tokens measured |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {w} | {rate:,.0f} | {n:,} |" for name, w, rate, n in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    print(run(ap.parse_args().quick))
