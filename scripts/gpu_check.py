"""`make gpu-check`: what can only be verified on a CUDA GPU, in one run of at most 8 minutes on one H200.

1. memory_layer: the Memory Layer on CUDA (the path `memory_impl=auto` takes there, and the "torch" path),
   in fp32 and bf16, against a float64 reference of the paper's formulas written out below: forward output
   and the gradients of tables, bias and input. Pass: max |got - ref| <= rtol * max |ref| (TOLERANCES).
2. fit: MF-tiny, 50 steps, `trainer=deepspeed_zero2`, bf16-mixed, on the bundled sample corpus; pass when
   the mean train loss of the last 5 steps is at least LOSS_DROP_NATS below that of the first 5.
3. lookup_bandwidth: GB/s of table rows read by the lookup forward; pass when the bf16 `auto` path reaches
   at least BANDWIDTH_SHARE (50%) of the same device's bf16 copy bandwidth (bytes read per second).
4. plan_peak_memory: `torch.cuda.max_memory_allocated` of two MF-tiny training steps (bf16 autocast, fused
   AdamW) at PLAN_MICRO_BATCH x PLAN_SEQ_LEN against the memory plan's estimate for the same micro-batch
   (`plan_peak_bytes`, the one call into `memoryformer.training.sizing`); pass within PLAN_TOLERANCE
   (15%); a missing plan module fails.
5. lookup_backward_peak: the extra memory of one Memory Layer's lookup backward on CUDA
   (`torch.cuda.max_memory_allocated` during the backward, less what was allocated before it and the
   gradients it returns), for each of MF-tiny's Memory Layer shapes at the micro-batch that
   `micro_batch_size=auto` picks for `experiment=mf_tiny trainer=gpu` on this device (`planned_lookup`),
   against the plan's `lookup_backward` term for that layer (`memory_ops.lookup_backward_bytes`); pass
   when no layer exceeds it by more than LOOKUP_TOLERANCE (15%).
6. throughput_mf_tiny: the fit's tokens/s and MFU (multiply-adds from
   `memoryformer.flops.training_flops_per_token`, x2 FLOPs, over `memoryformer.flops.PEAK_BF16_TFLOPS`),
   recorded beside docs/benchmarks.md's MFU estimate for MF-tiny; pass when all three are there.
7. Everything goes to docs/gpu_check.json (device, torch / CUDA versions, timestamps, pass/fail per check).

Without CUDA it prints one sentence and exits 2. The parts are functions so that tests can run the
comparison and report logic on CPU tensors (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python scripts/gpu_check.py` from a checkout

from memoryformer.atomic_io import atomic_write_text  # noqa: E402
from memoryformer.flops import peak_bf16_tflops  # noqa: E402
from memoryformer.nn import MemoryLayer  # noqa: E402
from memoryformer.nn.memory_ops import resolve_impl, weighted_lookup  # noqa: E402

REPORT = ROOT / "docs" / "gpu_check.json"
EXIT_FAILED, EXIT_NO_CUDA = 1, 2
#: max |got - ref| <= rtol * max |ref|. fp32: summation order of the fused kernels (and atomics in the
#: table gradient) differs from float64 by a few ulps of the largest term (CPU: ~2e-7). bf16: outputs and
#: gradients are stored with 8 mantissa bits (2**-9 relative rounding each; CPU: up to 3.5e-3 of max).
TOLERANCES = {"float32": 1e-5, "bfloat16": 1e-2}
IMPLS = ("auto", "torch")
LOSS_DROP_NATS = 1.0  # 50 steps from ~ln(50304) = 10.8 nats; learning the 4096 ids in use alone gives 2.5
FIT_STEPS = 50
#: seconds per part on one H200; the whole run must stay under TOTAL_BUDGET_S (8 minutes)
BUDGET_S = {"memory_layer": 60, "fit": 300, "bandwidth": 60}
TOTAL_BUDGET_S = 480
#: pass criteria: lookup reads >= this share of the copy bandwidth; plan within this of the measured peak
BANDWIDTH_SHARE = 0.5
PLAN_TOLERANCE = 0.15
#: the micro-batch of the plan-against-measurement check (MF-tiny, bf16 autocast, fused AdamW)
PLAN_MICRO_BATCH, PLAN_SEQ_LEN = 4, 2048
#: the lookup backward's measured extra memory may exceed the plan's term by at most this share
LOOKUP_TOLERANCE = 0.15
#: `experiment=mf_tiny trainer=gpu`: global batch (sequences), sequence length, one GPU, bf16-mixed
MF_TINY_GLOBAL_BATCH, MF_TINY_SEQ_LEN = 1024, 2048
#: MF-tiny's Memory Layer shape (K = 64 tables of 2**8 rows, 512 wide) and one micro-batch of tokens
BANDWIDTH_SHAPE = {"tokens": 16384, "num_tables": 64, "code_length": 8, "width": 512}


class NoCudaError(RuntimeError):
    """No CUDA device is visible; the message says what torch reports."""


# ----------------------------------------------------------------------------- float64 reference
def reference_memory_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_length: int,
    weighting: str = "l1_prob",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Memory Layer forward in float64 from the paper's formulas (autograd gives the exact gradients).

    Chunk k of x (tau values z) selects row code(z) + k * 2**tau, code = sum_j [z_j >= 0] * 2**(tau-1-j)
    (MSB first); its weight is p(z; t) = prod_j sigmoid(2 |z_j| / t), times ||z||_1 for "l1_prob".
    """
    tau = code_length
    z = x.double().reshape(*x.shape[:-1], -1, tau)
    bits = (z >= 0).long()
    code = (bits * (2 ** torch.arange(tau - 1, -1, -1, device=x.device))).sum(-1)
    rows = code + torch.arange(z.shape[-2], device=x.device) * 2**tau
    a = z.abs()
    weight = torch.sigmoid(2.0 * a / temperature).prod(-1)
    if weighting == "l1_prob":
        weight = weight * a.sum(-1)
    y = (weight[..., None] * tables.double()[rows]).sum(-2)
    return y if bias is None else y + bias.double()


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float) -> dict:
    """One check's record: max abs error, the reference's scale, the bound rtol * scale, pass/fail."""
    got, ref = got.detach().double(), ref.detach().double()
    err = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    bound = rtol * max(scale, 1e-30)
    return {"name": name, "max_abs_err": err, "ref_max_abs": scale, "rtol": rtol, "passed": err <= bound}


def check_memory_layer(
    device: str,
    dtype: torch.dtype,
    impl: str,
    tokens: int = 512,
    num_tables: int = 16,
    code_length: int = 8,
    out_features: int = 64,
    seed: int = 0,
) -> list[dict]:
    """Forward and tables / bias / input gradients of a `MemoryLayer(impl)` on `device` in `dtype` vs
    `reference_memory_layer` on the same (rounded) values; one `compare` record per quantity."""
    gen = torch.Generator().manual_seed(seed)
    d = num_tables * code_length
    layer = MemoryLayer(d, out_features, code_length=code_length, impl=impl)
    with torch.no_grad():
        layer.tables.copy_(torch.randn(layer.tables.shape, generator=gen))  # O(1) rows: every term shows
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen))
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(tokens, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(tokens, out_features, generator=gen).to(device=device, dtype=dtype)
    y = layer(x)
    y.backward(grad_out)

    x64 = x.detach().double().requires_grad_(True)
    t64 = layer.tables.detach().double().requires_grad_(True)
    b64 = layer.bias.detach().double().requires_grad_(True)
    ref = reference_memory_layer(x64, t64, b64, code_length, layer.weighting, layer.temperature)
    ref.backward(grad_out.double())

    rtol = TOLERANCES[str(dtype).removeprefix("torch.")]
    path = resolve_impl(impl, layer.tables)
    tag = f"{device}/{str(dtype).removeprefix('torch.')}/impl={impl}({path})"
    return [
        compare(f"{tag}/forward", y, ref, rtol),
        compare(f"{tag}/grad_tables", layer.tables.grad, t64.grad, rtol),
        compare(f"{tag}/grad_bias", layer.bias.grad, b64.grad, rtol),
        compare(f"{tag}/grad_input", x.grad, x64.grad, rtol),
    ]


# ----------------------------------------------------------------------------- throughput
def lookup_bandwidth(device: str, dtype: torch.dtype, impl: str, iters: int = 20, **shape: int) -> dict:
    """GB/s of table rows read by the lookup forward (tokens x K rows x width x bytes per value / time)."""
    s = {**BANDWIDTH_SHAPE, **shape}
    rows_per_table = 2 ** s["code_length"]
    tables = torch.randn(s["num_tables"] * rows_per_table, s["width"], device=device, dtype=dtype)
    rows = torch.randint(0, rows_per_table, (s["tokens"], s["num_tables"]), device=device)
    rows += torch.arange(s["num_tables"], device=device) * rows_per_table
    weights = torch.rand(s["tokens"], s["num_tables"], device=device)
    with torch.no_grad():
        for _ in range(3):  # warm-up: kernel selection, caching allocator
            weighted_lookup(rows, weights, tables, impl=impl)
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            weighted_lookup(rows, weights, tables, impl=impl)
        _sync(device)
    seconds = (time.perf_counter() - start) / iters
    read = s["tokens"] * s["num_tables"] * s["width"] * tables.element_size()
    return {
        "impl": impl,
        "path": resolve_impl(impl, tables),
        "dtype": str(dtype).removeprefix("torch."),
        **s,
        "seconds_per_forward": seconds,
        "table_bytes_read": read,
        "gb_per_s": read / seconds / 1e9,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_tflops(device_name: str) -> float | None:
    """Datasheet dense bf16 peak of the device (`memoryformer.flops.PEAK_BF16_TFLOPS`), None if unlisted."""
    return peak_bf16_tflops(device_name)


def copy_bandwidth(device: str, dtype: torch.dtype = torch.bfloat16, megabytes: int = 512,
                   iters: int = 20) -> float:
    """The device's copy bandwidth in GB/s, counting the bytes read (as `lookup_bandwidth` does): one
    `dst.copy_(src)` of `megabytes` in `dtype`, the mean over `iters` copies after a warm-up."""
    src = torch.randn(megabytes * (1 << 20) // torch.finfo(dtype).bits * 8, device=device).to(dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return src.numel() * src.element_size() / ((time.perf_counter() - start) / iters) / 1e9


def bandwidth_verdict(lookups: list[dict], copy_gb_per_s: float, share: float = BANDWIDTH_SHARE) -> dict:
    """Pass when the bf16 lookup of the `auto` path reads table rows at >= `share` of the copy bandwidth
    (both in GB/s of bytes read). The other records (fp32, the torch path) are kept for the reader."""
    judged = [r for r in lookups if r["dtype"] == "bfloat16" and r["impl"] == "auto"]
    best = max((r["gb_per_s"] for r in judged), default=0.0)
    return {
        "criterion": f"bf16 auto lookup >= {share:.0%} of the device's bf16 copy bandwidth",
        "copy_gb_per_s": copy_gb_per_s,
        "lookup_gb_per_s": best,
        "share": best / copy_gb_per_s if copy_gb_per_s > 0 else None,
        "passed": bool(judged) and copy_gb_per_s > 0 and best >= share * copy_gb_per_s,
        "results": lookups,
    }


def mfu(macs_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: 2 FLOPs per multiply-add x tokens/s over the peak FLOP/s (None: no peak)."""
    return None if not peak else 2.0 * macs_per_token * tokens_per_s / (peak * 1e12)


# ----------------------------------------------------------------------------- plan against measurement
class PlanMissingError(RuntimeError):
    """The memory plan module (`memoryformer.training.sizing`) is not there or lacks what we call."""


def plan_peak_bytes(micro_batch: int, seq_len: int) -> int:
    """THE ONE CALL INTO THE MEMORY PLAN: its estimated peak bytes on one device for MF-tiny at
    `micro_batch` x `seq_len`, bf16-mixed, one device, no ZeRO, fused AdamW (what `measure_step_peak` runs),
    less the CUDA context and the allocator's slack, which `torch.cuda.max_memory_allocated` does not see.

    Raises `PlanMissingError` when the plan module cannot be imported.
    """
    try:
        from memoryformer.config import ModelConfig

        memory_plan = importlib.import_module("memoryformer.training.sizing")
    except ImportError as err:
        raise PlanMissingError(f"plan module missing: {err}") from err
    layout = memory_plan.Layout(precision="bf16-mixed", device="cuda", fused_optimizer=True)
    plan = memory_plan.plan_memory(ModelConfig.from_name("mf_tiny"), seq_len, micro_batch, layout)
    unseen = plan.breakdown.get("cuda_context", 0) + plan.breakdown.get("allocator_slack", 0)
    return int(plan.peak_bytes - unseen)


def measure_step_peak(device: str, micro_batch: int, seq_len: int) -> int:
    """`torch.cuda.max_memory_allocated` over two MF-tiny training steps (bf16 autocast, fused AdamW: the
    second step holds the optimizer states), from a fresh allocator peak."""
    from memoryformer.models import build_model

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_model("mf_tiny").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len + 1), device=device)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return peak


def plan_verdict(planned: int | None, measured: int, tolerance: float = PLAN_TOLERANCE,
                 error: str | None = None) -> dict:
    """Pass when the plan's peak lies within `tolerance` of the measured one: |plan - measured| <=
    tolerance * measured. A missing plan (`error`) fails."""
    record = {"criterion": f"|plan - measured| <= {tolerance:.0%} of measured", "planned_bytes": planned,
              "measured_bytes": measured, "error": error}
    if planned is None or measured <= 0:
        return {**record, "relative_error": None, "passed": False}
    rel = abs(planned - measured) / measured
    return {**record, "relative_error": rel, "passed": rel <= tolerance}


def planned_lookup(device_bytes: int) -> dict:
    """The micro-batch `micro_batch_size=auto` picks for `experiment=mf_tiny trainer=gpu` on a device of
    `device_bytes` (the run's own `resolve_batch` and `plan_memory`), and the plan's lookup-backward bytes
    of each of MF-tiny's Memory Layer shapes (K, rows, width) at that micro-batch."""
    from memoryformer.config import ModelConfig
    from memoryformer.nn import memory_ops
    from memoryformer.training import sizing as memory_plan
    from memoryformer.training.sizing import DeviceMemory, resolve_batch

    model = ModelConfig.from_name("mf_tiny")
    layout = memory_plan.Layout(precision="bf16-mixed", device="cuda", fused_optimizer=True)

    def plan_for(micro: int, accumulate: int) -> memory_plan.MemoryPlan:
        return memory_plan.plan_memory(model, MF_TINY_SEQ_LEN, micro, layout, accumulate=accumulate)

    memory = DeviceMemory(device_bytes, "gpu_check")
    micro, _ = resolve_batch("auto", MF_TINY_GLOBAL_BATCH, 1, None, memory, plan_for)
    tokens = micro * MF_TINY_SEQ_LEN
    layers = [{"num_tables": k, "rows": rows, "width": width,
               "planned_bytes": memory_ops.lookup_backward_bytes(tokens, k, width, rows)}
              for k, rows, width in memory_plan.memory_layer_shapes(model)]
    return {"micro_batch": micro, "seq_len": MF_TINY_SEQ_LEN, "tokens": tokens, "layers": layers,
            "plan_term_bytes": plan_for(micro, MF_TINY_GLOBAL_BATCH // micro).breakdown["lookup_backward"]}


def measure_lookup_backward(device: str, tokens: int, num_tables: int, rows: int, width: int) -> int:
    """Extra bytes of one lookup backward on CUDA (the path `memory_impl=auto` takes there; fp32 tables, as
    under bf16 autocast): the allocator's peak during `autograd.grad`, less what was allocated before it and
    the two gradients it returns."""
    gen = torch.Generator(device=device).manual_seed(0)
    tables = (0.02 * torch.randn(rows, width, device=device, generator=gen)).requires_grad_(True)
    per_table = rows // num_tables
    offsets = torch.arange(num_tables, device=device) * per_table
    idx = torch.randint(0, per_table, (tokens, num_tables), device=device, generator=gen) + offsets
    weights = torch.rand(tokens, num_tables, device=device, generator=gen).requires_grad_(True)
    out = weighted_lookup(idx, weights, tables)
    grad_out = torch.randn_like(out)
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad_weights, grad_tables = torch.autograd.grad(out, [weights, tables], grad_out)
    _sync(device)
    returned = sum(g.numel() * g.element_size() for g in (grad_weights, grad_tables))
    extra = torch.cuda.max_memory_allocated() - before - returned
    del tables, idx, weights, out, grad_out, grad_weights, grad_tables
    torch.cuda.empty_cache()
    return extra


def lookup_backward_verdict(planned: dict, measured: list[int], tolerance: float = LOOKUP_TOLERANCE) -> dict:
    """Pass when every layer's measured extra bytes are at most (1 + `tolerance`) x its planned bytes
    (`planned` from `planned_lookup`, `measured` in the order of its layers)."""
    layers = [{**layer, "measured_bytes": got, "over_plan": got / layer["planned_bytes"] - 1.0}
              for layer, got in zip(planned["layers"], measured, strict=True)]
    return {
        "criterion": f"measured <= (1 + {tolerance:.0%}) x the plan's lookup_backward bytes, every layer",
        "micro_batch": planned["micro_batch"], "seq_len": planned["seq_len"],
        "plan_term_bytes": planned["plan_term_bytes"], "layers": layers,
        "passed": bool(layers) and all(r["measured_bytes"] <= (1 + tolerance) * r["planned_bytes"]
                                       for r in layers),
    }


def documented_mfu_estimate(path: Path = ROOT / "docs" / "benchmarks.md", row: str = "mf_tiny"
                            ) -> float | None:
    """The MFU docs/benchmarks.md estimates for `row` (its cost table's MFU column), as a fraction."""
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].startswith(f"`{row}`"):  # the first such row with a percentage
            share = next((float(c[:-1]) / 100 for c in cells if c.endswith("%") and c[:-1].isdigit()), None)
            if share is not None:
                return share
    return None


def throughput_verdict(tokens_per_s: float | None, measured_mfu: float | None,
                       estimate: float | None) -> dict:
    """Tokens/s and MFU recorded beside the documented estimate; passes when both were measured (finite,
    positive) and the estimate was found, so that the record can be compared."""
    ok = all(v is not None and math.isfinite(v) and v > 0 for v in (tokens_per_s, measured_mfu, estimate))
    return {
        "criterion": "tokens/s and MFU measured and recorded against docs/benchmarks.md's estimate",
        "tokens_per_s": tokens_per_s,
        "mfu": measured_mfu,
        "mfu_estimate_docs": estimate,
        "mfu_over_estimate": measured_mfu / estimate if ok else None,
        "passed": ok,
    }


# ----------------------------------------------------------------------------- the 50-step fit
def fit_command(run_dir: Path, steps: int = FIT_STEPS, peak: float | None = None) -> list[str]:
    """`train.py` arguments of the MF-tiny DeepSpeed ZeRO-2 bf16 fit on the sample corpus (no checkpoints)."""
    return [
        sys.executable,
        "train.py",
        "experiment=mf_tiny",
        "data=sample",
        "trainer=deepspeed_zero2",
        "trainer.devices=1",
        "trainer.precision=bf16-mixed",
        f"trainer.max_steps={steps}",
        "micro_batch_size=16",
        "trainer.accumulate_grad_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_checkpointing=false",
        "callbacks.model_checkpoint=null",
        "callbacks.graceful_stop=null",
        "global_batch_size=16",
        "data.seq_len=256",
        "data.num_workers=2",
        "val_every_n_steps=25",
        "ckpt_every_n_steps=null",
        "export_final=false",
        "logger=csv",
        "print_config=false",
        "name=gpu_check",
        f"hydra.run.dir={run_dir}",
        f"peak_tflops_per_device={peak if peak else 'null'}",
    ]


def read_metrics(metrics_csv: Path) -> tuple[list[float], list[float]]:
    """Per-step train/loss and train/tokens_per_s from a Lightning CSV logger file, in step order."""
    rows = list(csv.DictReader(metrics_csv.read_text().splitlines()))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    speeds = {int(r["step"]): float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")}
    return [losses[k] for k in sorted(losses)], [speeds[k] for k in sorted(speeds)]


def loss_fell(losses: list[float], drop: float = LOSS_DROP_NATS, window: int = 5) -> bool:
    """Mean of the last `window` losses at least `drop` nats below the mean of the first `window`."""
    if len(losses) < 2 * window or not all(math.isfinite(v) for v in losses):
        return False
    return statistics.fmean(losses[-window:]) <= statistics.fmean(losses[:window]) - drop


def run_fit(run_dir: Path, timeout_s: float, peak: float | None) -> dict:
    """Run the fit in a subprocess (its log beside the metrics); loss, tokens/s and MFU figures."""
    from memoryformer.config import ModelConfig
    from memoryformer.flops import training_flops_per_token

    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false"
    )
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        try:
            rc = subprocess.run(
                fit_command(run_dir, peak=peak),
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    record: dict = {"returncode": rc, "seconds": time.time() - start, "log": str(run_dir / "train.log")}
    metrics = run_dir / "csv" / "metrics.csv"
    losses, speeds = read_metrics(metrics) if metrics.is_file() else ([], [])
    steady = speeds[len(speeds) // 2 :]  # the first steps pay for kernel selection and allocator growth
    tps = statistics.median(steady) if steady else None
    macs = training_flops_per_token(ModelConfig.from_name("mf_tiny"), 256)
    record.update(
        steps_logged=len(losses),
        first_losses=losses[:5],
        last_losses=losses[-5:],
        loss_drop_required_nats=LOSS_DROP_NATS,
        tokens_per_s=tps,
        macs_per_token=macs,
        mfu=mfu(macs, tps, peak) if tps else None,
        peak_tflops=peak,
        passed=rc == 0 and len(losses) >= FIT_STEPS - 1 and loss_fell(losses),
    )
    return record


# ----------------------------------------------------------------------------- report
def require_cuda() -> str:
    """The CUDA device's name, or `NoCudaError` saying what torch sees."""
    if not torch.cuda.is_available():
        raise NoCudaError(
            f"no CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees none; "
            f"run `make gpu-check` on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
    return torch.cuda.get_device_name(0)


def environment(device_name: str) -> dict:
    """Device, versions and host of the report."""
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "host": platform.node(),
    }


def write_report(report: dict, path: Path = REPORT) -> Path:
    """Write `report` as indented JSON, atomically (temporary file + rename)."""
    return atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    """Run the checks (see the module docstring); 0 when all pass, 1 when one fails, 2 without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPORT, help="JSON report path")
    parser.add_argument(
        "--run-dir", type=Path, default=ROOT / "outputs" / "gpu_check", help="fit's run folder"
    )
    parser.add_argument("--skip-fit", action="store_true", help="only the layer checks and the bandwidth")
    args = parser.parse_args(argv)
    try:
        name = require_cuda()
    except NoCudaError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NO_CUDA
    t0 = time.time()
    report: dict = {
        "started": _now(),
        **environment(name),
        "tolerances_rtol": TOLERANCES,
        "budget_s": BUDGET_S,
        "checks": {},
    }

    part = time.time()
    layer = [
        r
        for dtype in (torch.float32, torch.bfloat16)
        for impl in IMPLS
        for r in check_memory_layer("cuda", dtype, impl)
    ]
    report["checks"]["memory_layer"] = {
        "passed": all(r["passed"] for r in layer),
        "results": layer,
        "seconds": time.time() - part,
    }

    part = time.time()
    bandwidth = [
        lookup_bandwidth("cuda", dtype, impl) for dtype in (torch.bfloat16, torch.float32) for impl in IMPLS
    ]
    verdict = bandwidth_verdict(bandwidth, copy_bandwidth("cuda", torch.bfloat16))
    report["checks"]["lookup_bandwidth"] = {**verdict, "seconds": time.time() - part}
    write_report(report, args.out)  # keep the first figures even if the fit is killed

    part = time.time()
    measured = measure_step_peak("cuda", PLAN_MICRO_BATCH, PLAN_SEQ_LEN)
    try:
        plan = plan_verdict(plan_peak_bytes(PLAN_MICRO_BATCH, PLAN_SEQ_LEN), measured)
    except PlanMissingError as err:
        plan = plan_verdict(None, measured, error=str(err))
    report["checks"]["plan_peak_memory"] = {**plan, "micro_batch": PLAN_MICRO_BATCH,
                                            "seq_len": PLAN_SEQ_LEN, "seconds": time.time() - part}
    write_report(report, args.out)

    part = time.time()
    planned = planned_lookup(torch.cuda.get_device_properties(0).total_memory)
    measured_lookup = [measure_lookup_backward("cuda", planned["tokens"], r["num_tables"], r["rows"],
                                               r["width"]) for r in planned["layers"]]
    report["checks"]["lookup_backward_peak"] = {**lookup_backward_verdict(planned, measured_lookup),
                                                "seconds": time.time() - part}
    write_report(report, args.out)

    if not args.skip_fit:
        left = TOTAL_BUDGET_S - (time.time() - t0) - 15
        fit = run_fit(args.run_dir, min(BUDGET_S["fit"], left), peak_tflops(name))
        report["checks"]["fit_mf_tiny_deepspeed_zero2_bf16"] = {
            **fit, "criterion": f"mean of the last 5 losses >= {LOSS_DROP_NATS} nats below the first 5"}
        report["checks"]["throughput_mf_tiny"] = throughput_verdict(
            fit["tokens_per_s"], fit["mfu"], documented_mfu_estimate())

    report["finished"] = _now()
    report["seconds"] = time.time() - t0
    report["passed"] = all(c["passed"] for c in report["checks"].values())
    write_report(report, args.out)
    for key, check in report["checks"].items():
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {key}")
    print(f"report: {args.out} ({report['seconds']:.0f} s)")
    return 0 if report["passed"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
