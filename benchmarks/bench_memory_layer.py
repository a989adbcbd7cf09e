"""Case 1: one Memory Layer, forward and forward+backward, against the torch reference, `nn.Linear` and
the bandwidth floor (bytes that must move / measured copy bandwidth).

Lookup columns time `weighted_lookup` alone on precomputed codes (the part the compute paths differ in);
layer columns time the whole `MemoryLayer` (hash + lookup + bias), the drop-in for `nn.Linear`.
"""

from __future__ import annotations

import torch
from benchutil import copy_bandwidth, fmt_ratio, fmt_time, load_average, md_table, measure

from memoryformer.nn import memory_ops
from memoryformer.nn.memory_layer import MemoryLayer


def _floor_bytes(tokens: int, k: int, d_out: int) -> int:
    """fp32 bytes of the K selected rows per token plus the output (the issue's definition)."""
    return 4 * tokens * k * d_out + 4 * tokens * d_out


def _case_rows(n: int, layer: MemoryLayer, ref_layer: MemoryLayer, linear: torch.nn.Module, floor: float,
               budget: float) -> tuple[list, list, dict[str, float]]:
    """One forward row and one forward+backward row of the tables for `n` tokens, and the raw ratios."""
    tables = layer.tables
    slow_budget = budget if n <= 512 else max(budget, 2.0)
    x = torch.randn(n, layer.in_features)
    with torch.no_grad():
        hashed = layer.hash(x)
    rows, weights = hashed.rows, hashed.weights
    w_req = weights.clone().requires_grad_(True)
    x_req = x.clone().requires_grad_(True)
    grad_out = torch.randn(n, layer.out_features)

    def lookup(impl: str, w: torch.Tensor = weights) -> torch.Tensor:
        return memory_ops.weighted_lookup(rows, w, tables, impl=impl)

    def bag(w: torch.Tensor = weights) -> torch.Tensor:
        return memory_ops.embedding_bag_lookup(rows, w, tables)

    def step(fn, params) -> None:
        for p in params:
            p.grad = None
        fn().backward(grad_out)

    with torch.no_grad():
        t_fused = measure(lambda: lookup("auto"), budget).median
        t_bag = measure(bag, budget).median
        t_ref = measure(lambda: lookup("torch"), slow_budget).median
        t_layer = measure(lambda: layer(x), budget).median
        t_layer_ref = measure(lambda: ref_layer(x), slow_budget).median
        t_linear = measure(lambda: linear(x), budget).median
    fwd = [
        n, fmt_time(floor), fmt_time(t_fused), fmt_time(t_bag), fmt_time(t_ref), fmt_ratio(t_ref / t_fused),
        fmt_ratio(t_fused / floor), fmt_time(t_layer), fmt_time(t_layer_ref), fmt_time(t_linear),
        fmt_ratio(t_linear / t_layer),
    ]
    raw = {"ref/fused": t_ref / t_fused, "fused/floor": t_fused / floor, "linear/layer": t_linear / t_layer}
    lookup_params = [tables, w_req]
    t_fused = measure(lambda: step(lambda: lookup("auto", w_req), lookup_params), budget).median
    t_bag = measure(lambda: step(lambda: bag(w_req), lookup_params), budget).median
    t_ref = measure(lambda: step(lambda: lookup("torch", w_req), lookup_params), slow_budget).median
    t_layer = measure(lambda: step(lambda: layer(x_req), [*layer.parameters(), x_req]), budget).median
    t_linear = measure(lambda: step(lambda: linear(x_req), [*linear.parameters(), x_req]), budget).median
    for p in (*layer.parameters(), *linear.parameters()):
        p.grad = None
    bwd = [
        n, fmt_time(3 * floor), fmt_time(t_fused), fmt_time(t_bag), fmt_time(t_ref),
        fmt_ratio(t_ref / t_fused), fmt_ratio(t_fused / (3 * floor)), fmt_time(t_layer), fmt_time(t_linear),
        fmt_ratio(t_linear / t_layer),
    ]
    raw["fused/3floor"] = t_fused / (3 * floor)
    return fwd, bwd, raw


def run(quick: bool = False) -> str:
    """Markdown section for case 1; `quick` uses a small layer and few tokens so that CI stays fast."""
    d_in, d_out, tau = (64, 48, 8) if quick else (512, 512, 8)
    token_counts = [1, 8, 64] if quick else [1, 8, 64, 512, 4096]
    budget = 0.05 if quick else 1.0
    k = d_in // tau
    bandwidth = copy_bandwidth(16 if quick else 256)
    torch.manual_seed(0)
    layer = MemoryLayer(d_in, d_out, code_length=tau, impl="auto")
    ref_layer = MemoryLayer(d_in, d_out, code_length=tau, impl="torch")
    ref_layer.load_state_dict(layer.state_dict())
    linear = torch.nn.Linear(d_in, d_out)
    fwd_rows, bwd_rows, raw = [], [], {}
    for n in token_counts:
        floor = _floor_bytes(n, k, d_out) / bandwidth
        fwd, bwd, raw[n] = _case_rows(n, layer, ref_layer, linear, floor, budget)
        fwd_rows.append(fwd)
        bwd_rows.append(bwd)

    head = (
        f"## 1. Memory Layer: d_in = {d_in}, d_out = {d_out}, tau = {tau}, K = {k}\n\n"
        f"fp32, `auto` (the fused kernel) resolves to `{memory_ops.resolve_impl('auto', layer.tables)}` "
        f"here. Copy bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (read + write); the floor is (4 B x K x d_out + 4 B x d_out) per token "
        f"over it, and three times that for forward+backward. Lookup = `weighted_lookup` on precomputed "
        f"codes; layer = hash + lookup + bias (`MemoryLayer`), the drop-in for `nn.Linear({d_in}, {d_out})`. "
        f"Load average after the case: {load_average()}.\n\n"
    )
    fwd = md_table(
        ["tokens", "floor", "lookup fused", "lookup embedding_bag", "lookup torch ref", "ref / fused",
         "fused / floor", "layer auto", "layer torch", "nn.Linear", "Linear / layer"],
        fwd_rows,
    )
    bwd = md_table(
        ["tokens", "3 x floor", "lookup fused", "lookup embedding_bag", "lookup torch ref", "ref / fused",
         "fused / 3 floor", "layer auto", "nn.Linear", "Linear / layer"],
        bwd_rows,
    )
    big, one = max(token_counts), min(token_counts)
    targets = md_table(["target (from the issue)", "goal", "reached here", "met"], [
        _target(f"forward at {big} tokens: torch ref / fused", raw[big]["ref/fused"], ">=", 20),
        _target(f"forward at {big} tokens: fused / floor", raw[big]["fused/floor"], "<=", 1.3),
        _target(f"fwd+bwd at {big} tokens: fused / (3 x floor)", raw[big]["fused/3floor"], "<=", 1.5),
        _target(f"decode ({one} token): nn.Linear / Memory Layer", raw[one]["linear/layer"], ">=", 3),
    ])
    return (head + "### Forward (no grad)\n\n" + fwd + "\n\n### Forward + backward\n\n" + bwd
            + "\n\n### Targets\n\n" + targets + "\n")


def _target(label: str, value: float, op: str, goal: float) -> list[str]:
    met = value >= goal if op == ">=" else value <= goal
    return [label, f"{op} {goal}x", fmt_ratio(value), "yes" if met else "no"]
