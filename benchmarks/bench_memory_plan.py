"""The memory plan against a real training step's peak memory on CPU (docs/memory-plan.md).

    python benchmarks/bench_memory_plan.py [--quick] [--write]

For each shape (MemoryFormer and Pythia blocks, two micro-batches, with and without activation
checkpointing) a fresh process builds the model in fp32, takes two AdamW steps (forward, backward, step,
gradients freed as Lightning does) and reports its peak resident memory minus the resident memory just
before the model was built (the kernel's high-water mark is reset there through /proc/self/clear_refs),
with glibc returning freed blocks to the kernel (`MALLOC_ENV`).
The plan (`memoryformer.training.sizing.plan_memory`, CPU layout, 32-true, one process) is computed
for the same shape. `--write` replaces this section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TITLE = "## Memory plan vs a measured training step (CPU)"
#: The validated shapes: small enough for a shared CPU, large enough that activations and logits matter.
SHAPES = [
    dict(block="memoryformer", micro=8, checkpointing=False),
    dict(block="memoryformer", micro=32, checkpointing=False),
    dict(block="memoryformer", micro=32, checkpointing=True),
    dict(block="pythia", micro=8, checkpointing=False),
    dict(block="pythia", micro=32, checkpointing=False),
    dict(block="pythia", micro=32, checkpointing=True),
]
QUICK_SHAPES = [dict(block="memoryformer", micro=4, checkpointing=False)]
SEQ_LEN = 256
#: glibc keeps freed blocks below its (growing) mmap threshold resident, so the peak resident size would
#: count memory the process freed long ago; with every block of 64 KiB or more mapped on its own and
#: returned on free, the resident size follows the live tensors (as CUDA's `memory_allocated` does).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def model_config(block: str):
    """The model of every shape: 4 blocks of width 256, vocabulary 8192 (nano-like, wider)."""
    from memoryformer.config import ModelConfig

    common = dict(vocab_size=8192, n_layer=4, n_embd=256, n_head=4, block_size=SEQ_LEN)
    if block == "memoryformer":
        return ModelConfig(name="bench_mf", num_tables=32, **common)
    return ModelConfig(name="bench_pythia", block="pythia", **common)


def planned_bytes(shape: dict) -> tuple[int, str]:
    """(peak bytes, peak moment) of the plan for `shape` on this CPU in fp32, one process."""
    from memoryformer.training.sizing import Layout, plan_memory

    layout = Layout(strategy="single", precision="32-true", device="cpu", world_size=1)
    plan = plan_memory(model_config(shape["block"]), SEQ_LEN, shape["micro"], layout, shape["checkpointing"])
    return plan.peak_bytes, plan.peak_at


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_in_this_process(shape: dict) -> int:
    """Peak resident bytes of two training steps of `shape` above the resident memory before the model."""
    import torch

    from memoryformer.config import ModelConfig
    from memoryformer.models import LanguageModel
    from memoryformer.nn import memory_ops
    from memoryformer.training.optim import OptimConfig, build_optimizer
    from memoryformer.training.parallel import apply_activation_checkpointing

    torch.manual_seed(0)
    memory_ops.load_cpu_extension()
    config = model_config(shape["block"])

    def step(model, optimizer, micro: int) -> None:
        idx = torch.randint(0, config.vocab_size, (micro, SEQ_LEN))
        loss = model(idx, idx)[1]  # the logits go before backward, as in LMTrainingModule.training_step
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warm = LanguageModel(ModelConfig.from_dict({**config.to_dict(), "n_layer": 1}))
    step(warm, build_optimizer(warm, OptimConfig()), 1)  # load every kernel and thread pool first
    del warm
    import gc

    gc.collect()
    baseline = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    model = LanguageModel(config)
    if shape["checkpointing"]:
        apply_activation_checkpointing(model)
    optimizer = build_optimizer(model, OptimConfig())
    for _ in range(2):
        step(model, optimizer, shape["micro"])
    return _rss_bytes("VmHWM") - baseline


def measure(shape: dict) -> int:
    """`measure_in_this_process(shape)` in a fresh Python process (so that peaks do not mix)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(shape)], capture_output=True, text=True, env=env,
        check=True, timeout=600,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["measured_bytes"])


def run(quick: bool) -> str:
    """The Markdown section: one row per shape, plan and measurement in MiB, and their ratio."""
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        planned, moment = planned_bytes(shape)
        measured = measure(shape)
        rows.append((shape, planned, moment, measured))
    lines = [
        TITLE,
        "",
        f"`python benchmarks/bench_memory_plan.py{' --quick' if quick else ''}`: a model of 4 blocks, "
        f"width 256, vocabulary 8192, sequence {SEQ_LEN}, fp32, fused AdamW, one process, one thread. "
        "Measured: peak resident memory of two training steps minus the resident memory before the model "
        "was built "
        "(fresh process per row, glibc told to return freed blocks of 64 KiB or more: "
        "`MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`). Plan: `sizing.plan_memory` for "
        "the same shape on the CPU layout "
        "(the CUDA context, NCCL and allocator slack are not counted on CPU).",
        "",
        "| block | micro-batch x seq | activation checkpointing | plan (MiB) | plan's peak at "
        "| measured (MiB) | plan / measured |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for shape, planned, moment, measured in rows:
        lines.append(
            f"| {shape['block']} | {shape['micro']} x {SEQ_LEN} "
            f"| {'yes' if shape['checkpointing'] else 'no'} | {planned / 2**20:,.0f} | {moment} "
            f"| {measured / 2**20:,.0f} | {planned / measured:.2f} |"
        )
    return "\n".join(lines) + "\n"


def replace_section(path: Path, text: str) -> None:
    """Put `text` in place of this benchmark's section of `path` (or before the notes when absent)."""
    report = path.read_text()
    if TITLE in report:
        start = report.index(TITLE)
        end = report.find("\n## ", start + len(TITLE))
        report = report[:start] + text.rstrip() + "\n" + (report[end:] if end >= 0 else "")
    else:
        notes = report.find("## How to read these numbers")
        notes = len(report) if notes < 0 else notes
        report = report[:notes] + text.rstrip() + "\n\n" + report[notes:]
    path.write_text(report)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace this section of docs/benchmarks.md")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # one shape as JSON, in this process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps({"measured_bytes": measure_in_this_process(json.loads(args.measure))}))
        sys.exit(0)
    section = run(args.quick)
    print(section)
    if args.write:
        replace_section(ROOT / "docs" / "benchmarks.md", section)
