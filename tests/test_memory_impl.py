"""The Memory Layer's compute paths (`memoryformer.nn.memory_ops`) all compute paper Eq. 11-12.

Every path is checked, forward and all gradients, against a float64 reference written here (index_add
over the selected rows, and the closed-form gradients of Eq. 12: the tables get w * dy on the selected
rows only, the weights get <dy, row>), on shapes with K = 1, odd output widths and tau up to 10, and with
bf16 / fp16 tables whose sums must accumulate in fp32.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from memoryformer.nn import memory_ops
from memoryformer.nn.bucket_usage import watch_hashes
from memoryformer.nn.memory_layer import MemoryLayer, hash_chunks
from memoryformer.nn.memory_ops import weighted_lookup

HAS_KERNEL = memory_ops.load_cpu_extension() is not None
IMPLS = ["torch", "auto"]
# (tokens, K, out width, tau): K = 1, odd widths, widths below / between / above the 64-column SIMD tile,
# tau up to 10 (1024 rows per table, the Memory Block's second layer at tau = 8 + 2).
SHAPES = [(1, 1, 1, 1), (5, 1, 64, 8), (7, 3, 37, 4), (33, 16, 130, 10), (4, 2, 72, 10), (64, 8, 512, 8)]


@pytest.fixture(autouse=True)
def two_threads():
    """The fused kernels split their work across threads (`parallel_over`) and run inline on one: every test
    here runs with two, also under `make test`, whose workers otherwise train with one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def fused_hash(layer, x):
    """`memory_ops.fused_hash` with `layer`'s settings (None where the C++ hash does not apply)."""
    return memory_ops.fused_hash(x, layer.code_length, layer.weighting, layer.temperature, layer.impl)


def fused_layer(layer, x):
    """`memory_ops.fused_layer` with `layer`'s tensors and settings (None where it does not apply)."""
    return memory_ops.fused_layer(
        x, layer.tables, layer.bias, layer.code_length, layer.weighting, layer.temperature, layer.impl
    )


def make_inputs(n, k, d, tau, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tables = torch.randn(k << tau, d, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, 1 << tau, (n, k), generator=gen) + (torch.arange(k) << tau)
    weights = torch.rand(n, k, generator=gen, dtype=torch.float64) * 2
    grad_out = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return rows, weights, tables, grad_out


def float64_reference(rows, weights, tables, grad_out):
    """y, dL/dtables, dL/dweights in float64 by explicit sums (independent of the code under test)."""
    n, k = rows.shape
    y = torch.zeros(n, tables.shape[1], dtype=torch.float64)
    token = torch.arange(n).repeat_interleave(k)
    y.index_add_(0, token, tables.double()[rows.reshape(-1)] * weights.double().reshape(-1, 1))
    grad_tables = torch.zeros_like(tables, dtype=torch.float64)
    grad_tables.index_add_(0, rows.reshape(-1), grad_out.double()[token] * weights.double().reshape(-1, 1))
    grad_weights = (tables.double()[rows] * grad_out.double()[:, None, :]).sum(-1)
    return y, grad_tables, grad_weights


def run(impl, rows, weights, tables, grad_out):
    tables = tables.detach().clone().requires_grad_(True)
    weights = weights.detach().clone().requires_grad_(True)
    y = weighted_lookup(rows, weights, tables, impl=impl)
    y.backward(grad_out.to(y.dtype))
    return y, tables.grad, weights.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_paths_match_float64_reference(impl, shape):
    rows, weights, tables, grad_out = make_inputs(*shape)
    t32, w32 = tables.float(), weights.float()
    ref_y, ref_gt, ref_gw = float64_reference(rows, w32, t32, grad_out.float())
    y, gt, gw = run(impl, rows, w32, t32, grad_out.float())
    assert y.dtype == gt.dtype == torch.float32 and y.shape == (shape[0], shape[2])
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.double(), ref_y, **tol)
    torch.testing.assert_close(gt.double(), ref_gt, **tol)
    torch.testing.assert_close(gw.double(), ref_gw, **tol)


def test_float64_stays_exact():
    rows, weights, tables, grad_out = make_inputs(9, 4, 24, 6)
    ref = float64_reference(rows, weights, tables, grad_out)
    for impl in IMPLS:
        for got, want in zip(run(impl, rows, weights, tables, grad_out), ref, strict=True):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_tables(impl, dtype):
    rows, weights, tables, grad_out = make_inputs(40, 8, 130, 8, seed=3)
    tables = tables.to(dtype)  # the reference reads the same rounded table values
    ref_y, ref_gt, ref_gw = float64_reference(rows, weights.float(), tables, grad_out.to(dtype))
    y, gt, gw = run(impl, rows, weights.float(), tables, grad_out)
    assert y.dtype == gt.dtype == dtype and gw.dtype == torch.float32
    eps = torch.finfo(dtype).eps  # one rounding of an fp32 sum to the tables' dtype
    torch.testing.assert_close(y.double(), ref_y, rtol=eps, atol=1e-6)
    torch.testing.assert_close(gt.double(), ref_gt, rtol=eps, atol=1e-6)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_accumulates_in_fp32(impl, dtype):
    # 1 + 63 * 2**-12 = 1.01538...: in bf16 (ulp 2**-7 at 1) or fp16 (ulp 2**-10) each small term added to
    # a running low-precision sum rounds away, giving exactly 1; an fp32 sum keeps them all.
    k, d, tau = 64, 3, 1
    tables = torch.full((k << tau, d), 2.0**-12, dtype=dtype)
    tables[0] = 1.0
    rows = (torch.arange(k) << tau).unsqueeze(0)
    weights = torch.ones(1, k)
    y = weighted_lookup(rows, weights, tables, impl=impl)
    expected = torch.tensor(1 + 63 * 2.0**-12).to(dtype)
    assert y.dtype == dtype and expected != 1.0
    assert torch.equal(y, expected.expand(1, d))
    # Same for the table gradient: 64 tokens add 2**-12 each to one row already holding 1 from token 0.
    tables.requires_grad_(True)
    rows = torch.zeros(k, 1, dtype=torch.int64)
    grad_out = torch.full((k, d), 2.0**-12, dtype=dtype)
    grad_out[0] = 1.0
    y = weighted_lookup(rows, torch.ones(k, 1), tables, impl=impl)
    (grad_tables,) = torch.autograd.grad(y, tables, grad_out)
    assert torch.equal(grad_tables[0], expected.expand(d))


def test_leading_dims_and_no_grad_decode_path():
    rows, weights, tables, _ = make_inputs(6, 4, 40, 5)
    rows, weights, tables = rows.reshape(2, 3, 4), weights.float().reshape(2, 3, 4), tables.float()
    with torch.no_grad():
        outs = [weighted_lookup(rows, weights, tables, impl=impl) for impl in IMPLS]
    ref = float64_reference(rows.reshape(6, 4), weights.reshape(6, 4), tables, torch.zeros(6, 40))[0]
    for out in outs:
        assert out.shape == (2, 3, 40)
        torch.testing.assert_close(out.reshape(6, 40).double(), ref, rtol=1e-5, atol=1e-5)


def test_only_weights_or_only_tables_need_grad():
    rows, weights, tables, grad_out = make_inputs(10, 4, 33, 4)
    ref_y, ref_gt, ref_gw = float64_reference(rows, weights, tables, grad_out)
    w = weights.float().requires_grad_(True)
    (gw,) = torch.autograd.grad(weighted_lookup(rows, w, tables.float(), impl="auto"), w, grad_out.float())
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    t = tables.float().requires_grad_(True)
    (gt,) = torch.autograd.grad(weighted_lookup(rows, weights.float(), t, impl="auto"), t, grad_out.float())
    torch.testing.assert_close(gt.double(), ref_gt, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
def test_fused_backward_is_deterministic_and_uses_the_kernel():
    rows, weights, tables, grad_out = make_inputs(300, 16, 96, 4, seed=7)  # many repeats of each row
    tables = tables.float()
    assert memory_ops.resolve_impl("auto", tables) == "cpu_kernel"
    first = run("auto", rows, weights.float(), tables, grad_out.float())
    second = run("auto", rows, weights.float(), tables, grad_out.float())
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_layer_impls_agree_on_all_gradients(dtype):
    """The layer (hash + lookup + bias) gives the same output and x / tables / bias gradients per path."""
    torch.manual_seed(0)
    base = MemoryLayer(40, 27, code_length=10, impl="torch")
    with torch.no_grad():
        base.tables.normal_()
    base = base.to(dtype)
    x0 = torch.randn(2, 5, 40)
    grad_out = torch.randn(2, 5, 27).to(dtype)
    results = {}
    for impl in IMPLS:
        layer = MemoryLayer(40, 27, code_length=10, impl=impl).to(dtype)
        layer.load_state_dict(base.state_dict())
        x = x0.clone().requires_grad_(True)
        layer(x).backward(grad_out)
        results[impl] = (layer(x).detach(), layer.tables.grad, layer.bias.grad, x.grad)
    # float64 reference of the whole layer: the torch path with every tensor in float64.
    ref_layer = MemoryLayer(40, 27, code_length=10, impl="torch").double()
    ref_layer.load_state_dict({k: v.double() for k, v in base.state_dict().items()})
    x = x0.double().requires_grad_(True)
    ref_y = ref_layer(x)
    ref_y.backward(grad_out.double())
    ref = (ref_y.detach(), ref_layer.tables.grad, ref_layer.bias.grad, x.grad)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    for impl, got in results.items():
        for name, g, r in zip(("y", "tables", "bias", "x"), got, ref, strict=True):
            assert g.dtype == (torch.float32 if name == "x" else dtype), (impl, name)
            torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * r.abs().max().item(),
                                       msg=f"{impl} {name}")


def test_embedding_bag_fallback_matches(monkeypatch):
    """Without a compiler the fused path falls back to F.embedding_bag, with one warning, same numbers."""
    import torch.utils.cpp_extension as cpp

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found\nmore detail")

    monkeypatch.setattr(cpp, "load", no_compiler)
    memory_ops.load_cpu_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert memory_ops.load_cpu_extension() is None
        assert len(caught) == 1 and "g++ not found" in str(caught[0].message)
        assert "\n" not in str(caught[0].message)
        for dtype in (torch.float32, torch.bfloat16):
            rows, weights, tables, grad_out = make_inputs(12, 4, 19, 6, seed=2)
            tables = tables.to(dtype)
            assert memory_ops.resolve_impl("auto", tables) == "embedding_bag"
            ref_y, ref_gt, ref_gw = float64_reference(rows, weights.float(), tables, grad_out.to(dtype))
            y, gt, gw = run("auto", rows, weights.float(), tables, grad_out)
            assert y.dtype == gt.dtype == dtype
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(y.double(), ref_y, rtol=eps, atol=1e-6)
            torch.testing.assert_close(gt.double(), ref_gt, rtol=eps, atol=1e-6)
            torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5)
    finally:
        memory_ops.load_cpu_extension.cache_clear()


def test_bad_impl_and_bad_rows_fail_clearly():
    rows, weights, tables, _ = make_inputs(3, 2, 8, 3)
    with pytest.raises(ValueError, match="choose one of: auto, torch"):
        weighted_lookup(rows, weights, tables, impl="cuda")
    with pytest.raises(ValueError, match="impl='cuda'"):
        MemoryLayer(8, 4, code_length=4, impl="cuda")
    no_triton = r"impl='triton' is not supported; choose one of: auto, torch\.$"
    with pytest.raises(ValueError, match=no_triton):
        MemoryLayer(8, 4, code_length=4, impl="triton")
    # the retired name of the auto path fails, naming its replacement, in every entry point
    for build in (lambda: MemoryLayer(8, 4, code_length=4, impl="fused"),
                  lambda: weighted_lookup(rows, weights, tables, impl="fused")):
        with pytest.raises(ValueError, match=r"impl='fused' .* is gone; set impl=auto\.$"):
            build()
    with pytest.raises(ValueError, match="must have one shape"):
        weighted_lookup(rows, weights[:, :1], tables, impl="auto")
    if HAS_KERNEL:
        with pytest.raises(RuntimeError, match="outside the table"):
            weighted_lookup(rows + 1000, weights.float(), tables.float(), impl="auto")


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("weighting", "temperature", "tau"), [("l1_prob", 1.0, 8), ("prob", 0.5, 10),
                                                               ("prob", 2.0, 1), ("l1_prob", 1.0, 16)])
def test_fused_inference_hash_matches_hash_chunks(dtype, weighting, temperature, tau):
    from memoryformer.nn.memory_layer import hash_chunks

    gen = torch.Generator().manual_seed(tau)
    x = (torch.randn(3, 5, 4 * tau, generator=gen) * 3).to(dtype)
    x[0, 0, :tau] = 0.0  # sign(0) = +1: code all ones, p = 2**-tau
    x[0, 1, :tau] = -0.0
    layer = MemoryLayer(4 * tau, 1, code_length=tau, weighting=weighting, temperature=temperature,
                        impl="auto")
    with torch.no_grad():
        rows, weights = fused_hash(layer, x)
    ref = hash_chunks(x.double(), tau, weighting, temperature)
    assert rows.shape == weights.shape == (3, 5, 4) and weights.dtype == torch.float32
    assert torch.equal(rows, ref.rows)
    assert torch.all(rows[0, :2, 0] == (1 << tau) - 1)
    torch.testing.assert_close(weights.double(), ref.weights, rtol=2e-6, atol=1e-30)
    # A gradient-carrying input, or the torch path, is left to hash_chunks (autograd).
    assert fused_hash(layer, x.float().requires_grad_(True)) is None
    layer.impl = "torch"
    assert fused_hash(layer, x) is None


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bias", "tau", "out", "shape"), [(True, 8, 48, (1, 1)), (False, 10, 70, (2, 3)),
                                                           (True, 4, 512, (5,)), (True, 4, 128, (3, 40))])
def test_memory_layer_decode_path_equals_training_path(dtype, bias, tau, out, shape):
    """Without gradients the layer runs as ONE fused call (`fused_layer`); it must equal the hash +
    lookup + bias path taken with gradients, and the float64 torch reference."""
    torch.manual_seed(1)
    layer = MemoryLayer(8 * tau, out, code_length=tau, bias=bias)
    with torch.no_grad():
        layer.tables.normal_()
        if bias:
            layer.bias.normal_()
    layer = layer.to(dtype)
    x = torch.randn(*shape, 8 * tau)
    with torch.no_grad():
        assert fused_layer(layer, x) is not None
        fast = layer(x)
    slow = layer(x.clone().requires_grad_(True))  # torch hash + autograd lookup + bias
    reference = MemoryLayer(8 * tau, out, code_length=tau, bias=bias, impl="torch").double()
    reference.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    ref = reference(x.double()).detach()
    assert fast.shape == (*shape, out) and fast.dtype == dtype
    eps = torch.finfo(dtype).eps
    # fp32: equal to rounding; bf16: the fused path rounds once (bias added in fp32), the other twice.
    torch.testing.assert_close(fast.double(), ref, rtol=eps, atol=eps * ref.abs().max().item())
    torch.testing.assert_close(fast, slow.detach(), rtol=2 * eps, atol=2 * eps * ref.abs().max().item())


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
def test_fused_inference_is_skipped_where_it_does_not_apply():
    layer = MemoryLayer(16, 8, code_length=8)
    x = torch.randn(3, 16)
    assert fused_layer(layer, x) is None  # grad enabled and the tables require grad
    with torch.no_grad():
        assert fused_layer(MemoryLayer(16, 8, code_length=8, impl="torch"), x) is None
        assert fused_layer(layer, x.double()) is None
        assert fused_layer(layer, torch.randn(3, 24)) is None  # wrong width: hash() reports it
        assert fused_layer(MemoryLayer(16, 8, code_length=8, bias=False).double(), x) is None
        seen = []
        handles = watch_hashes(layer, lambda name, hashed: seen.append(hashed.codes()))
        layer(x)  # watched, it still takes the fused path: the hook hashes x again for the codes
        for h in handles:
            h.remove()
        assert len(seen) == 1 and torch.equal(seen[0], hash_chunks(x, 8).codes())
        with pytest.raises(ValueError, match=r"expects input of shape \[\.\.\., 16\]"):
            layer(torch.randn(3, 24))


# Shapes where each table row is read by >= 3 tokens (tokens >= 3 * 2**tau) and the width is a multiple of 64:
# the C++ forward takes its cache-blocked loop (packed 64-column table slabs, 2048-token blocks) there. The
# last one spans two token blocks and a partial one.
BLOCKED_SHAPES = [(64, 4, 128, 4), (200, 3, 64, 6), (4500, 2, 64, 3)]


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
def test_blocked_forward_matches_float64_reference(shape, dtype):
    rows, weights, tables, grad_out = make_inputs(*shape, seed=3)
    tables, grad_out = tables.to(dtype), grad_out.to(dtype).float()  # run() feeds dy in the output dtype
    ref_y, ref_gt, ref_gw = float64_reference(rows, weights.float(), tables, grad_out)
    y, gt, gw = run("auto", rows, weights.float(), tables, grad_out)
    with torch.no_grad():
        y_nograd = weighted_lookup(rows, weights.float(), tables, impl="auto")
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    scale = ref_y.abs().max().item()
    # fp32 accumulation, one rounding to the tables' dtype at the end
    torch.testing.assert_close(y.double(), ref_y, rtol=eps, atol=eps * scale)
    assert torch.equal(y, y_nograd)
    torch.testing.assert_close(gt.double(), ref_gt, rtol=eps, atol=eps * ref_gt.abs().max().item())
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-5, atol=1e-5 * ref_gw.abs().max().item())


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
def test_blocked_forward_falls_back_when_rows_leave_their_table():
    # The blocked loop assumes rows[n, k] lies in table k (what the hash produces); any other row layout must
    # still be computed exactly, by the per-token loop.
    rows, weights, tables, _ = make_inputs(64, 4, 128, 4, seed=5)
    rows = rows.flip(-1).contiguous()  # column k now indexes table K-1-k
    with torch.no_grad():
        y = weighted_lookup(rows, weights.float(), tables.float(), impl="auto")
    ref = float64_reference(rows, weights.float(), tables.float(), torch.zeros(64, 128))[0]
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@pytest.mark.skipif(not HAS_KERNEL, reason="the C++ kernel did not build on this machine (no compiler)")
@pytest.mark.parametrize("tokens", [1, 600])
def test_large_table_gradient_is_zero_outside_touched_rows_and_accumulates(tokens):
    # 2048 x 512 fp32 = 4 MiB: the table gradient comes from fresh zero pages and only touched rows are
    # written (1 token: 8 of 2048 rows), or huge pages when most rows are touched (600 tokens).
    rows, weights, tables, grad_out = make_inputs(tokens, 8, 512, 8, seed=11)
    t32 = tables.float().requires_grad_(True)
    w32 = weights.float()
    _, ref_gt, _ = float64_reference(rows, w32, t32.detach(), grad_out.float())
    for _ in range(2):  # the second backward adds into the first gradient (AccumulateGrad's in-place add)
        weighted_lookup(rows, w32, t32, impl="auto").backward(grad_out.float())
    torch.testing.assert_close(t32.grad.double(), 2 * ref_gt, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(t32.shape[0], dtype=torch.bool)
    untouched[rows.reshape(-1)] = False
    assert int(untouched.sum()) >= (2048 - 8 if tokens == 1 else 1)  # one row per table per token
    assert bool((t32.grad[untouched] == 0).all())
    (gt,) = torch.autograd.grad(weighted_lookup(rows, w32, t32, impl="auto"), t32, grad_out.float())
    gt.mul_(0.5).add_(1.0)  # the gradient is an ordinary writable tensor (optimizers and clipping write it)
    torch.testing.assert_close(gt.double(), 0.5 * ref_gt + 1.0, rtol=1e-5, atol=1e-5)


def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_one():
    # torch's build lock is a plain file: a process killed mid-build leaves it, and torch alone would then
    # wait for it forever in every later process.
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    from memoryformer.nn import memory_ops

    if memory_ops.load_cpu_extension() is None:
        pytest.skip("the C++ kernel does not build on this machine")
    stale = Path(_get_build_directory(memory_ops._extension_name(), verbose=False)) / "lock"
    stale.touch()
    code = "from memoryformer.nn.memory_ops import load_cpu_extension as f; assert f() is not None"
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not stale.exists()


# ----------------------------------------------------------------------------- the bounded lookup backward
def _embedding_bag_backward_calls(fn) -> list[int]:
    """Run `fn` and return the number of indices each of PyTorch's embedding-bag backward ops was given."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = ("_embedding_bag_backward", "_embedding_bag_dense_backward", "_embedding_bag_sparse_backward")
    calls: list[int] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in names:
                calls.append(args[1].numel())  # (grad, indices, ...)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, 64])
def test_bounded_lookup_backward_equals_embedding_bags_own_in_float64(chunk):
    # the same F.embedding_bag ops, over chunks of `chunk` tokens (50 tokens: 7 does not divide them)
    rows, weights, tables, grad_out = make_inputs(50, 4, 13, 6, seed=3)
    got_w, got_t = weights.double().requires_grad_(True), tables.clone().requires_grad_(True)
    want_w, want_t = weights.double().requires_grad_(True), tables.clone().requires_grad_(True)
    got = memory_ops.BoundedEmbeddingBag.apply(rows, got_w, got_t, chunk)
    want = torch.nn.functional.embedding_bag(rows, want_t, mode="sum", per_sample_weights=want_w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward(grad_out)
    want.backward(grad_out)
    torch.testing.assert_close(got_w.grad, want_w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t.grad, want_t.grad, rtol=1e-12, atol=1e-12)


def test_embedding_bag_path_backward_sees_one_chunk_of_indices_at_a_time(monkeypatch):
    # the CUDA path's lookup (embedding_bag_lookup) with a bound that fits 5 tokens: each backward op gets at
    # most 5 x K indices, and all of them once (one pass)
    tokens, k, width = 23, 4, 16
    per_token = memory_ops._lookup_backward_token_bytes(k, width)
    monkeypatch.setattr(memory_ops, "LOOKUP_BACKWARD_BOUND", 5 * per_token + per_token // 2)
    assert memory_ops.lookup_backward_chunk_tokens(k, width, memory_ops.LOOKUP_BACKWARD_BOUND) == 5
    rows, weights, tables, grad_out = make_inputs(tokens, k, width, 4, seed=4)
    weights, tables = weights.float().requires_grad_(True), tables.float().requires_grad_(True)
    calls = _embedding_bag_backward_calls(
        lambda: memory_ops.embedding_bag_lookup(rows, weights, tables).backward(grad_out.float()))
    assert calls == [5 * k] * 4 + [3 * k], calls


def test_lookup_backward_bytes_stay_under_the_bound_at_any_micro_batch():
    # MF-tiny's merged Q/K/V layer: K = 64 tables of 256 rows, 1536 wide
    k, rows, width = 64, 16384, 1536
    fixed = 2 * 4 * rows * width  # the fp32 accumulator and one chunk's table gradient
    for tokens in (1, 2048, 8 * 2048, 128 * 2048, 4096 * 2048):
        extra = memory_ops.lookup_backward_bytes(tokens, k, width, rows)
        assert extra - fixed <= memory_ops.LOOKUP_BACKWARD_BOUND
    # PyTorch's own backward: 4 x 1536 bytes of fp32 workspace per index plus 6 int64 index arrays, ~104 GB
    # at 128 x 2048 tokens, as EmbeddingBackwardKernel.cu's at::empty({numel, stride}) sizes it
    unbounded = memory_ops.unbounded_lookup_backward_bytes(128 * 2048, k, width)
    assert unbounded == 128 * 2048 * 64 * (4 * 1536 + 6 * 8)
    assert unbounded > 100e9
