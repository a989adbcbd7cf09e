"""CPU training-step time of two source trees side by side -> a kept section of docs/benchmarks.md.

Usage: `python benchmarks/compare_train_step.py --before /path/to/old/tree [--after .] [--rounds 5]`

One step = `loss = model(idx, targets)[1]; loss.backward(); AdamW(fused=True).step(); zero_grad()`, fp32,
on random tokens, after two untimed warm-up steps. Cases (the speed bullet of the scale-path issue):
`nano_cpu`, the `make train` step (model nano, micro-batch 16 x 128), and `mf_tiny`, MemoryFormer-tiny at
micro-batch 2 x 512. Each (tree, case) runs in its own process with `PYTHONPATH=<tree>`, so each tree
imports its own `memoryformer`; the trees alternate round by round, so that load from other processes on a
shared machine falls on both alike. Every round times `--steps` steps; the table reports the median over
all steps of all rounds, the inter-quartile range, and after / before.

The section is written between `<!-- keep:train-step-compare -->` markers, which `benchmarks/run.py` carries
over when it rewrites the file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEEP_NAME = "train-step-compare"

#: case -> (model preset, micro-batch, sequence length)
CASES = {"nano_cpu": ("nano", 16, 128), "mf_tiny": ("mf_tiny", 2, 512)}


def worker(case: str, steps: int) -> list[float]:
    """Seconds of each of `steps` timed training steps of `case` in this process's `memoryformer`."""
    import torch

    from memoryformer.config import ModelConfig
    from memoryformer.models import LanguageModel

    preset, batch, seq = CASES[case]
    torch.manual_seed(0)
    with torch.device("meta"):  # skip the init's two passes over 467M table entries: any random values do
        model = LanguageModel(ModelConfig.from_name(preset, block_size=max(seq, 128)))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=gen)
    idx, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        loss = model(idx, targets)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def _run_worker(tree: Path, case: str, steps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _git_head(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(times, n=4) if len(times) >= 4 else (min(times),) * 3
    return q1, statistics.median(times), q3


def section(results: dict[str, dict[str, list[float]]], trees: dict[str, Path], args: argparse.Namespace,
            loads: list[float]) -> str:
    """The Markdown section: machine, command, and per case the medians of both trees and their ratio."""
    sys.path.insert(0, str(HERE))
    import torch
    from benchutil import cpu_model, md_table  # noqa: PLC0415 (benchmarks/ is not a package)

    rows = []
    for case, by_tree in results.items():
        preset, batch, seq = CASES[case]
        b_q1, b_med, b_q3 = _quartiles(by_tree["before"])
        a_q1, a_med, a_q3 = _quartiles(by_tree["after"])
        rows.append([
            f"{case} ({preset}, {batch} x {seq})", f"{b_med:.3f} s ({b_q1:.3f}-{b_q3:.3f})",
            f"{a_med:.3f} s ({a_q1:.3f}-{a_q3:.3f})", f"{a_med / b_med:.2f}", len(by_tree["after"]),
        ])
    cmd = (f"python benchmarks/compare_train_step.py --before <tree at {_git_head(trees['before'])}> "
           f"--rounds {args.rounds} --steps {args.steps}")
    return (
        f"<!-- keep:{KEEP_NAME} -->\n"
        f"## Training step before and after the hot-path changes (CPU)\n\n"
        f"Written by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M')}, in the tree at "
        f"{_git_head(trees['after'])}. Machine: {cpu_model()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}. One step = forward with loss, backward, fused AdamW step, fp32, random "
        f"tokens. Times are the median (inter-quartile range) over all timed steps; the two trees alternate "
        f"round by round. The machine is shared: the 1-minute load average ranged "
        f"{min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores during the run, so differences "
        f"within the inter-quartile ranges are noise.\n\n"
        + md_table(["case (model, micro-batch)", "before", "after", "after / before", "steps each"], rows)
        + f"\n<!-- /keep:{KEEP_NAME} -->\n"
    )


def write_kept_section(path: Path, text: str) -> None:
    """Replace the `KEEP_NAME` block of `path` by `text` (append it if absent)."""
    old = path.read_text() if path.exists() else ""
    begin, end = f"<!-- keep:{KEEP_NAME} -->", f"<!-- /keep:{KEEP_NAME} -->\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments; as `--worker`, print one case's step times as JSON, else compare the trees."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the tree to compare against (e.g. a clean checkout)")
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    if args.before is None:
        parser.error("--before is required")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    results: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": []} for c in args.cases}
    loads = []
    for r in range(args.rounds):
        for case in args.cases:
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for label in order:
                loads.append(os.getloadavg()[0])
                times = _run_worker(trees[label], case, args.steps)
                results[case][label] += times
                print(f"round {r} {case} {label}: " + " ".join(f"{t:.3f}" for t in times), flush=True)
    text = section(results, trees, args, loads)
    write_kept_section(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
