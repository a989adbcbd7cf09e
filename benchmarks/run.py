"""Run every benchmark and write docs/benchmarks.md (`make bench`; `--quick` for CI).

Usage: `python benchmarks/run.py [--quick] [--out docs/benchmarks.md] [--threads N] [--only NAME ...]`

Each `benchmarks/bench_*.py` module provides `run(quick: bool) -> str`, a Markdown section; ours come
first in case order (Memory Layer, then whole models), then every other module in name order. A module
that fails to import or run is reported in the file with its error instead of stopping the others.
Timings are never asserted: they depend on the machine and on who else is using it.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import torch  # noqa: E402
from benchutil import copy_bandwidth, cpu_model, load_average, matmul_flops  # noqa: E402

OWN_ORDER = ("bench_memory_layer", "bench_models", "bench_throughput", "bench_attention")

NOTES = """## How to read these numbers

- **Compute paths.** `torch` is the authors' reference (gather K rows into `[tokens, K, d_out]`, multiply,
  sum); `auto`, the default, is the fused kernel (the "fused" columns):
  `memoryformer/cpu_kernels/memory_lookup.cpp` on CPU and `embedding_bag` on CUDA. The C++ forward has two
  loops, both with fp32 accumulation for fp32/bf16/fp16 tables: per token (AVX2 register tiles of 64
  columns, rows prefetched 8 ahead; no parallel region for one or two tokens) and, once every table row is
  read by about three tokens or more, a cache-blocked loop: for each block of 2048 tokens and 64-column slab
  it packs two tables' slabs (128 KiB) into L2 and lets every token of the block read them there, so the
  table streams from memory once per block instead of once per token (at 4096 tokens: 64 MiB instead of 512
  MiB). The backward buckets (token, table) pairs by row chunk so that each thread owns its rows (no
  atomics, deterministic) and writes only the touched rows of a gradient that comes zeroed from fresh mmap
  pages, so the untouched rows cost nothing (huge pages once about 1 row in 16 is touched). Without
  gradients a whole `MemoryLayer` (hash + lookup + bias) is one C++ call.
- **The floor is not a floor at many tokens.** It assumes every selected row comes from DRAM; the blocked
  loop reads each row from memory once per 2048 tokens, so `fused / floor` drops well below 1 at 4096
  tokens. At one token, fixed call costs (Python, op dispatch) are most of the time.
- **Forward + backward at a few tokens** is still far above the floor: the table gradient is dense (33 MB
  for a 512 x 512 layer), and autograd hands a new one to every step. Writing only the touched rows into
  lazily zeroed pages cut 1 token from ~17 ms to under 1 ms; what is left is page faults (~3 us per 4 KiB
  page on this VM) and, for the layer, the torch ops of the hash's backward.
- **Decode is bounded by the LM head.** Both models keep the untied 512 x 50304 head (103 MB fp32 read per
  token). Case 2 prints that bound next to the measured speed-up.
- **Training costs more, not less, on CPU.** MemoryFormer-tiny has 467M parameters (415M in tables) against
  Pythia-70M's 70M: with AdamW every step writes a dense gradient for every table and updates 467M
  parameters and two moments, which dwarfs the saved FLOPs at small batch. With tau = 8 a batch of a few
  hundred tokens already touches almost every row of every table, so a sparse update would not help much.
  A profile of one MemoryFormer-tiny step (batch 4 x 128, one thread, foreach AdamW) spent 50% in AdamW,
  20% in the LM head and 18% in the Memory Layer lookups (forward + backward). `AdamW(fused=True)`, used
  here, is about 4x faster than the foreach default on CPU.
- **FLOPs vs time.** Table 1 counts multiply-adds; a lookup multiply-add moves 4 bytes from memory while a
  matmul multiply-add reuses data from registers, so a 16x cut in FLOPs is not a 16x cut in time on a CPU
  whose matmul runs at tens to hundreds of GFLOP/s.
- **Noise.** On a shared machine, OpenMP parallel regions wait for descheduled threads; when the load
  average exceeds the core count, run with `--threads 1` for stable ratios.
"""


def kept_sections(text: str) -> list[str]:
    """The `<!-- keep:NAME -->` ... `<!-- /keep:NAME -->` blocks of an earlier report: sections written by
    other scripts (e.g. `compare_train_step.py`), which a rewrite of the file carries over unchanged."""
    return [m.group(0) for m in re.finditer(r"<!-- keep:([\w-]+) -->.*?<!-- /keep:\1 -->\n?", text, re.S)]


def discover() -> list[str]:
    """Module names of every `bench_*.py` here: ours in case order, then the rest sorted."""
    found = sorted(p.stem for p in HERE.glob("bench_*.py"))
    return [m for m in OWN_ORDER if m in found] + [m for m in found if m not in OWN_ORDER]


def _version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return "not installed"


def header(quick: bool) -> str:
    """Machine, threads and library versions, with the copy bandwidth and matmul speed measured now."""
    from memoryformer.nn import memory_ops

    built = memory_ops.load_cpu_extension() is not None
    kernel = "built" if built else "unavailable (embedding_bag fallback)"
    bandwidth = copy_bandwidth(16 if quick else 256)
    flops = matmul_flops(256 if quick else 2048)
    versions = ", ".join(f"{n} {_version(n)}" for n in ("torch", "transformers", "numpy"))
    return (
        "# Benchmarks\n\n"
        f"Written by `python benchmarks/run.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Every time is the median of repeated runs; ratios compare "
        f"numbers measured in this same run. The machine is shared, so the load average is printed beside "
        f"each case: above the core count, other processes were competing for the cores.\n\n"
        f"- Machine: {cpu_model()}, {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; CUDA "
        f"{'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}\n"
        f"- Python {platform.python_version()}; {versions}\n"
        f"- Memory Layer C++ kernel: {kernel}\n"
        f"- Copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); fp32 matmul {flops / 1e9:.0f} GFLOP/s\n"
        f"- Load average at start: {load_average()}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the Markdown report; returns the number of modules that failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=None, help="module names to run (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [header(args.quick)]
    failures = 0
    for name in discover():
        if args.only is not None and name not in args.only:
            continue
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            text = importlib.import_module(name).run(quick=args.quick)
        except Exception as err:
            failures += 1
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            text = f"## {name}\n\nSkipped: {type(err).__name__}: {first}\n"
            traceback.print_exc()
        print(f"[bench] {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        sections.append(text.rstrip() + "\n")
    if args.out.exists():
        sections += kept_sections(args.out.read_text())
    sections.append(NOTES)
    report = "\n".join(sections)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return failures


if __name__ == "__main__":
    main()
