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
    """`F.embedding_bag(mode="sum", per_sample_weights=...)`: `[N, K]` rows and weights -> `[N, D]`, with
    the bounded backward of `BoundedEmbeddingBag` when a gradient is needed.

    On CPU, low-precision tables are read through an fp32 copy so that the sum accumulates in fp32; on
    CUDA the kernel accumulates in fp32 itself, but the weights are rounded to the tables' dtype.
    """
    if tables.device.type == "cpu" and tables.dtype != torch.float32 and tables.dtype != torch.float64:
        return embedding_bag_lookup(rows, weights.float(), tables.float()).to(tables.dtype)
    if torch.is_grad_enabled() and (weights.requires_grad or tables.requires_grad):
        return BoundedEmbeddingBag.apply(rows, weights, tables, None)
    return F.embedding_bag(rows, tables, mode="sum", per_sample_weights=weights.to(tables.dtype))


# ----------------------------------------------------------------------------- the bounded lookup backward
#: The most memory one lookup's backward takes beyond fixed table-sized buffers, at any micro-batch, on the
#: `F.embedding_bag` path (CUDA). PyTorch's own backward of `F.embedding_bag` allocates about one fp32 row of
#: the output width per looked-up index (`lookup_backward_index_bytes`): N x K x (4 D + 48) bytes, ~100 GB
#: for MF-tiny's merged Q/K/V at 128 x 2048 tokens (docs/memory-plan.md).
LOOKUP_BACKWARD_BOUND = 2**30

#: int64 arrays of one index alive in PyTorch's CUDA embedding-bag backward, read in pytorch/pytorch:
#: sorted indices and their original positions (aten/src/ATen/native/cuda/EmbeddingBag.cu,
#: `embedding_bag_backward_cuda_sum_avg`), segment offsets, partials per segment, their exclusive sum and
#: the partial segments' offsets (EmbeddingBackwardKernel.cu, `embedding_backward_cuda_kernel`, each
#: `at::empty({numel})`).
_INDEX_ARRAYS = 6


def _pytorch_index_bytes(width: int) -> int:
    # `grad_weight_per_segment`, `at::empty({numel, stride})` in fp32 (EmbeddingBackwardKernel.cu: sized at
    # its upper bound, one row per index, so that no host sync is needed), and the int64 index arrays
    return 4 * width + 8 * _INDEX_ARRAYS


def lookup_backward_index_bytes(width: int) -> int:
    """Bytes per looked-up index of one chunk of `BoundedEmbeddingBag`'s backward for a `width`-wide output:
    PyTorch's CUDA embedding-bag backward (`_pytorch_index_bytes`: an fp32 row of the output width and six
    int64 index arrays), the chunk's int64 offset2bag that we pass it, and the fp32 per-sample weight and
    its gradient."""
    return _pytorch_index_bytes(width) + 8 + 4 + 4


def _lookup_backward_token_bytes(num_tables: int, width: int) -> int:
    # K indices, plus the token's fp32 gradient row and its int64 bag size and offset
    return num_tables * lookup_backward_index_bytes(width) + 4 * width + 16


def lookup_backward_chunk_tokens(num_tables: int, width: int, bound: int = LOOKUP_BACKWARD_BOUND) -> int:
    """Tokens per chunk of `BoundedEmbeddingBag`'s backward: the most whose workspace fits in `bound` bytes
    (at least 1), for `num_tables` (K) lookups per token into a `width`-wide table."""
    return max(1, bound // _lookup_backward_token_bytes(num_tables, width))


def lookup_backward_bytes(tokens: int, num_tables: int, width: int, rows: int,
                          bound: int = LOOKUP_BACKWARD_BOUND) -> int:
    """Peak bytes of `BoundedEmbeddingBag`'s backward beyond its inputs and the gradients it returns, for
    `tokens` tokens looking up `num_tables` rows each of a `rows` x `width` table: one chunk's workspace
    (at most `bound`) and two fp32 table-sized buffers (the accumulated table gradient and one chunk's)."""
    chunk = min(tokens, lookup_backward_chunk_tokens(num_tables, width, bound))
    return chunk * _lookup_backward_token_bytes(num_tables, width) + 2 * 4 * rows * width


def unbounded_lookup_backward_bytes(tokens: int, num_tables: int, width: int) -> int:
    """Bytes PyTorch's own CUDA `F.embedding_bag` backward allocates for `tokens` x `num_tables` indices
    beyond the table gradient it returns (`_pytorch_index_bytes` per index); what `BoundedEmbeddingBag`
    replaces, for docs and tests."""
    return tokens * num_tables * _pytorch_index_bytes(width)


class BoundedEmbeddingBag(torch.autograd.Function):
    """`F.embedding_bag(rows, tables, mode="sum", per_sample_weights=weights)`, `[N, K]` -> `[N, D]`, whose
    backward runs PyTorch's own embedding-bag backward ops over chunks of tokens (`chunk_tokens`, default
    from `LOOKUP_BACKWARD_BOUND`) and adds each chunk's table gradient into one fp32 accumulator.

    The same kernels, so the same arithmetic per chunk; one pass over the indices (each chunk sorts only its
    own), and no dense product over the table's rows. The forward keeps `rows`, the weights as the kernel
    used them and the tables (no offset2bag, which the plain path keeps per layer).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, tables: torch.Tensor,
                chunk_tokens: int | None) -> torch.Tensor:
        used = weights.to(tables.dtype)
        ctx.save_for_backward(rows, used, tables)
        ctx.chunk_tokens, ctx.weights_dtype = chunk_tokens, weights.dtype
        return F.embedding_bag(rows, tables, mode="sum", per_sample_weights=used)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        rows, used, tables = ctx.saved_tensors
        n, k = rows.shape
        num_rows, width = tables.shape
        need_weights, need_tables = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        chunk = ctx.chunk_tokens or lookup_backward_chunk_tokens(k, width, LOOKUP_BACKWARD_BOUND)
        acc = torch.promote_types(tables.dtype, torch.float32)
        grad_out = grad_out.contiguous()
        grad_tables = None
        grad_weights = torch.empty(n, k, dtype=tables.dtype, device=rows.device) if need_weights else None
        no_max = torch.empty(0, dtype=torch.long, device=rows.device)  # mode "sum" reads no max indices
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            indices = rows[start:start + m].reshape(-1)
            bag_of_index = torch.arange(m, device=rows.device).repeat_interleave(k)  # offset2bag
            grad = grad_out[start:start + m]
            if need_tables:
                # the fp32 gradient and weights make the kernel write an fp32 table gradient: the chunks are
                # summed before anything is rounded to the tables' dtype
                bag_size = torch.full((m,), k, dtype=torch.long, device=rows.device)
                part = torch.ops.aten._embedding_bag_dense_backward(
                    grad.to(acc), indices, bag_of_index, bag_size, no_max, num_rows, False, 0,
                    used[start:start + m].reshape(-1).to(acc), -1,
                )
                grad_tables = part if grad_tables is None else grad_tables.add_(part)
                del part
            if need_weights:
                offsets = torch.arange(0, m * k, k, device=rows.device)
                grad_weights[start:start + m] = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad, tables, indices, offsets, bag_of_index, 0, -1
                ).view(m, k)
        if grad_tables is None and need_tables:  # no tokens
            grad_tables = torch.zeros(num_rows, width, dtype=acc, device=rows.device)
        return (
            None,
            grad_weights.to(ctx.weights_dtype) if need_weights else None,
            grad_tables.to(tables.dtype) if need_tables else None,
            None,
        )


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
