"""Shared pieces of the benchmarks: robust timing, machine facts and Markdown tables.

Timings are medians over repeats (the machines we share are noisy), each reported with the load average
at the time, so that a reader can tell a quiet measurement from a crowded one.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Median and inter-quartile range of `reps` timed calls, in seconds."""

    median: float
    q1: float
    q3: float
    reps: int


def measure(fn: Callable[[], object], budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 200,
            warmup: int = 1) -> Timing:
    """Time `fn()` after `warmup` untimed calls, repeating until `budget_s` is spent (at least `min_reps`)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
    else:
        q1, q3 = min(times), max(times)
    return Timing(statistics.median(times), q1, q3, len(times))


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. "3.10 on 2 cores" ("n/a" where unknown)."""
    try:
        return f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "n/a"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_kib_field(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a Linux /proc file, in bytes; None where the file or the key is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def copy_bandwidth(megabytes: int = 256) -> float:
    """Measured copy bandwidth in bytes/s, counting read plus write (2 x buffer size per copy); median."""
    src = torch.randn(megabytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), budget_s=1.0, min_reps=5, warmup=2)
    return 2 * src.numel() * 4 / t.median


def matmul_flops(n: int = 2048) -> float:
    """Measured fp32 matmul throughput in FLOP/s (2 n^3 per n x n product); median."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = measure(lambda: a @ b, budget_s=1.0, min_reps=3, warmup=1)
    return 2 * n**3 / t.median


def fmt_time(seconds: float) -> str:
    """Human time: "12.3 us", "4.56 ms", "1.23 s"."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_ratio(x: float) -> str:
    """A ratio as "3.2x"."""
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
