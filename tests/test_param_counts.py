"""Parameter counts, built on the meta device (no memory), against published numbers.

Pythia: EleutherAI's totals and non-embedding counts (Pythia README, vocabulary padded to 50304).
MemoryFormer: docs/paper-notes.md §6, derived from the released shapes, compared to the rounding
printed there.
"""

from __future__ import annotations

import pytest
import torch

from memoryformer.models import LanguageModel, build_model
from memoryformer.nn.memory_layer import MemoryLayer


def on_meta(name: str, **overrides) -> LanguageModel:
    with torch.device("meta"):
        return build_model(name, **overrides)


def block_params(model: LanguageModel) -> int:
    return sum(p.numel() for p in model.blocks[0].parameters())


def table_params(model: LanguageModel) -> int:
    return sum(m.tables.numel() for m in model.modules() if isinstance(m, MemoryLayer))


@pytest.mark.parametrize(
    "name, total, non_embedding",
    [
        ("pythia_70m", 70_426_624, 18_915_328),
        ("pythia_160m", 162_322_944, 85_056_000),
        ("pythia_410m", 405_334_016, 302_311_424),
    ],
)
def test_pythia_counts_equal_eleutherai(name, total, non_embedding):
    model = on_meta(name)
    assert model.config.vocab_size == 50304
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == non_embedding


@pytest.mark.parametrize(
    "name, per_block_m, qkv_m, memory_block_m",
    [
        ("mf_tiny", 69.2, 25.2, 44.0),
        ("mf_small", 155.7, None, None),
        ("mf_base", 276.8, None, None),
    ],
)
def test_memoryformer_block_counts_match_paper_section_6(name, per_block_m, qkv_m, memory_block_m):
    model = on_meta(name)
    block = model.blocks[0]
    assert round(block_params(model) / 1e6, 1) == per_block_m
    if qkv_m is not None:
        assert round(sum(p.numel() for p in block.attn.parameters()) / 1e6, 1) == qkv_m
        assert round(sum(p.numel() for p in block.ffn.parameters()) / 1e6, 1) == memory_block_m
        # fp16: 3 x 16.8 MB (Table 3) + 88.1 MB (Table 5) = 138.4 MB of tables per block.
        tables_mb = sum(m.storage_bytes_fp16 for m in block.modules() if isinstance(m, MemoryLayer)) / 1e6
        assert round(tables_mb, 1) == 138.4


def test_memoryformer_totals_match_paper_section_6():
    tiny = on_meta("mf_tiny")
    assert round(tiny.num_parameters() / 1e6, 1) == 466.8
    assert round(table_params(tiny) / 1e6, 1) == 415.2
    assert round(table_params(tiny) * 2 / 1e9, 2) == 0.83  # GB in fp16
    assert round(on_meta("mf_small").num_parameters() / 1e9, 2) == 1.95
    assert round(on_meta("mf_small_released").num_parameters() / 1e9, 2) == 1.01
    base = on_meta("mf_base")
    assert round(base.num_parameters() / 1e9, 2) == 6.75
    assert round(table_params(base) / 1e9, 2) == 6.64
    assert round(table_params(base) * 2 / 1e9, 1) == 13.3


def test_untied_embedding_and_head_at_50304():
    model = on_meta("mf_tiny")
    assert model.wte.weight.shape == (50304, 512)
    assert model.lm_head.weight.shape == (50304, 512)
    assert model.num_parameters() - model.num_parameters(exclude_embeddings=True) == 2 * 50304 * 512
