"""Next-token cross-entropy through the LM head, a chunk of tokens at a time.

    loss = mean over tokens n with target[n] != ignore of  logsumexp(h[n] W^T) - (h[n] W^T)[target[n]]

`F.cross_entropy(lm_head(h).float(), ...)` holds the fp32 logits of the whole micro-batch, `[N, V]`, and
autograd keeps them (and their softmax) until the backward: at N = 8 x 2048 tokens and V = 50304 that is
3.3 GB per copy. Here the logits exist for `chunk_tokens` tokens at a time only. When a gradient is needed
the forward also computes it, chunk by chunk, so the backward only scales the stored gradients by the
incoming scalar and no chunk is ever recomputed:

    d loss / d logits[n] = (softmax(logits[n]) - onehot(target[n])) / n_counted
    d loss / d h[n]      = d loss / d logits[n] @ W
    d loss / d W         = sum_n (d loss / d logits[n])^T h[n]

Both stored gradients are fp32 whatever the inputs' dtype: the loss scale of fp16 training (Lightning's
`16-mixed`, DeepSpeed's fp16 engine) only reaches them in `backward`, so stored in 16 bits their small
entries would already have underflowed (an entry of d loss / d h is about |W| / N). The two gradient
matmuls run in the matmul's dtype (16 bits under autocast or a 16-bit model) on `s x (softmax - onehot)`,
`s` a power of two chosen so that neither that operand nor either product can leave the 16-bit range
(`_fp16_safe_scale`); the results are divided by `s x n_counted` in fp32. Dividing by n_counted before the
cast, as a plain `(softmax - onehot) / N` in 16 bits would, puts every softmax entry (about 1 / V) at
1 / (V N) ~ 2e-9 at N = 8192, under fp16's smallest subnormal (6e-8): the softmax part of the gradient
would vanish.

Peak extra memory (`peak_bytes`): the fp32 logits and their fp32 gradient for one chunk (2 x 4 x C x V
bytes) plus the chunk's logits in the matmul's dtype, and what is kept for backward (`kept_bytes`): the
fp32 gradients of W (4 x V x d) and of h (4 x N x d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Tokens per chunk: at V = 50304 one chunk's fp32 logits are 206 MB; the matmuls stay large.
DEFAULT_CHUNK_TOKENS = 1024


def peak_bytes(tokens: int, vocab: int, width: int, compute_bytes: int = 4,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_grad: bool = True) -> int:
    """Bytes `chunked_cross_entropy` holds at its peak beyond its inputs, for `tokens` x `width` hidden
    states and a `vocab` x `width` head (`compute_bytes`: bytes per element of the matmul's dtype, 2 under
    bf16 autocast or a 16-bit model)."""
    c = min(tokens, chunk_tokens)
    logits = c * vocab * (compute_bytes + 4 + (4 if with_grad else 0))  # matmul out, fp32 copy, fp32 grad
    if not with_grad:
        return logits
    return logits + kept_bytes(tokens, vocab, width)


def kept_bytes(tokens: int, vocab: int, width: int) -> int:
    """Bytes the loss keeps for backward: the fp32 gradients of the `vocab` x `width` head and of the
    `tokens` x `width` hidden states (fp32 whatever their dtype, see the module docstring)."""
    return 4 * vocab * width + 4 * tokens * width


def _fp16_safe_scale(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int, dtype: torch.dtype,
                     acc: torch.dtype) -> torch.Tensor:
    """The power of two `s` (a 0-d tensor of dtype `acc`; no host sync) by which `softmax - onehot` is
    multiplied before its cast to the 16-bit `dtype`, as large as the range of `dtype` allows.

    With G = s (softmax - onehot) for a chunk of tokens (|G| <= s, and each row's |G| sums to <= 2 s):
        |G @ W|[n, j]   <= 2 s max|W|
        |G^T @ h|[v, j] <= s max_j sum_{n in chunk} |h[n, j]|
    so s = 2^floor(log2(max / (2 max(1, 2 max|W|, that column sum)))) keeps G and both products finite in
    `dtype` (a factor 2 of margin for the products' rounding), at most 2^24 (bf16's range is fp32's).
    """
    bound = torch.ones((), dtype=acc, device=hidden.device)
    bound = torch.maximum(bound, 2 * weight.detach().abs().amax().to(acc))
    for start in range(0, hidden.shape[0], chunk_tokens):
        column_sums = hidden[start:start + chunk_tokens].detach().abs().sum(dim=0, dtype=acc)
        bound = torch.maximum(bound, column_sums.amax())
    s = torch.exp2(torch.floor(torch.log2(torch.finfo(dtype).max / (2 * bound))))
    return s.clamp(max=2.0**24)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Loss and, when needed, its gradients w.r.t. `hidden` `[N, d]` and `weight` `[V, d]`, by chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_tokens):
        n = hidden.shape[0]
        keep = targets != ignore_index
        # clamp(min=1): an all-ignored batch gives 0 / 1 = 0 here instead of F.cross_entropy's 0 / 0 = nan,
        # and no device-to-host sync is needed to tell the two apart.
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        counted = keep.sum().clamp(min=1).to(acc)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # fp32 even for 16-bit inputs: the loss scale multiplies them only in backward
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) \
            if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        safe_targets = targets.masked_fill(~keep, 0)
        scale = None  # s of `_fp16_safe_scale`, once the matmul's dtype is known (16-bit only)
        for start in range(0, n, chunk_tokens):
            h = hidden[start:start + chunk_tokens]
            logits_mm = F.linear(h, weight)  # the matmul's dtype (bf16 under autocast)
            logits_dtype = logits_mm.dtype  # the backward matmuls use it too
            logits = logits_mm.to(acc)
            del logits_mm
            t, k = safe_targets[start:start + chunk_tokens], keep[start:start + chunk_tokens]
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, t[:, None]).squeeze(-1)
            total = total + torch.where(k, lse - picked, 0.0).sum()
            if not want_grad:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad.scatter_add_(-1, t[:, None], torch.full_like(t[:, None], -1, dtype=grad.dtype))
            if torch.finfo(logits_dtype).bits < 32:
                if scale is None:
                    scale = _fp16_safe_scale(hidden, weight, chunk_tokens, logits_dtype, acc)
                grad.mul_((k.to(grad.dtype) * scale)[:, None])
            else:  # fp32 / fp64 matmuls: nothing can underflow; the gradient as it always was
                grad.mul_((k.to(grad.dtype) / counted)[:, None])
            g = grad.to(logits_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = g @ weight.to(logits_dtype)
            if grad_weight is not None:
                grad_weight += (g.t() @ h.to(logits_dtype)).to(acc)
            del grad, g
        if scale is not None:  # undo s and divide by the count, in fp32
            unscale = 1.0 / (scale * counted)
            for stored in (grad_hidden, grad_weight):
                if stored is not None:
                    stored.mul_(unscale)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / counted

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # the (scaled) incoming gradient multiplies in fp32, and only then is the result cast to 16 bits
        gh = (grad_hidden * grad_loss.to(grad_hidden.dtype)).to(hidden_dtype) if ctx.needs_input_grad[0] \
            else None
        gw = (grad_weight * grad_loss.to(grad_weight.dtype)).to(weight_dtype) if ctx.needs_input_grad[1] \
            else None
        return gh, gw, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          ignore_index: int = -100, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(hidden, weight)` against `targets`, a scalar in fp32 (fp64 for fp64
    inputs), without the
    whole `[N, V]` logits: `hidden` `[..., d]`, `weight` `[V, d]`, `targets` `[...]` (`ignore_index` skipped).
    Equal to `F.cross_entropy(F.linear(hidden, weight).float(), targets)` up to summation order, except that
    a batch with no counted token gives 0 rather than nan."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a positive number of tokens.")
    return _ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                      ignore_index, chunk_tokens)


class ChunkedLossHead(nn.Linear):
    """The LM head: `nn.Linear(d, V, bias=False)` whose forward, given targets, returns the chunked training
    loss instead of the logits: `hidden` `[..., d]` -> logits `[..., V]`, or with `targets` `[...]` the
    scalar `chunked_cross_entropy`.

    The loss runs inside the head's own forward because DeepSpeed ZeRO-3 gathers a partitioned weight only
    around its module's forward (and backward): there the whole weight exists while the chunks are
    computed, so ZeRO-3 too holds one chunk's logits instead of the whole fp32 `[N, V]`.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return chunked_cross_entropy(hidden, self.weight, targets, ignore_index, chunk_tokens)
