"""The chunked LM-head cross-entropy against F.cross_entropy over the full logits, in float64."""

import pytest
import torch
import torch.nn.functional as F

from memoryformer.models import build_model
from memoryformer.nn.chunked_loss import chunked_cross_entropy, peak_bytes


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
    assert peak_bytes(4096, 50304, 512) == 1024 * 50304 * 12 + 4 * 50304 * 512 + 4096 * 512 * 4
