"""Analytic cost of our models, counted from the instantiated modules' shapes (paper Tables 1, 3 and 5).

Training (MFU, `training_flops_per_token`) and evaluation reports use this counter; the paper's tables
printed from it are `benchmarks/paper_flops.py` (`make flops`).

Convention (the paper's, section 2.4 and Table 1): a multiply-add counts as ONE FLOP and costs are for one
block at sequence length s:
- attention scores and mixing (softmax(QK^T) V): 2 s^2 d, with d the attention width; an efficient
  attention core (`model.attention`, paper Table 2) reports its own count (`core.flops(s)`, see
  `memoryformer.models.attention_cores`);
- a dense `nn.Linear(i, o)`: s * i * o, so a standard block's QKV + output + 4x MLP gives 12 s d^2;
- a `MemoryLayer` reads K rows of width o per token: s * K * o multiply-adds ("exact lookups"). The paper
  rounds a MemoryFormer block's lookups to 6 K s d (exact: 3Kd + K(tau+2)K + Kd = 5.25 K s d at tau=8), and
  its Table 1 uses that rule, which we print as the paper's column beside the exact count.

Everything is counted on the meta device, so MF-base's 6.75B parameters cost no memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.attention import QKV_PARTS
from memoryformer.nn.memory_layer import MemoryLayer

#: FLOPs per multiply-add in the usual MFU convention (TFLOP/s, MFU, GPU datasheet peaks); this module's own
#: counts use the paper's convention of ONE FLOP per multiply-add, so multiply them by this for MFU.
FLOPS_PER_MAC = 2

GIGA = 1e9
MEGA = 1e6
FP16_BYTES = 2

#: Dense bf16/fp16 peak per device in TFLOP/s (two FLOPs per multiply-add, no sparsity) from the vendors'
#: datasheets, keyed by a part of the name `torch.cuda.get_device_name` reports; for MFU and estimates.
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H200": 989.0, "H100 PCIe": 756.0,
                    "A100": 312.0}


def peak_bf16_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of the device whose name contains a key of `PEAK_BF16_TFLOPS` (None: not
    listed)."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)

@dataclass
class BlockCost:
    """Multiply-adds of one block at sequence length `seq_len` (one multiply-add = one FLOP).

    `attention` = 2 s^2 d; `dense` = sum over nn.Linear of s*i*o; `lookups` = sum over MemoryLayer of s*K*o;
    `without_attention_paper` applies the paper's rule (6 K s d for a block made of Memory Layers only,
    the dense count otherwise); `without_attention_exact` = dense + lookups.
    """

    seq_len: int
    attention: int
    dense: int
    lookups: int
    without_attention_paper: int
    num_tables: int

    @property
    def without_attention_exact(self) -> int:
        """Dense multiply-adds plus exact lookup multiply-adds, without attention."""
        return self.dense + self.lookups

    @property
    def total_paper(self) -> int:
        """Paper Table 1's "Total FLOPs" column: attention plus the paper's rule."""
        return self.attention + self.without_attention_paper

    @property
    def total_exact(self) -> int:
        """Attention plus exact dense and lookup multiply-adds."""
        return self.attention + self.without_attention_exact


@dataclass
class ModelCost:
    """Parameters, per-block FLOPs and table storage of one model configuration."""

    name: str
    layers: int
    hidden: int
    params_total: int
    params_tables: int
    params_non_embedding: int
    block: BlockCost
    qkv_layer_mb_fp16: float  # storage of Memory Layer Q (paper Table 3's "Memory Size")
    memory_block_mb_fp16: float  # storage of both Memory Block layers (paper Table 5's "Memory Size")
    tables_gb_fp16: float  # all tables of the whole model
    head_per_token: int = 0  # multiply-adds of the LM head per token (n_embd x vocab)
    qkv_layer_flops: int = 0  # lookups of Memory Layer Q at seq_len: s * K * out (paper Table 3's FLOPs)

    def as_dict(self) -> dict:
        """JSON-ready dict, with derived block totals spelled out."""
        d = asdict(self)
        d["block"].update(
            without_attention_exact=self.block.without_attention_exact,
            total_paper=self.block.total_paper,
            total_exact=self.block.total_exact,
        )
        return d


def build_on_meta(config: ModelConfig) -> nn.Module:
    """Instantiate `LanguageModel(config)` on the meta device: shapes only, no memory."""
    from memoryformer.models import LanguageModel  # imported late: the models import this module's users

    with torch.device("meta"):
        return LanguageModel(config)


def block_cost(block: nn.Module, config: ModelConfig, seq_len: int) -> BlockCost:
    """Count one block's multiply-adds from its submodules' shapes (see the module docstring)."""
    dense = 0
    lookups = 0
    tables: set[int] = set()
    for module in block.modules():
        if isinstance(module, nn.Linear):
            dense += seq_len * module.in_features * module.out_features
        elif isinstance(module, MemoryLayer):
            lookups += seq_len * module.num_tables * module.out_features
            tables.add(module.num_tables)
    d = config.n_embd
    core = _attention_core(block)
    attention = core.flops(seq_len) if core is not None else 2 * seq_len * seq_len * d
    if lookups and not dense:
        if len(tables) != 1:
            raise ValueError(f"Memory Layers of one block disagree on the table count K: {sorted(tables)}.")
        (k,) = tables
        paper = 6 * k * seq_len * d
    else:
        paper = dense + lookups
    return BlockCost(
        seq_len=seq_len,
        attention=attention,
        dense=dense,
        lookups=lookups,
        without_attention_paper=paper,
        num_tables=max(tables) if tables else 0,
    )


def _attention_core(block: nn.Module) -> nn.Module | None:
    """The block's attention core (softmax, Performer, ...), or None for a block without one."""
    from memoryformer.models.attention_cores import ATTENTION_CORES  # late, as in build_on_meta

    core_types = tuple(ATTENTION_CORES.values())
    return next((m for m in block.modules() if isinstance(m, core_types)), None)


def memory_layer_mb(in_features: int, out_features: int, code_length: int) -> float:
    """fp16 storage of one Memory Layer's tables in decimal MB: K * 2**tau * out * 2 bytes (Tables 3, 5)."""
    with torch.device("meta"):
        layer = MemoryLayer(in_features, out_features, code_length=code_length)
    return layer.storage_bytes_fp16 / MEGA


def model_cost(config: ModelConfig | str, seq_len: int = 2048) -> ModelCost:
    """Parameters, FLOPs per block and table storage of a model, from its modules on the meta device."""
    if isinstance(config, str):
        config = ModelConfig.from_name(config)
    model = build_on_meta(config)
    total = sum(p.numel() for p in model.parameters())
    memory_layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    tables = sum(m.tables.numel() for m in memory_layers)
    embeddings = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)
    ) + _lm_head_params(model)
    first = model.blocks[0]
    attn = getattr(first, "attn", first)
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, MemoryLayer):  # Q, K and V side by side in one layer: Memory Layer Q is a third
        qkv_mb = qkv.storage_bytes_fp16 / QKV_PARTS / MEGA
        qkv_flops = seq_len * qkv.num_tables * (qkv.out_features // QKV_PARTS)
    else:
        qkv_mb, qkv_flops = 0.0, 0
    ffn_layers = _memory_block_layers(first)
    return ModelCost(
        name=config.name,
        layers=config.n_layer,
        hidden=config.n_embd,
        params_total=total,
        params_tables=tables,
        params_non_embedding=total - embeddings,
        block=block_cost(first, config, seq_len),
        qkv_layer_mb_fp16=qkv_mb,
        memory_block_mb_fp16=sum(m.storage_bytes_fp16 for m in ffn_layers) / MEGA,
        tables_gb_fp16=tables * FP16_BYTES / GIGA,
        head_per_token=_lm_head_params(model),
        qkv_layer_flops=qkv_flops,
    )


def _lm_head_params(model: nn.Module) -> int:
    head = getattr(model, "lm_head", None)
    return sum(p.numel() for p in head.parameters()) if head is not None else 0


def _memory_block_layers(block: nn.Module) -> list[MemoryLayer]:
    """The Memory Layers of a block's feed-forward part (`block.ffn`), i.e. the Memory Block's two layers."""
    ffn = getattr(block, "ffn", None)
    return [m for m in ffn.modules() if isinstance(m, MemoryLayer)] if ffn is not None else []


def training_flops_per_token(config: ModelConfig | str, seq_len: int) -> float:
    """Multiply-adds per token of one training step (forward + backward = 3x forward), whole model.

    Blocks use the exact count (dense + lookups + attention) and the LM head its dense size. The backward
    of a lookup is a scatter-add of the same size plus the weight gradient, so 3x is the usual estimate
    for both block types. Multiply by 2 for FLOPs in the "two per multiply-add" convention of MFU.
    """
    cost = model_cost(config, seq_len)
    return 3.0 * (cost.layers * cost.block.total_exact / seq_len + cost.head_per_token)
