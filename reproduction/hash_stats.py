"""How a trained MemoryFormer uses its hash tables (the paper's Fig. 4 claims near-uniform bucket usage).

For every Memory Layer, on held-out sequences of the bundled corpus: the mean soft weight of the hashed
chunks, the share of each table's 2**tau buckets that any token hits, and (for the first block) the hit
count of every bucket of the first and last table, for the histogram figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

#: held-out sequences scored (x seq_len tokens): 64 x 128 = 8192 tokens, 32 per bucket of a tau = 8 table
NUM_SEQUENCES = 64


def heldout_tokens(run_dir: Path, seq_len: int, num_sequences: int = NUM_SEQUENCES) -> torch.Tensor:
    """`[n, seq_len]` int64: the first validation tokens of the run's sample corpus, cut into sequences."""
    from memoryformer.data.indexed import MMapIndexedDataset
    from memoryformer.data.sample import build_sample_corpus

    data = OmegaConf.load(run_dir / "checkpoints" / "config.yaml").data
    corpus = build_sample_corpus(
        str(data.cache_dir),
        int(data.sample_max_bytes),
        int(data.sample_vocab_size),
        int(data.sample_val_every),
    )
    val = MMapIndexedDataset(corpus.val_prefix)
    ids = np.concatenate([np.asarray(val[i], dtype=np.int64) for i in range(len(val))])
    n = min(num_sequences, len(ids) // seq_len)
    return torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len))


@torch.no_grad()
def hash_stats(model_dir: Path, seq_len: int) -> dict[str, Any]:
    """Per Memory Layer: `weight_mean`, `used_mean`/`used_min` (share of buckets hit, over the K tables);
    model-wide means; and `histograms`: the first block's bucket counts of its first and last table."""
    from memoryformer.checkpoint import load_model
    from memoryformer.nn.bucket_usage import bucket_counts, bucket_usage, watch_hashes
    from memoryformer.nn.memory_layer import HashCodes

    model, _ = load_model(model_dir)
    captured: dict[str, HashCodes] = {}
    handles = watch_hashes(model, captured.__setitem__)
    try:
        model(heldout_tokens(model_dir.parent, seq_len))
    finally:
        for h in handles:
            h.remove()
    per_layer: dict[str, dict[str, float]] = {}
    histograms: dict[str, list[list[int]]] = {}
    for name, hashed in captured.items():
        codes, tau = hashed.codes(), hashed.code_length
        used = bucket_usage(codes, tau)
        per_layer[name] = {
            "weight_mean": float(hashed.weights.float().mean()),
            "used_mean": float(used.mean()),
            "used_min": float(used.min()),
            "tables": hashed.num_tables,
            "buckets": 1 << tau,
        }
        if name.startswith("blocks.0."):
            counts = bucket_counts(codes, tau)
            histograms[name] = [counts[0].tolist(), counts[-1].tolist()]
    return {
        "tokens": int(next(iter(captured.values())).rows.shape[:-1].numel()) if captured else 0,
        "weight_mean": float(np.mean([s["weight_mean"] for s in per_layer.values()])),
        "used_mean": float(np.mean([s["used_mean"] for s in per_layer.values()])),
        "used_min": float(min(s["used_min"] for s in per_layer.values())),
        "layers": per_layer,
        "histograms": histograms,
    }
