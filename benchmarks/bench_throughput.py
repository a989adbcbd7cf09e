"""Training throughput of the paper's rows on the device at hand, the number GPU-hours are estimated from.

    python benchmarks/bench_throughput.py                           # every paper row, print only
    python benchmarks/bench_throughput.py --record                  # ... and add them to docs/throughput.json
    python benchmarks/bench_throughput.py --experiments mf_tiny --micro-batch 8 --dtype bf16 --record

One measured step is what `train.py` does per micro-batch without the data loader and the strategy: the
model from the experiment's `ModelConfig` at its `data.seq_len`, forward with loss, backward, global grad-norm
clipping at 1.0 and a fused AdamW step over `memoryformer.training.optim`'s parameter groups, under bf16
autocast on CUDA (Lightning's "bf16-mixed" as `trainer=gpu` / `ddp` run it: fp32 weights, so 4-byte table
reads; under `trainer=deepspeed_zero2` the weights are bf16 and a step moves about half the table bytes,
so a number from here is conservative for DeepSpeed runs) or fp32 on CPU. tokens/s = micro-batch x seq /
median step time after warm-up steps. A model whose weights, gradients and two AdamW moments do not fit the
device (MF-base: 6.7B parameters, ~108 GB) is reported as such, not measured: measure it in a sharded run
(`trainer=deepspeed_zero2`) and record that with `python benchmarks/compute_budget.py record`.

`run(quick)` (for `benchmarks/run.py`) prints the cost table from the recorded measurements; with `quick` it
also measures the nano model, so that CI runs this code.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from benchutil import copy_bandwidth, cpu_model, load_average, proc_kib_field  # noqa: E402
from compute_budget import (  # noqa: E402
    MEASUREMENTS,
    PEAK_BF16_TFLOPS,
    Measurement,
    format_cost_table,
    git_commit,
    load_measurements,
    method_check,
    row_budget,
    save_measurement,
    today,
)

from memoryformer.config import PAPER_MODELS, ModelConfig  # noqa: E402
from memoryformer.flops import model_cost  # noqa: E402
from memoryformer.models import LanguageModel  # noqa: E402
from memoryformer.training.optim import OptimConfig, build_optimizer  # noqa: E402

#: Bytes per parameter held during training: fp32 weight + fp32 grad + two fp32 AdamW moments.
TRAIN_BYTES_PER_PARAM = 16


@dataclass
class Result:
    """One model's measured step: tokens/s (None when it did not fit) and why not."""

    experiment: str
    model: str
    micro_batch: int
    seq_len: int
    tokens_per_s: float | None
    step_s: float | None
    peak_gb: float | None
    reason: str = ""


def device_name(device: torch.device) -> str:
    """"NVIDIA H100 80GB HBM3" or "CPU: <model> (N threads)"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()} ({torch.get_num_threads()} threads)"


def peak_tflops(name: str, dtype: str) -> float | None:
    """Datasheet dense peak for a known GPU in bf16, else None (no MFU printed)."""
    if dtype != "bf16":
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    return available if available is not None else 1 << 62


def _free(device: torch.device) -> None:
    """Return the memory of the last measured model before building the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(config: ModelConfig, seq_len: int, micro_batch: int, device: torch.device, dtype: str,
                 steps: int = 5, warmup: int = 2) -> tuple[float, float | None]:
    """(median seconds per training step, peak device memory in GB or None) for one micro-batch.

    Raises `MemoryError` when the model's training state cannot fit the device (checked before building).
    """
    params = model_cost(config, seq_len).params_total  # counted on the meta device: costs no memory
    need = params * TRAIN_BYTES_PER_PARAM
    have = _available_bytes(device)
    if need > 0.9 * have:
        raise MemoryError(
            f"{params / 1e9:.2f}B parameters need ~{need / 1e9:.0f} GB for weights, gradients and AdamW "
            f"moments; {have / 1e9:.0f} GB is free on this device"
        )
    torch.manual_seed(0)
    model = LanguageModel(config).to(device).train()
    opt = build_optimizer(model, OptimConfig(fused=True))
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), generator=gen).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp:
            _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    times.sort()
    return times[len(times) // 2], peak


def measure_experiment(experiment: str, device: torch.device, dtype: str, micro_batch: int | None,
                       steps: int, warmup: int, seq_len: int | None = None) -> Result:
    """Measure `experiment`'s model at its sequence length; halve an automatic micro-batch on CUDA OOM."""
    row = row_budget(experiment)
    config = ModelConfig.from_name(row.model)
    seq = seq_len or row.seq_len
    mb = micro_batch or (16 if device.type == "cuda" else 1)
    while True:
        try:
            t, peak = measure_step(config, seq, mb, device, dtype, steps, warmup)
            _free(device)
            return Result(experiment, row.model, mb, seq, mb * seq / t, t, peak)
        except MemoryError as e:
            return Result(experiment, row.model, mb, seq, None, None, None, f"does not fit: {e}")
        except torch.cuda.OutOfMemoryError:
            if micro_batch is not None or mb == 1:
                return Result(experiment, row.model, mb, seq, None, None, None,
                              f"out of memory at micro-batch {mb}")
            mb //= 2
        _free(device)  # out here, the exception's traceback no longer holds the failed step's tensors


def results_table(results: list[Result], device: str, dtype: str) -> str:
    """Markdown table of `results`."""
    lines = ["| Row | Model | Micro-batch x seq | Step | Tokens/s | Peak memory (GB) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r.tokens_per_s is None:
            lines.append(f"| `{r.experiment}` | {r.model} | {r.micro_batch} x {r.seq_len} | {r.reason} | | |")
        else:
            peak = f"{r.peak_gb:.1f}" if r.peak_gb is not None else "n/a"
            lines.append(f"| `{r.experiment}` | {r.model} | {r.micro_batch} x {r.seq_len} | {r.step_s:.3f} s "
                         f"| {r.tokens_per_s:,.0f} | {peak} |")
    return f"Device: {device}, {dtype}. Load average: {load_average()}.\n\n" + "\n".join(lines)


def method_check_text(measurements: list[Measurement], device: str, bandwidth: float) -> str:
    """One sentence: the GPU estimate's method run on `device`, against MF-tiny's measured speed there."""
    check = method_check(measurements, device, bandwidth)
    if check is None:
        return f"Method check: needs pythia_70m and mf_tiny measured on {device}."
    estimate, measured = check
    return (f"Method check on {device}: from Pythia-70M's measured speed (as the dense rate) and the copy "
            f"bandwidth {bandwidth / 1e9:.1f} GB/s, the estimate's method gives MF-tiny "
            f"{estimate:,.0f} tokens/s; measured {measured:,.0f} ({estimate / measured:.2f}x).")


def run(quick: bool = False) -> str:
    """Markdown section for `benchmarks/run.py`: the cost of each paper row from recorded measurements."""
    measurements = load_measurements()
    device = device_name(torch.device("cpu"))
    text = (
        "## 5. Cost of the paper's rows\n\n"
        "Tokens from `conf/experiment`, FLOPs from `memoryformer.flops`, device-hours from the training "
        "throughputs recorded in `docs/throughput.json` (`benchmarks/bench_throughput.py --record` on the "
        "device, or `python benchmarks/compute_budget.py record` from a real run), EleutherAI's published "
        "Pythia GPU-hours, and estimates where nothing is measured (`benchmarks/compute_budget.py`).\n\n"
        + format_cost_table(measurements, include_cpu=True) + "\n\n"
        + method_check_text(measurements, device, copy_bandwidth(64 if quick else 256)) + "\n"
    )
    if quick:
        cpu = torch.device("cpu")
        t, _ = measure_step(ModelConfig.from_name("nano"), 32, 2, cpu, "fp32", steps=1, warmup=1)
        text += f"\nQuick check: nano, 2 x 32 tokens, one step in {t:.3f} s ({64 / t:,.0f} tokens/s).\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", nargs="+", default=list(PAPER_MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast (default on CUDA) or fp32 (default on CPU)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="sequences per step (default: 16 on CUDA, halved on OOM; 1 on CPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="override the experiment's data.seq_len")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--record", nargs="?", const=str(MEASUREMENTS), default=None, metavar="JSON",
                        help=f"add the measurements to JSON "
                             f"(default {MEASUREMENTS.relative_to(HERE.parent)})")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    name = device_name(device)
    results = []
    for exp in args.experiments:
        r = measure_experiment(exp, device, dtype, args.micro_batch, args.steps, args.warmup, args.seq_len)
        results.append(r)
        status = f"{r.tokens_per_s:,.0f} tokens/s" if r.tokens_per_s else r.reason
        print(f"{exp}: {status}", flush=True)
        if args.record and r.tokens_per_s:
            save_measurement(Measurement(
                model=r.model, device=name, tokens_per_s=r.tokens_per_s, dtype=dtype, seq_len=r.seq_len,
                micro_batch=r.micro_batch, source="bench_throughput", measured_on=today(),
                commit=git_commit(), peak_tflops=peak_tflops(name, dtype), note=args.note,
            ), args.record)
    print()
    print(results_table(results, name, dtype))
    if device.type == "cpu":
        measured = [Measurement(model=r.model, device=name, tokens_per_s=r.tokens_per_s, dtype=dtype,
                                seq_len=r.seq_len, micro_batch=r.micro_batch)
                    for r in results if r.tokens_per_s]
        print("\n" + method_check_text(measured, name, copy_bandwidth()))
    if args.record:
        print(f"\nrecorded in {args.record}; `python scripts/update_docs.py` refreshes docs/costs.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
