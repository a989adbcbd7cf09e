"""MemoryLayer against the paper's formulas (Eqs. 2-12; docs/paper-notes.md §1), written out in float64.

The reference below never calls the module's helpers: it re-derives the hash (Eqs. 2-5, with the released
code's MSB-first bit order), the factorised probability (Eq. 10), the released code's L1 score, the output
(Eq. 11) and every gradient in closed form (Eq. 12), and the module must match it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import functional_call

from memoryformer.nn import HashCodes, MemoryLayer
from memoryformer.nn.bucket_usage import watch_hashes


# ----------------------------------------------------------------------------- float64 reference
def ref_codes(z: torch.Tensor) -> torch.Tensor:
    """Eqs. 2-5: s = sign(z) with sign(0) = +1, code = sum_j (s_j + 1)/2 * 2**(tau-1-j) (MSB first)."""
    tau = z.shape[-1]
    s = torch.where(z >= 0, 1.0, -1.0).double()
    bit_value = torch.tensor([2.0 ** (tau - 1 - j) for j in range(tau)], dtype=torch.float64)
    return (((s + 1.0) / 2.0) * bit_value).sum(-1).round().long()


def ref_reference(x, tables, bias, tau, weighting, t, grad_out):
    """Forward y and the closed-form gradients (d tables, d bias, d x) of <grad_out, y>, all float64."""
    x = x.detach().double()
    tables = tables.detach().double()
    d = x.shape[-1]
    k_tables = d // tau
    lead = x.shape[:-1]
    z = x.reshape(-1, k_tables, tau)  # [N, K, tau]
    g = grad_out.detach().double().reshape(z.shape[0], -1)  # [N, out]

    rows = ref_codes(z) + torch.arange(k_tables) * 2**tau  # [N, K]
    a = z.abs()
    factor = 1.0 / (1.0 + torch.exp(-2.0 * a / t))  # Eq. 10, one factor per bit
    p = factor.prod(-1)  # [N, K]
    l1 = a.sum(-1)
    w = l1 * p if weighting == "l1_prob" else p

    selected = tables[rows]  # [N, K, out]
    y = (w[..., None] * selected).sum(1)
    if bias is not None:
        y = y + bias.detach().double()

    # Eq. 12: the selected row of table k gets w_k * dL/dy; nothing else does.
    g_tables = torch.zeros_like(tables)
    g_tables.index_add_(0, rows.reshape(-1), (w[..., None] * g[:, None, :]).reshape(-1, tables.shape[1]))
    g_bias = g.sum(0) if bias is not None else None
    # dL/dw_k = <dL/dy, T_k[code_k]>; dp/dz_j = p (2/t) sign(z_j) (1 - sigmoid(2|z_j|/t)), sign(0) = 0.
    g_w = (selected * g[:, None, :]).sum(-1)
    sgn = torch.sign(z)
    dp = p[..., None] * (2.0 / t) * sgn * (1.0 - factor)
    dw = sgn * p[..., None] + l1[..., None] * dp if weighting == "l1_prob" else dp  # product rule
    g_x = (g_w[..., None] * dw).reshape(*lead, d)
    return y.reshape(*lead, -1), g_tables, g_bias, g_x


def make_input(shape, zero_frac=0.15, seed=0, whole_zero_chunk=None):
    """Gaussian input with a fraction of exact +0.0 and -0.0 entries (and optionally one all-zero chunk)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    u = torch.rand(*shape, generator=gen)
    x = torch.where(u < zero_frac / 2, torch.zeros_like(x), x)
    x = torch.where((u >= zero_frac / 2) & (u < zero_frac), torch.full_like(x, -0.0), x)
    if whole_zero_chunk is not None:
        x.reshape(-1, shape[-1])[0, whole_zero_chunk[0] : whole_zero_chunk[1]] = 0.0
    return x


def run_module(layer, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out.to(y.dtype))
    return y, x.grad


WEIGHTINGS = [("prob", 1.0), ("prob", 0.5), ("l1_prob", 1.0)]


@pytest.mark.parametrize("tau,k_tables", list(itertools.product([1, 4, 8, 10], [1, 3, 64])))
@pytest.mark.parametrize("weighting,t", WEIGHTINGS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_all_gradients_match_float64_paper_formulas(tau, k_tables, weighting, t, bias):
    torch.manual_seed(tau * 100 + k_tables)
    d, out = tau * k_tables, 5
    layer = MemoryLayer(d, out, code_length=tau, weighting=weighting, temperature=t, bias=bias,
                        dtype=torch.float64)
    with torch.no_grad():
        layer.tables.normal_()  # O(1) rows so that every term of the sum is visible
    x = make_input((2, 3, d), seed=tau + k_tables, whole_zero_chunk=(0, tau))
    grad_out = torch.randn(2, 3, out, dtype=torch.float64)

    y, g_x = run_module(layer, x, grad_out)
    ref_y, ref_gt, ref_gb, ref_gx = ref_reference(x, layer.tables, layer.bias, tau, weighting, t, grad_out)

    assert y.shape == (2, 3, out)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.tables.grad, ref_gt, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_x, ref_gx, rtol=1e-10, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref_gb, rtol=1e-10, atol=1e-12)
    else:
        assert layer.bias is None


def test_float32_layer_matches_float64_reference():
    torch.manual_seed(1)
    layer = MemoryLayer(64, 48, code_length=8)
    with torch.no_grad():
        layer.tables.normal_()
    x = make_input((4, 64), seed=3).float()
    grad_out = torch.randn(4, 48)
    y, g_x = run_module(layer, x, grad_out)
    ref_y, ref_gt, ref_gb, ref_gx = ref_reference(x, layer.tables, layer.bias, 8, "l1_prob", 1.0, grad_out)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.tables.grad.double(), ref_gt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad.double(), ref_gb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_x.double(), ref_gx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["prob", "l1_prob"])
def test_gradient_at_exact_zero_is_zero_and_zero_counts_as_positive(weighting):
    # Documented choice: d|z_j|/dz_j = 0 at z_j = 0 (torch.abs, as in the released code's torch ops).
    layer = MemoryLayer(4, 3, code_length=4, weighting=weighting, dtype=torch.float64)
    with torch.no_grad():
        layer.tables.normal_()
    x = torch.tensor([[0.0, -0.0, 0.7, -1.3]], dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad[0, 0] == 0.0 and x.grad[0, 1] == 0.0
    assert (x.grad[0, 2:] != 0).all()  # the chunk's other coordinates still receive gradient
    # +0.0 and -0.0 both count as +: bits 1, 1, 1, 0 (MSB first) = 14.
    assert layer.hash(x.detach()).codes().tolist() == [[14]]


def test_all_zero_chunk_has_minimum_probability():
    # p ranges over [2**-tau, 1) and equals 2**-tau at z = 0 (paper section 1); the L1 score is 0 there.
    x = torch.zeros(1, 8, dtype=torch.float64)
    prob = MemoryLayer(8, 2, code_length=8, weighting="prob", dtype=torch.float64).hash(x)
    l1 = MemoryLayer(8, 2, code_length=8, weighting="l1_prob", dtype=torch.float64).hash(x)
    assert math.isclose(prob.weights.item(), 2.0**-8, rel_tol=1e-14)
    assert l1.weights.item() == 0.0
    assert prob.codes().item() == 255


# ----------------------------------------------------------------------------- Eq. 9 brute force
@pytest.mark.parametrize("weighting,t", WEIGHTINGS)
def test_factorised_probability_equals_softmax_over_all_sign_patterns(weighting, t):
    tau = 8
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(300, tau, generator=gen, dtype=torch.float64) * 1.5
    # Every sign pattern b_i, i = 0..255, with bit j of i (MSB first) meaning b_ij = +1.
    patterns = torch.tensor(
        [[1.0 if (i >> (tau - 1 - j)) & 1 else -1.0 for j in range(tau)] for i in range(2**tau)],
        dtype=torch.float64,
    )
    soft = torch.softmax(z @ patterns.T / t, dim=-1)  # Eq. 9, [300, 256]
    p_brute, best = soft.max(dim=-1)

    hashed = MemoryLayer(tau, 4, code_length=tau, weighting=weighting, temperature=t,
                         dtype=torch.float64).hash(z)
    # The most likely pattern is the sign pattern itself, and its index is the layer's code.
    assert torch.equal(hashed.codes()[:, 0], best)
    p_layer = hashed.weights[:, 0]
    if weighting == "l1_prob":
        p_layer = p_layer / z.abs().sum(-1)
    torch.testing.assert_close(p_layer, p_brute, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weighting,t", WEIGHTINGS)
def test_gradcheck_float64(weighting, t):
    torch.manual_seed(0)
    layer = MemoryLayer(6, 3, code_length=3, weighting=weighting, temperature=t, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    x = (torch.sign(x) * (0.2 + x.abs())).requires_grad_(True)  # |x| >= 0.2: eps never flips a code
    tables = torch.randn_like(layer.tables).requires_grad_(True)
    bias = torch.randn_like(layer.bias).requires_grad_(True)

    def f(x, tables, bias):
        return functional_call(layer, {"tables": tables, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, tables, bias), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the hard lookup
def marker_layer(tau: int, k_tables: int) -> MemoryLayer:
    """Column k holds each row's index on table k's rows and 0 elsewhere, so y_k / w_k names the row read."""
    layer = MemoryLayer(tau * k_tables, k_tables, code_length=tau, weighting="prob", bias=False,
                        dtype=torch.float64)
    with torch.no_grad():
        layer.tables.zero_()
        for k in range(k_tables):
            block = torch.arange(k * 2**tau, (k + 1) * 2**tau)
            layer.tables[block, k] = block.double()
    return layer


def test_lookup_reads_exactly_the_row_the_sign_bits_name():
    layer = marker_layer(tau=4, k_tables=3)
    # chunk 0: + + - -  -> 0b1100 = 12 (LSB-first Eq. 4 would give 3)
    # chunk 1: 0 - - -  -> 0b1000 = 8  (0 counts as +)
    # chunk 2: - - - +  -> 0b0001 = 1  (LSB-first would give 8)
    x = torch.tensor([[0.5, 2.0, -1.0, -0.1, 0.0, -3.0, -0.2, -0.4, -1.0, -1.0, -1.0, 0.3]]).double()
    expected_rows = [12, 16 + 8, 32 + 1]
    weights = layer.hash(x).weights
    y = layer(x)
    assert (y[0] / weights[0]).round().long().tolist() == expected_rows

    # Random sign patterns: the row read is the one computed bit by bit in plain Python.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    read = (layer(x) / layer.hash(x).weights).round().long()
    for n in range(50):
        for k in range(3):
            bits = [1 if x[n, 4 * k + j] >= 0 else 0 for j in range(4)]
            code = sum(b << (3 - j) for j, b in enumerate(bits))
            assert read[n, k].item() == code + k * 16


def test_table_gradient_is_sparse_and_equals_weighted_sum_of_grad_out():
    torch.manual_seed(2)
    tau, k_tables, out, n_tokens = 4, 3, 5, 7
    layer = MemoryLayer(tau * k_tables, out, code_length=tau, dtype=torch.float64)
    x = torch.randn(n_tokens, tau * k_tables, dtype=torch.float64)
    grad_out = torch.randn(n_tokens, out, dtype=torch.float64)
    layer(x).backward(grad_out)

    hashed = layer.hash(x)
    expected = {}
    for n in range(n_tokens):
        for k in range(k_tables):
            row = int(hashed.rows[n, k])
            expected[row] = expected.get(row, 0.0) + hashed.weights[n, k].item() * grad_out[n]
    nonzero_rows = set(torch.nonzero(layer.tables.grad.abs().sum(-1)).flatten().tolist())
    assert nonzero_rows == set(expected)
    for row, value in expected.items():
        torch.testing.assert_close(layer.tables.grad[row], value, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- shared hash, codes
def test_shared_hash_gives_the_same_outputs_and_gradients_as_separate_hashing():
    torch.manual_seed(3)
    q, k, v = (MemoryLayer(32, out, code_length=8) for out in (32, 32, 16))
    x = torch.randn(2, 5, 32)

    x_sep = x.clone().requires_grad_(True)
    separate = [layer(x_sep) for layer in (q, k, v)]
    sum(o.sum() for o in separate).backward()
    grads_sep = [layer.tables.grad.clone() for layer in (q, k, v)]
    for layer in (q, k, v):
        layer.zero_grad()

    x_shr = x.clone().requires_grad_(True)
    hashed = q.hash(x_shr)
    shared = [layer(x_shr, hashed=hashed) for layer in (q, k, v)]
    sum(o.sum() for o in shared).backward()

    for a, b in zip(separate, shared, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(x_sep.grad, x_shr.grad, rtol=1e-6, atol=1e-7)
    for layer, g in zip((q, k, v), grads_sep, strict=True):
        torch.testing.assert_close(layer.tables.grad, g, rtol=0, atol=0)


def test_shared_hash_with_mismatched_layer_raises():
    x = torch.randn(3, 32)
    hashed = MemoryLayer(32, 8, code_length=8).hash(x)  # K = 4, tau = 8
    with pytest.raises(ValueError, match="K=4, tau=8"):
        MemoryLayer(32, 8, code_length=4)(x, hashed=hashed)  # K = 8, tau = 4
    with pytest.raises(ValueError, match="K=4, tau=8"):
        MemoryLayer(64, 8, code_length=8).lookup(hashed)  # K = 8, tau = 8
    with pytest.raises(ValueError, match=r"\(3,\)"):
        MemoryLayer(32, 8, code_length=8)(torch.randn(2, 32), hashed=hashed)
    bad = HashCodes(rows=hashed.rows, weights=hashed.weights[:2], code_length=8)
    with pytest.raises(ValueError, match="must match"):
        MemoryLayer(32, 8, code_length=8).lookup(bad)


def test_watch_hashes_reports_the_codes_of_every_forward():
    layer = MemoryLayer(40, 6, code_length=10)  # K = 4
    seen: list[tuple[str, HashCodes]] = []
    handles = watch_hashes(layer, lambda name, hashed: seen.append((name, hashed)))
    x1, x2 = torch.randn(2, 3, 40), torch.randn(5, 40)
    layer(x1)
    layer(x2)
    shared = layer.hash(x2)
    layer(x2, hashed=shared)  # a shared hash (q, k and v) is reported as passed
    for h in handles:
        h.remove()
    layer(x1)  # no longer watched
    assert [name for name, _ in seen] == ["", "", ""]
    assert seen[0][1].codes().shape == (2, 3, 4)
    codes = seen[1][1].codes()
    assert codes.shape == (5, 4)
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**10
    assert torch.equal(codes, ref_codes(x2.reshape(5, 4, 10).double()))
    assert seen[2][1] is shared


# ----------------------------------------------------------------------------- errors
def assert_one_sentence(excinfo, value: str) -> None:
    msg = str(excinfo.value)
    assert value in msg, msg
    assert msg.endswith(".") and ". " not in msg, msg


def test_invalid_construction_and_input_raise_one_clear_sentence():
    with pytest.raises(ValueError) as e:
        MemoryLayer(10, 4, code_length=4)
    assert_one_sentence(e, "in_features=10")
    for tau in (0, 17):
        with pytest.raises(ValueError) as e:
            MemoryLayer(16, 4, code_length=tau)
        assert_one_sentence(e, f"code_length={tau}")
    with pytest.raises(ValueError) as e:
        MemoryLayer(16, 4, code_length=8, weighting="l1_prob", temperature=0.5)
    assert_one_sentence(e, "temperature=0.5")
    with pytest.raises(ValueError) as e:
        MemoryLayer(16, 4, code_length=8, weighting="softmax")
    assert_one_sentence(e, "'softmax'")

    layer = MemoryLayer(16, 4, code_length=8)
    with pytest.raises(TypeError) as e:
        layer(torch.ones(2, 16, dtype=torch.int64))
    assert_one_sentence(e, "torch.int64")
    with pytest.raises(ValueError) as e:
        layer(torch.randn(2, 12))
    assert_one_sentence(e, "(2, 12)")


# ----------------------------------------------------------------------------- paper numbers
def test_weight_statistics_match_paper_monte_carlo():
    # docs/paper-notes.md §1: for z ~ N(0, 1), tau = 8, E[p] ~= 0.134 and E[||z||_1 p] ~= 0.97.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, 8, generator=gen)
    w_prob = MemoryLayer(8, 1, code_length=8, weighting="prob").hash(z).weights
    w_l1 = MemoryLayer(8, 1, code_length=8, weighting="l1_prob").hash(z).weights
    # Standard errors at 200k samples are ~1.7e-4 and ~1.8e-3; the paper prints 3 and 2 decimals.
    assert abs(w_prob.mean().item() - 0.134) < 1e-3
    assert abs(w_l1.mean().item() - 0.97) < 1e-2
    # The exact values by 1-D quadrature: E[p] = E[s]^8, E[score] = 8 E[|z| s] E[s]^7 with s = sigmoid(2|z|).
    grid = torch.linspace(0, 12, 200_001, dtype=torch.float64)
    half_normal = 2 * torch.exp(-grid**2 / 2) / math.sqrt(2 * math.pi)
    s = 1 / (1 + torch.exp(-2 * grid))
    e_s = torch.trapezoid(half_normal * s, grid).item()
    e_zs = torch.trapezoid(half_normal * grid * s, grid).item()
    assert abs(w_prob.mean().item() - e_s**8) < 5 * 1.7e-4
    assert abs(w_l1.mean().item() - 8 * e_zs * e_s**7) < 5 * 1.8e-3


@pytest.mark.parametrize(
    "d,tau,out,megabytes",
    [(512, 4, 512, 2.1), (512, 8, 512, 16.8), (510, 10, 512, 53.5)],  # paper Table 3, "Memory Size"
)
def test_table_storage_matches_paper_table3(d, tau, out, megabytes):
    layer = MemoryLayer(d, out, code_length=tau, device="meta")
    assert layer.tables.shape == ((d // tau) * 2**tau, out)
    assert round(layer.storage_bytes_fp16 / 1e6, 1) == megabytes


def test_tau8_d512_table_shape():
    layer = MemoryLayer(512, 512, code_length=8, device="meta")
    assert layer.num_tables == 64 and tuple(layer.tables.shape) == (64 * 256, 512)


# ----------------------------------------------------------------------------- low precision
def test_bf16_input_and_autocast():
    torch.manual_seed(4)
    layer = MemoryLayer(64, 32, code_length=8)
    with torch.no_grad():
        layer.tables.normal_()
    x = torch.randn(3, 4, 64)
    x_bf16 = x.bfloat16()

    # bf16 input: the hash upcasts exactly, so the result equals that of the same values in fp32.
    torch.testing.assert_close(layer(x_bf16), layer(x_bf16.float()), rtol=0, atol=0)

    # Under autocast the input arrives in bf16 from a Linear; the lookup stays in the tables' fp32.
    proj = torch.nn.Linear(64, 64)
    x_req = x.clone().requires_grad_(True)
    grad_out = torch.randn(3, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = proj(x_req)
        assert h.dtype == torch.bfloat16
        h.retain_grad()
        y = layer(h)
    assert y.dtype == torch.float32
    y.backward(grad_out)
    ref_y, ref_gt, ref_gb, ref_gh = ref_reference(h, layer.tables, layer.bias, 8, "l1_prob", 1.0, grad_out)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.tables.grad.double(), ref_gt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref_gh, rtol=2e-2, atol=2e-2)  # bf16 gradient of h
    assert torch.isfinite(x_req.grad).all() and x_req.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tables(dtype):
    torch.manual_seed(5)
    layer = MemoryLayer(64, 32, code_length=8)
    with torch.no_grad():
        layer.tables.normal_()
    layer = layer.to(dtype)
    x = torch.randn(6, 64).to(dtype)
    grad_out = torch.randn(6, 32)
    y, g_x = run_module(layer, x, grad_out)
    assert y.dtype == dtype and layer.tables.grad.dtype == dtype
    grad_out = grad_out.to(dtype)
    ref_y, ref_gt, _, ref_gx = ref_reference(x, layer.tables, layer.bias, 8, "l1_prob", 1.0, grad_out)
    scale = ref_y.abs().max().item()
    torch.testing.assert_close(y.double(), ref_y, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(layer.tables.grad.double(), ref_gt, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g_x.double(), ref_gx, rtol=5e-2, atol=5e-2 * ref_gx.abs().max().item())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == dtype
