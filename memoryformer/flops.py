"""Analytic cost of our models, counted from the instantiated modules' shapes (paper Tables 1, 3 and 5).

Run `python -m memoryformer.flops` for the six paper models, or `--model NAME`, `--seq-len S`, `--json`.

Convention (the paper's, section 2.4 and Table 1): a multiply-add counts as ONE FLOP and costs are for one
block at sequence length s:
- attention scores and mixing (softmax(QK^T) V): 2 s^2 d, with d the attention width; an efficient
  attention core (`model.attention`, paper Table 2) reports its own count (`core.flops(s)`, see
  `memoryformer.models.efficient_attention`);
- a dense `nn.Linear(i, o)`: s * i * o, so a standard block's QKV + output + 4x MLP gives 12 s d^2;
- a `MemoryLayer` reads K rows of width o per token: s * K * o multiply-adds ("exact lookups"). The paper
  rounds a MemoryFormer block's lookups to 6 K s d (exact: 3Kd + K(tau+2)K + Kd = 5.25 K s d at tau=8), and
  its Table 1 uses that rule, which we print as the paper's column beside the exact count.

Everything is counted on the meta device, so MF-base's 6.75B parameters cost no memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from memoryformer.config import PAPER_MODELS, PRESETS, ModelConfig
from memoryformer.nn.memory_layer import MemoryLayer

GIGA = 1e9
MEGA = 1e6
FP16_BYTES = 2

#: Paper Table 1 labels for our preset names.
PAPER_LABELS = {
    "pythia_70m": "Pythia-70M",
    "memoryformer_tiny": "MF-tiny",
    "pythia_160m": "Pythia-160M",
    "memoryformer_small": "MF-small",
    "pythia_410m": "Pythia-410M",
    "memoryformer_base": "MF-base",
}


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
    from memoryformer.models.efficient_attention import ATTENTION_CORES  # late, as in build_on_meta

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
    qkv_layers = [m for m in attn.modules() if isinstance(m, MemoryLayer)]
    qkv_mb = qkv_layers[0].storage_bytes_fp16 / MEGA if qkv_layers else 0.0
    qkv_flops = seq_len * qkv_layers[0].num_tables * qkv_layers[0].out_features if qkv_layers else 0
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


# ---------------------------------------------------------------------- paper table reproductions
#: Paper Table 3's rows (tau, K) at MF-tiny's width 512: tau = 10 fits K = 51 chunks, i.e. 510 hashed dims.
TABLE3_TAUS = (4, 8, 10)


def table3_config(tau: int, width: int = 512) -> ModelConfig:
    """MF-tiny with tau-bit chunks: K = width // tau tables hash the first K * tau dims, outputs stay `width`.

    This is what `experiment=table3_tau` composes (its `div`/`mul` interpolations); for tau = 10 it is the
    paper's d = 510 row, whose Memory Size (53.5 MB) needs Memory Layer outputs of width 512.
    """
    k = width // tau
    return ModelConfig.from_name(
        "memoryformer_tiny", n_embd=width, code_length=tau, num_tables=k, hashed_width=k * tau
    )


def table3_rows(seq_len: int = 2048) -> list[dict]:
    """Paper Table 3 from our modules: d (hashed width), tau, K, output width, FLOPs and Memory Size of
    Memory Layer Q (fp16 storage; FLOPs = s * K * out lookups at s = `seq_len`)."""
    rows = []
    for tau in TABLE3_TAUS:
        cfg = table3_config(tau)
        cost = model_cost(cfg, seq_len)
        rows.append({
            "d": cfg.hash_width, "tau": tau, "K": cfg.num_tables, "out": cfg.n_embd,
            "flops_g": cost.qkv_layer_flops / GIGA, "memory_mb_fp16": cost.qkv_layer_mb_fp16,
        })
    return rows


def table5_rows() -> list[dict]:
    """Paper Table 5's Memory Size column: both Memory Block layers of MF-tiny for expand bits 0..3."""
    out = []
    for extra in range(4):
        cfg = ModelConfig.from_name("memoryformer_tiny", expand_bits=extra)
        hidden = cfg.memory_block_hidden
        mb = memory_layer_mb(cfg.n_embd, hidden, cfg.code_length) + memory_layer_mb(
            hidden, cfg.n_embd, cfg.code_length + extra
        )
        out.append({"expand_bits": extra, "tau_prime": cfg.code_length + extra, "memory_mb_fp16": mb})
    return out


#: Paper Table 2: FLOPs per block at s = 2048 (G) of Pythia-410M with its attention swapped, as printed.
TABLE2_PAPER_G = {"pythia_410m": 34.4, "linformer_410m": 26.1, "cosformer_410m": 30.0, "performer_410m": 26.7}
TABLE2_ATTENTION = {
    "pythia_410m": "softmax", "linformer_410m": "linformer", "cosformer_410m": "cosformer",
    "performer_410m": "performer",
}


def table2_config(row: str) -> ModelConfig:
    """Pythia-410M with the attention of Table 2's `row` and our default knobs (`conf/experiment/<row>`)."""
    return ModelConfig.from_name("pythia_410m", attention=TABLE2_ATTENTION[row])


def _rounds_to(total: float, paper_g: float) -> bool:
    return round(total / GIGA, 1) == paper_g


def _reproducing_setting(row: str, cost: BlockCost, config: ModelConfig) -> str:
    """Which knob value(s) make our count round to the paper's printed number, solved, not guessed."""
    s, h, hs, d = cost.seq_len, config.n_head, config.head_size, config.n_embd
    paper = TABLE2_PAPER_G[row] * GIGA
    base = cost.without_attention_exact
    if row == "performer_410m":
        unit = s * h * (4 * hs + 2)  # cost per feature m (PerformerCore.flops)
        ms = [m for m in range(1, 4 * hs) if _rounds_to(base + m * unit, TABLE2_PAPER_G[row])]
        solved = (paper - base) / unit
        return f"m = {ms[0]}..{ms[-1]} (solved m = {solved:.0f})" if ms else f"none (solved m = {solved:.0f})"
    if row == "linformer_410m":
        from memoryformer.models.efficient_attention import linformer_flops

        ours = [
            f"({block}, {k})"
            for block in (2**i for i in range(4, 12))
            for k in range(1, min(block, 64) + 1)
            if _rounds_to(base + linformer_flops(s, h, hs, k, block), TABLE2_PAPER_G[row])
        ]
        published = [k for k in range(1, s) if _rounds_to(base + 4 * s * k * d, TABLE2_PAPER_G[row])]
        text = f"published (non-causal) form 4 s k d: k = {published[0]}..{published[-1]}"
        return text + (f"; our causal variant only at (L, k) = {', '.join(ours)}" if ours else
                       "; our causal variant: none")
    if row == "cosformer_410m":
        attn = paper - base
        return (f"none: M does not change the cost and the features are fixed at 2 hs = {2 * hs}; the "
                f"paper's {attn / GIGA:.2f} G of attention is {attn / (s * s * d):.2f} s^2 d")
    return "the project's rule (Table 1)"


def table2_rows(seq_len: int = 2048) -> list[dict]:
    """Paper Table 2's FLOPs column: Pythia-410M's block with each attention, counted from the modules."""
    rows = []
    for row in TABLE2_PAPER_G:
        config = table2_config(row)
        cost = model_cost(config, seq_len).block
        knobs = {
            "softmax": "",
            "linformer": f"L={config.linformer_block}, k={config.linformer_k}",
            "cosformer": f"M={config.cosformer_horizon}",
            "performer": f"m={config.performer_num_features}",
        }[config.attention]
        rows.append({
            "row": row, "attention": config.attention, "settings": knobs, "attention_flops": cost.attention,
            "total_exact": cost.total_exact,
            "paper_g": TABLE2_PAPER_G[row] if seq_len == 2048 else None,
            "reproduces_paper": _reproducing_setting(row, cost, config) if seq_len == 2048 else "",
        })
    return rows


def format_table2(rows: list[dict]) -> str:
    """Markdown table of `table2_rows`."""
    lines = [
        "| Row | Attention | Our settings | Attn (G) | Total (G) | Paper (G) "
        "| Setting that gives the paper's |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = "" if r["paper_g"] is None else f"{r['paper_g']:.1f}"
        lines.append(
            f"| `{r['row']}` | {r['attention']} | {r['settings']} | {_g(r['attention_flops'])} "
            f"| {_g(r['total_exact'])} | {paper} | {r['reproduces_paper']} |"
        )
    return "\n".join(lines)


def _g(x: int | float) -> str:
    return f"{x / GIGA:.3f}"


def format_table1(costs: list[ModelCost]) -> str:
    """Markdown table in Table 1's layout, with our exact counts and parameters beside the paper's rule."""
    lines = [
        "| Model | Layers | Hidden | Params | Tables | Non-emb. | Attn (G) | w/o Attn, paper rule (G) "
        "| Total, paper rule (G) | w/o Attn, exact (G) | Total, exact (G) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in costs:
        b = c.block
        lines.append(
            f"| {PAPER_LABELS.get(c.name, c.name)} | {c.layers} | {c.hidden} | {c.params_total / MEGA:,.1f}M "
            f"| {c.params_tables / MEGA:,.1f}M | {c.params_non_embedding / MEGA:,.1f}M | {_g(b.attention)} "
            f"| {_g(b.without_attention_paper)} | {_g(b.total_paper)} | {_g(b.without_attention_exact)} "
            f"| {_g(b.total_exact)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: print Tables 1, 3 and 5 as reproduced from our modules."""
    parser = argparse.ArgumentParser(prog="python -m memoryformer.flops", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(PRESETS), help="model preset (repeatable)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length s (paper: 2048)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    names = args.model or list(PAPER_MODELS)
    costs = [model_cost(name, args.seq_len) for name in names]
    if args.json:
        print(json.dumps({"models": [c.as_dict() for c in costs], "table3": table3_rows(args.seq_len),
                          "table5": table5_rows(), "table2": table2_rows(args.seq_len)}, indent=2))
        return 0
    print(f"## FLOPs per block at s = {args.seq_len} (1 multiply-add = 1 FLOP, G = 1e9)\n")
    print(format_table1(costs))
    if "memoryformer_small" in names and args.seq_len == 2048:
        print(
            "\nNote: the paper prints MF-small as 1.0 G / 7.4 G; its own rule 6Ksd gives 0.906 G / 7.348 G "
            "(a rounding slip in the paper)."
        )
    print(f"\n## Table 2: Pythia-410M's block with an efficient attention, s = {args.seq_len}\n")
    print(format_table2(table2_rows(args.seq_len)))
    print(
        "\nThe paper gives no k, L, M or m. Counts are the prefix-sum / blockwise forms (docstrings of "
        "memoryformer.models.efficient_attention); the last column solves for the knob values whose total "
        "rounds to the paper's number."
    )
    print("\n## Memory Layer storage, fp16 (paper Table 3: one Memory Layer Q)\n")
    print("| d | tau | K | out | FLOPs (G) | Memory Size (MB) |\n|---|---|---|---|---|---|")
    for r in table3_rows(args.seq_len):
        print(
            f"| {r['d']} | {r['tau']} | {r['K']} | {r['out']} | {r['flops_g']:.3f} "
            f"| {r['memory_mb_fp16']:.1f} |"
        )
    print(
        "\nd is the hashed width K * tau; Memory Layer outputs and the residual stream are 512 wide in every "
        "row (model.hashed_width), as the d = 510 row's 53.5 MB requires. The paper prints the FLOPs rounded "
        "up (0.14 / 0.07 / 0.06 G)."
    )
    print("\n## Memory Block storage, fp16 (paper Table 5: both layers of MF-tiny's Memory Block)\n")
    print("| expand bits | tau' | Memory Size (MB) |\n|---|---|---|")
    for r in table5_rows():
        print(f"| {r['expand_bits']} | {r['tau_prime']} | {r['memory_mb_fp16']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
