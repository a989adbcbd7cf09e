"""Compute paths of the Memory Layer, all computing the same function (paper Eq. 11-12):

    y[n] = sum_k w[n, k] * tables[rows[n, k]]          rows int64 [..., K], w [..., K], tables [R, D]

with fp32 accumulation whatever the tables' dtype; y has the tables' dtype. Gradients: the tables get
`w[n, k] * dy[n]` on the selected rows only, and `w[n, k]` gets `<dy[n], tables[rows[n, k]]>`.

Paths (`impl`, the `model.memory_impl` config key; the allowed values are `config.MEMORY_IMPLS`):
- "torch": the readable reference, the authors' gather -> multiply -> sum (`reference_lookup`). It
  materialises a `[..., K, D]` tensor, so it is slow and memory hungry; it is the definition the others are
  tested against.
- "auto" (the default): the fastest path for the tables' device and dtype, one pass over rows, weights and
  tables. On CPU a C++/OpenMP extension (`memoryformer/cpu_kernels/memory_lookup.cpp`, built on first use
  and cached) whose backward accumulates the table gradient per row chunk, without atomics and
  deterministically; on CUDA `F.embedding_bag`, one fused gather-weighted-sum kernel. Without a C++ compiler
  it falls back to `F.embedding_bag` on CPU too, with a one-line warning; float64 tables (tests) take
  "torch", which no fused path matches exactly. `resolve_impl` names the path taken. ("fused", a former
  name of this same path, now fails at config time naming "auto".)

The Memory Layer reaches them through three calls, each of which returns None where it does not apply:
`weighted_lookup` (the lookup, any path, with autograd), and, where no gradient is needed and the C++
kernel runs, `fused_hash` (the hash in one call) and `fused_layer` (hash + lookup + bias in one call): at
one decoded token a dozen small torch ops would cost several times the K-row read itself. All three take
tensors and plain settings, never a layer, so this module does not depend on `memory_layer`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from memoryformer.config import check_memory_impl
from memoryformer.errors import first_line

KERNEL_SOURCE = Path(__file__).resolve().parent.parent / "cpu_kernels" / "memory_lookup.cpp"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- the lookup's paths
def reference_lookup(rows: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The authors' torch path: gather `[..., K, D]`, multiply by `[..., K, 1]`, sum over K -> `[..., D]`.

    Accumulates in at least float32 and returns the tables' dtype. Low-precision tables are widened before
    the gather, so that the gather's backward (a scatter-add into the table gradient) also sums in fp32.
    """
    acc = torch.promote_types(tables.dtype, torch.float32)
    gathered = tables.to(acc)[rows]
    return (gathered * weights.to(acc).unsqueeze(-1)).sum(dim=-2).to(tables.dtype)


def embedding_bag_lookup(rows: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """`F.embedding_bag(mode="sum", per_sample_weights=...)`: `[N, K]` rows and weights -> `[N, D]`.

    On CPU, low-precision tables are read through an fp32 copy so that the sum accumulates in fp32; on
    CUDA the kernel accumulates in fp32 itself, but the weights are rounded to the tables' dtype.
    """
    if tables.device.type == "cpu" and tables.dtype != torch.float32 and tables.dtype != torch.float64:
        return F.embedding_bag(rows, tables.float(), mode="sum", per_sample_weights=weights.float()).to(
            tables.dtype
        )
    return F.embedding_bag(rows, tables, mode="sum", per_sample_weights=weights.to(tables.dtype))


class _CpuFusedLookup(torch.autograd.Function):
    """Autograd wrapper of the C++ kernels: `[N, K]` int64 rows, fp32 weights, `[R, D]` tables -> `[N, D]`."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weights, tables)
        return load_cpu_extension().lookup_forward(rows, weights, tables)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        rows, weights, tables = ctx.saved_tensors
        need_weights, need_tables = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_tables, grad_weights = load_cpu_extension().lookup_backward(
            grad_out.float().contiguous(), rows, weights, tables, need_tables, need_weights
        )
        return None, grad_weights if need_weights else None, grad_tables if need_tables else None


def resolve_impl(impl: str, tables: torch.Tensor) -> str:
    """The concrete path for `impl` on the tables' device and dtype: "torch", "cpu_kernel" or
    "embedding_bag". `impl` is checked here too: `weighted_lookup` takes it from any caller."""
    if impl == "torch":
        return "torch"
    check_memory_impl("impl", impl)
    if tables.is_cpu and tables.dtype in _KERNEL_DTYPES and load_cpu_extension() is not None:
        return "cpu_kernel"
    if tables.dtype == torch.float64:
        return "torch"  # no fused path keeps float64 exact on every device; float64 is for tests
    return "embedding_bag"


def weighted_lookup(
    rows: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """`sum_k weights[..., k] * tables[rows[..., k]]` (paper Eq. 11): rows int64 `[..., K]`, weights
    `[..., K]`, tables `[R, D]` -> `[..., D]` in the tables' dtype, accumulated in fp32, by path `impl`."""
    if rows.shape != weights.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and weights {tuple(weights.shape)} must have one shape.")
    path = resolve_impl(impl, tables)
    if path == "torch":
        return reference_lookup(rows, weights, tables)
    needs_grad = torch.is_grad_enabled() and (weights.requires_grad or tables.requires_grad)
    if path == "cpu_kernel" and not needs_grad:
        # decoding: the op takes any leading shape and casts itself, and skipping the autograd wrapper
        # matters because its overhead would rival the read of K rows
        return load_cpu_extension().lookup_forward(rows, weights, tables)
    lead, k = rows.shape[:-1], rows.shape[-1]
    flat_rows, flat_weights = rows.reshape(-1, k), weights.reshape(-1, k)
    if path == "embedding_bag":
        out = embedding_bag_lookup(flat_rows, flat_weights, tables)
    else:
        flat_rows, flat_weights = flat_rows.contiguous(), flat_weights.float().contiguous()
        out = _CpuFusedLookup.apply(flat_rows, flat_weights, tables.contiguous())
    return out.reshape(*lead, tables.shape[-1])


# ----------------------------------------------------------------------------- no-gradient shortcuts
def _kernel_ops(impl: str, a: torch.Tensor, b: torch.Tensor | None = None,
                c: torch.Tensor | None = None) -> object | None:
    """The C++ ops when `impl` allows them and no gradient is needed through the CPU tensors `a`, `b`, `c`.

    Called on every decoding step, so it avoids generators and extra dispatches.
    """
    if impl == "torch":
        return None
    grad = torch.is_grad_enabled()
    for t in (a, b, c):
        if t is None:
            continue
        if not t.is_cpu or t.dtype not in _KERNEL_DTYPES or (grad and t.requires_grad):
            return None
    return load_cpu_extension()


def fused_hash(
    x: torch.Tensor, code_length: int, weighting: str, temperature: float, impl: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The hash in one C++ call: `x` `[..., K * tau]` -> (rows int64 `[..., K]`, weights float32 `[..., K]`),
    the values of `memory_layer.hash_chunks(x, code_length, weighting, temperature)`; None where the kernel
    does not apply (a gradient is needed, impl "torch", not a CPU tensor of a kernel dtype, no compiler).
    The caller checked x's width.
    """
    ops = _kernel_ops(impl, x)
    if ops is None:
        return None
    return ops.hash_forward(x, code_length, weighting == "l1_prob", temperature)


def fused_layer(
    x: torch.Tensor,
    tables: torch.Tensor,
    bias: torch.Tensor | None,
    code_length: int,
    weighting: str,
    temperature: float,
    impl: str,
) -> torch.Tensor | None:
    """A whole Memory Layer (hash + lookup + bias) in one C++ call: `x` `[..., K * tau]`, tables
    `[K * 2**tau, D]`, bias `[D]` or None -> `[..., D]` in the tables' dtype, bias added in fp32. None where
    it does not apply: as `fused_hash`, or x is not K * tau wide (the torch path then reports it).
    """
    ops = _kernel_ops(impl, x, tables, bias)
    if ops is None or not x.shape or x.shape[-1] != (tables.shape[0] >> code_length) * code_length:
        return None
    return ops.layer_forward(x, tables, bias, code_length, weighting == "l1_prob", temperature)


# ----------------------------------------------------------------------------- building the C++ kernel
def _extension_name() -> str:
    # -march=native code must not be reused on another CPU (e.g. a shared home directory on a cluster),
    # so the CPU's identity is part of the cached build's name.
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            ident += "".join(line for line in f if line.startswith(("flags", "model name")))[:4096]
    except OSError:
        pass
    return "memoryformer_lookup_" + hashlib.sha1(ident.encode()).hexdigest()[:10]


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold an OS lock on `build_dir` while torch builds or loads the extension there.

    torch's own build lock is a plain file that a process killed mid-build (SIGKILL, OOM, a node dying)
    leaves behind, and every later process then waits for it forever. An `flock` dies with its process, so
    whoever holds ours knows that any torch lock file present is stale and removes it.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "memoryformer.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load_cpu_extension() -> object | None:
    """`torch.ops.memoryformer`, holding the C++/OpenMP kernels (`lookup_forward`, `lookup_backward`,
    `hash_forward`, `layer_forward`), built on first call (seconds) and cached on disk; None, with a
    one-line warning, if the build fails.

    Set `MEMORYFORMER_NO_EXTENSION=1` to skip the build and use the `F.embedding_bag` fallback.
    """
    if os.environ.get("MEMORYFORMER_NO_EXTENSION", "0") not in ("", "0"):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        name = _extension_name()
        build_dir = Path(_get_build_directory(name, verbose=False))
        with _exclusive_build(build_dir):
            load(
                name=name,
                sources=[str(KERNEL_SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
        return torch.ops.memoryformer
    except Exception as err:  # any build failure (no compiler, no ninja, bad flags) -> the portable path
        warnings.warn(
            f"memoryformer: could not build the C++ Memory Layer kernel ({first_line(err)}); "
            f"using the slower F.embedding_bag path.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
