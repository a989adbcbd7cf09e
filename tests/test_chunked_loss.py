"""The chunked LM-head cross-entropy against F.cross_entropy over the full logits, in float64."""

import pytest
import torch
import torch.nn.functional as F

from memoryformer.models import build_model
from memoryformer.nn.chunked_loss import chunked_cross_entropy, kept_bytes, peak_bytes


def _reference(hidden, weight, targets):
    logits = F.linear(hidden, weight).float() if hidden.dtype != torch.float64 else F.linear(hidden, weight)
    return F.cross_entropy(logits.flatten(0, -2), targets.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_loss_and_gradients_equal_full_cross_entropy_in_float64(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, generator=gen)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 50, (3, 11), generator=gen)
    targets[0, :5] = -100
    got_h, got_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_h, ref_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got = chunked_cross_entropy(got_h, got_w, targets, chunk_tokens=chunk)
    want = _reference(ref_h, ref_w, targets)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    (got * 2.5).backward()
    (want * 2.5).backward()
    torch.testing.assert_close(got_h.grad, ref_h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_w.grad, ref_w.grad, rtol=1e-10, atol=1e-12)


def test_model_loss_and_gradients_equal_the_full_logits_path_in_float64():
    torch.manual_seed(0)
    model = build_model("nano", n_layer=1, vocab_size=97, block_size=32).double()
    idx = torch.randint(0, 97, (2, 9))
    targets = torch.randint(0, 97, (2, 9))
    model.loss_chunk_tokens = 5
    logits_none, loss = model(idx, targets)
    assert logits_none is None
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(idx)[0].reshape(-1, 97), targets.reshape(-1))
    full.backward()
    torch.testing.assert_close(loss, full, rtol=1e-12, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_without_gradient_and_all_ignored():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(hidden, weight, targets, chunk_tokens=3),
                                   _reference(hidden, weight, targets))
        assert chunked_cross_entropy(hidden, weight, torch.full((4,), -100)).item() == 0.0


def test_peak_bytes_counts_one_chunk_of_logits():
    # one chunk of 1024 tokens at V = 50304, fp32 matmul: matmul out + fp32 copy + fp32 gradient
    assert peak_bytes(4096, 50304, 512, with_grad=False) == 1024 * 50304 * 8
    assert peak_bytes(4096, 50304, 512) == 1024 * 50304 * 12 + 4 * 50304 * 512 + 4 * 4096 * 512


# ----------------------------------------------------------------------------- 16-bit inputs, scaled loss
#: The issue's shape (#29): 8,192 tokens and the GPT-NeoX vocabulary. The size matters: an entry of the
#: logit gradient's softmax part is about 1 / (V N) ~ 2e-9 here, under fp16's smallest subnormal (6e-8).
LOW_N, LOW_V, LOW_D = 8192, 50304, 16
LOSS_SCALE = 2.0**16  # fp16 loss scaling's usual scale, applied as the upstream gradient


@pytest.fixture(scope="module")
def low_precision_case():
    """Hidden states, a head whose rows share a common direction (as trained heads' rows do), targets, and
    the float64 `F.cross_entropy` gradients of the scaled loss. The inputs are exactly representable in both
    fp16 and bf16, so one float64 reference serves both dtypes."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(LOW_N, LOW_D, generator=gen)
    common = torch.randn(LOW_D, generator=gen)
    weight = 0.6 * torch.randn(LOW_V, LOW_D, generator=gen) + 5.0 * common / common.norm()
    hidden, weight = (x.bfloat16().half().float() for x in (hidden, weight))  # exact in both 16-bit types
    assert torch.equal(hidden.bfloat16().float(), hidden) and torch.equal(weight.half().float(), weight)
    targets = torch.randint(0, LOW_V, (LOW_N,), generator=gen)
    # the reference: float64 F.cross_entropy over the whole batch, its terms summed 1024 tokens at a time
    # (the [N, V] float64 logits at once would be 3.3 GB)
    h64, w64 = hidden.double(), weight.double().requires_grad_(True)
    grad_h = torch.empty_like(h64)
    for start in range(0, LOW_N, 1024):
        h = h64[start:start + 1024].clone().requires_grad_(True)
        part = F.cross_entropy(F.linear(h, w64), targets[start:start + 1024], reduction="sum") / LOW_N
        (part * LOSS_SCALE).backward()
        grad_h[start:start + 1024] = h.grad
    return hidden, weight, targets, grad_h, w64.grad


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


# ~15 s (fp16) / ~5 s (bf16) on 2 CPU cores: the shape, and CPU 16-bit matmuls are slow; the float64
# reference (~7 s) is shared by both
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_gradients_within_1_percent_of_float64_at_loss_scale_2_16(dtype, low_precision_case):
    hidden, weight, targets, want_h, want_w = low_precision_case
    h = hidden.to(dtype).requires_grad_(True)  # a 16-bit model, as DeepSpeed's fp16 / bf16 engines run it
    w = weight.to(dtype).requires_grad_(True)
    loss = chunked_cross_entropy(h, w, targets)
    loss.backward(torch.tensor(LOSS_SCALE))
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    err_h, err_w = _relative(h.grad, want_h), _relative(w.grad, want_w)
    print(f"{dtype}: relative error of d/dh {err_h:.2e}, of d/dW {err_w:.2e}")
    assert err_h < 0.01 and err_w < 0.01, (err_h, err_w)


def test_kept_gradients_are_fp32_for_16_bit_inputs():
    # what backward needs is fp32 whatever the inputs' dtype (the loss scale reaches it only in backward)
    hidden = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_cross_entropy(hidden, weight, torch.arange(6), chunk_tokens=4)
    assert sorted((tuple(t.shape), t.dtype) for t in saved) == [((6, 8), torch.float32),
                                                                ((10, 8), torch.float32)]
    assert sum(t.numel() * t.element_size() for t in saved) == kept_bytes(6, 10, 8)
    assert peak_bytes(4096, 50304, 512, compute_bytes=2) == 1024 * 50304 * 10 + kept_bytes(4096, 50304, 512)
