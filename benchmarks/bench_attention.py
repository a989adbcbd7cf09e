"""Case 6: the efficient attentions of the paper's Table 2 against softmax (SDPA), forward and backward.

One attention core (`model.attention`) of Pythia-410M's shape: batch 1, 16 heads of 64 dims, rotary on 16
of them, fp32 on CPU, at s = 512, 2048 and 8192. The inputs are the projected q, k, v, so the times are the
attention alone (no QKV or output projection). Settings are the experiments' defaults: Linformer L = 256,
k = 64; cosFormer M = block_size; Performer m = 266. The crossover is where softmax's time equals the
variant's, interpolated log-log between the two measured lengths that bracket it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

# `python benchmarks/bench_attention.py` alone (without run.py): this checkout's package and benchutil
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from benchutil import cpu_model, fmt_ratio, fmt_time, load_average, md_table, measure  # noqa: E402

from memoryformer.config import ModelConfig  # noqa: E402
from memoryformer.models.attention_cores import build_attention_core  # noqa: E402
from memoryformer.nn.rotary import rotary_cos_sin  # noqa: E402

ATTENTIONS = ("softmax", "linformer", "cosformer", "performer")


def _time(core: torch.nn.Module, s: int, heads: int, head_size: int, rotary: int, budget: float,
          backward: bool) -> float:
    """Median seconds of one forward (no grad) or forward + backward of `core` on random q, k, v."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, head_size, generator=gen) for _ in range(3))
    cos, sin = rotary_cos_sin(torch.arange(s), rotary)
    long = s >= 4096  # one warm-up and two timed calls at most: these take seconds each on a laptop CPU
    kwargs = dict(budget_s=budget, min_reps=2 if long else 3, max_reps=2 if long else 50, warmup=1)
    if not backward:
        with torch.no_grad():
            return measure(lambda: core(q, k, v, cos, sin), **kwargs).median
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    grad = torch.randn(1, s, heads * head_size, generator=gen)

    def step() -> None:
        for t in (*leaves, *core.parameters()):
            t.grad = None
        core(*leaves, cos, sin).backward(grad)

    return measure(step, **kwargs).median


def crossover(lengths: list[int], softmax: list[float], other: list[float]) -> str:
    """Where `other` beats softmax, with each crossing interpolated log-log between measured lengths.

    "wins above ~1024" (one crossing), "wins at every length" / "slower at every length" (none), or
    every crossing in order when noise or two regimes give several ("wins below ~700, above ~4000").
    """
    ratio = [math.log(a / b) for a, b in zip(softmax, other, strict=True)]  # > 0: the variant is faster
    if all(r > 0 for r in ratio):
        return f"wins at every length (< {lengths[0]})"
    if all(r <= 0 for r in ratio):
        return f"slower at every length (> {lengths[-1]})"
    parts = []
    for i in range(len(lengths) - 1):
        if (ratio[i] > 0) != (ratio[i + 1] > 0):
            x0, x1 = math.log(lengths[i]), math.log(lengths[i + 1])
            x = x0 + (x1 - x0) * ratio[i] / (ratio[i] - ratio[i + 1])
            parts.append(f"{'above' if ratio[i + 1] > 0 else 'below'} ~{round(math.exp(x))}")
    return "wins " + ", ".join(parts)


def run(quick: bool = False) -> str:
    """Markdown section for case 6; `quick` uses short sequences and tiny budgets (CI)."""
    lengths = [64, 256] if quick else [512, 2048, 8192]
    budget = 0.02 if quick else 0.5
    config = ModelConfig.from_name("pythia_410m", vocab_size=128, n_layer=1)
    heads, hs = config.n_head, config.head_size
    torch.manual_seed(0)
    cores = {name: build_attention_core(ModelConfig.from_dict({**config.to_dict(), "attention": name}))
             for name in ATTENTIONS}
    times: dict[tuple[str, bool], list[float]] = {}
    for backward in (False, True):
        for name, core in cores.items():
            times[name, backward] = [
                _time(core, s, heads, hs, config.rotary_ndims, budget, backward) for s in lengths
            ]
    out = [
        "## 6. Efficient attention vs softmax (paper Table 2): one attention core, fp32 CPU\n",
        f"Batch 1, {heads} heads x {hs} dims (Pythia-410M), rotary on {config.rotary_ndims} dims; softmax is "
        f"`F.scaled_dot_product_attention(is_causal=True)`; Linformer L = {config.linformer_block}, "
        f"k = {config.linformer_k}; cosFormer M = {config.cosformer_horizon}; Performer "
        f"m = {config.performer_num_features}. Speed-up = softmax time / variant time. "
        f"Load average: {load_average()}.\n",
    ]
    for backward, title in ((False, "Forward (no grad)"), (True, "Forward + backward")):
        rows = []
        for name in ATTENTIONS:
            t = times[name, backward]
            base = times["softmax", backward]
            cells = [f"{fmt_time(x)} ({fmt_ratio(b / x)})" for x, b in zip(t, base, strict=True)]
            cross = "" if name == "softmax" else crossover(lengths, base, t)
            rows.append([name, *cells, cross])
        out.append(f"### {title}\n")
        out.append(md_table(["attention", *(f"s = {s} (speed-up)" for s in lengths), "crossover"], rows))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    # Standalone: a machine line first (run.py prints its own header with the same facts).
    print(f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print(run(quick="--quick" in sys.argv))
