"""Attention cores: exact causal softmax (`attend`) and Table 2's efficient attentions in causal form,
Performer, cosFormer and a blockwise causal Linformer.

The MemoryFormer paper (Table 2) swaps Pythia-410M's softmax attention for three efficient ones. Each
class here is an attention *core*: it takes the projected heads q, k, v `[B, H, T, hs]` plus rotary cos/sin
and returns `[B, T, H * hs]`, exactly like `attend` (the softmax core, `SoftmaxCore`), so both blocks
(`memoryformer.models.attention`) take any of them through `model.attention`. Every core is causal, in
training and evaluation: position i never reads a position j > i.

- **Performer** (Choromanski et al., ICLR 2021, FAVOR+): positive orthogonal random features of the softmax
  kernel, `phi(x) = exp(W x - |x|^2 / 2)` with q, k scaled by hs^(-1/4). W `[m, hs]` (shared by the heads
  of a layer) is drawn once at init from torch's RNG and kept as a persistent buffer, so evaluation and
  resumed runs see the same features; `performer_redraw_interval` > 0 redraws them every n optimizer steps
  (training only, from a stored seed: deterministic). Stabiliser: a key's logit `w_r.k - |k|^2/2` is at
  most `|w_r|^2 / 2` (complete the square), so the key feature is `exp(-|k - w_r|^2 / 2)` in (0, 1] and the
  query feature takes the `+|w_r|^2 / 2` back, minus its own row maximum (a per-query constant that cancels
  between numerator and denominator). Neither uses any other key, so no future key can leak through it,
  and the recurrent state needs no stabiliser of its own.
- **cosFormer** (Qin et al., ICLR 2022): `ReLU(q_i).ReLU(k_j) cos(pi/2 (i - j) / M)`, split by
  cos(a - b) = cos a cos b + sin a sin b into features `[ReLU(x) cos(pi p / 2M), ReLU(x) sin(pi p / 2M)]`
  (2 hs per head) at absolute positions p. M is fixed to `block_size` (`cosformer_m` = 0) rather than the
  sequence length the cosFormer paper uses: a fixed M keeps the weights of a token the same however long
  the sequence grows, so causal decoding is well-defined and the cache only needs the position offset.
- **Linformer** (Wang et al., 2020): the published form projects keys and values along the whole sequence
  (`E K`, `F V` with `E, F: [k, T]`), so every compressed row mixes future positions: not causal. We use a
  blockwise causal variant: the sequence is cut into blocks of L = `linformer_block` positions; each
  COMPLETED block is compressed to k = `linformer_k` rows by learned `E, F: [k, L]` (shared by the blocks
  and the heads of a layer, Linformer's "headwise sharing"); a query attends with exact softmax to its own
  block's positions up to itself plus the compressed rows of the completed earlier blocks. With L >= T it
  is exactly causal softmax attention; its cost is O(T (L + k T / L)), linear in T for a fixed T / L.

Rotary: applied to q and k after the projections, as in the softmax path, for all three (none of the three
papers forbids it, and Pythia's recipe uses it); Linformer compresses the rotated keys, so its compressed
rows carry a mix of positions. Kernelised prefix sums are computed in float32 (float64 inputs stay
float64) even under bf16 autocast, chunk by chunk: a masked quadratic form inside a chunk of `CHUNK`
positions plus the state carried from earlier chunks, never a [T, T] matrix. With a `KVCache`, Performer
and cosFormer keep their recurrent state `(S [B, H, m, hs], z [B, H, m])` per layer (constant memory per
token); Linformer keeps the raw keys and values and recompresses the completed blocks.

Costs (`flops`): multiply-adds of one layer's attention core at sequence length s, the project's
convention (the softmax row counts 2 s^2 d, the full square, though causal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memoryformer.config import ModelConfig
from memoryformer.models.kv_cache import KVCache
from memoryformer.nn.rotary import apply_rotary

#: Positions per chunk of the chunked prefix sums (masked quadratic inside, carried state across).
CHUNK = 128
#: Denominator floor of cosFormer (its reference code's 1e-6: ReLU features can all be zero).
COSFORMER_EPS = 1e-6
#: Denominator floor of the Performer: its features are positive, but the bound-stabilised key features
#: are small (about exp(-|k - w|^2 / 2)), so the floor must sit far below them; float32's smallest normal.
PERFORMER_EPS = torch.finfo(torch.float32).tiny


def _merge_heads(y: torch.Tensor) -> torch.Tensor:
    """`[B, H, T, hs]` -> `[B, T, H * hs]`."""
    b, h, t, hs = y.shape
    return y.transpose(1, 2).reshape(b, t, h * hs)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (tests); everything else (fp32, bf16, fp16) accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: KVCache | None = None,
    layer_idx: int = 0,
) -> torch.Tensor:
    """Rotary + causal softmax attention. q, k, v `[B, H, T, hs]`, cos/sin `[T, r]` -> `[B, T, H * hs]`.

    Scale 1/sqrt(hs). With a cache, the new queries sit at positions `cache.length..` and see every cached
    key plus the new keys up to their own position.
    """
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv_cache is not None:
        k, v = kv_cache.update(layer_idx, k, v)
    t_new, t_all = q.shape[-2], k.shape[-2]
    if t_new == t_all:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif t_new == 1:
        y = F.scaled_dot_product_attention(q, k, v)
    else:
        # is_causal aligns the mask to the top-left corner, which is wrong when queries start mid-sequence.
        q_pos = torch.arange(t_all - t_new, t_all, device=q.device)
        mask = torch.arange(t_all, device=q.device)[None, :] <= q_pos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _merge_heads(y)


def causal_linear_attention(
    fq: torch.Tensor,
    fk: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = COSFORMER_EPS,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Causal kernelised attention `o_i = fq_i S_i / max(fq_i . z_i, eps)`, chunk by chunk.

    fq, fk: non-negative features `[B, H, T, m]`; v `[B, H, T, hs]` (all in the accumulation dtype);
    `state`: `(S [B, H, m, hs], z [B, H, m])` of the positions before these, or None (empty).
    `S_i = S_0 + sum_{j<=i} fk_j v_j^T`, `z_i = z_0 + sum_{j<=i} fk_j`. Returns `o` `[B, H, T, hs]` and the
    state after the last position. Inside each chunk the masked quadratic form handles j <= i; earlier
    chunks enter through an exclusive prefix sum over the chunks' sums, all vectorised.
    """
    b, h, t, m = fq.shape
    hs = v.shape[-1]
    pad = (-t) % chunk if t > chunk else 0
    c = chunk if t > chunk else t
    if pad:  # zero features at the end contribute nothing and their outputs are dropped
        fq, fk, v = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v))
    n = (t + pad) // c
    fq, fk, v = fq.view(b, h, n, c, m), fk.view(b, h, n, c, m), v.view(b, h, n, c, hs)
    kv = fk.transpose(-1, -2) @ v  # [B, H, n, m, hs]: each chunk's sum of fk_j v_j^T
    ksum = fk.sum(dim=-2)  # [B, H, n, m]
    # exclusive prefix over chunks: chunk c sees the sums of chunks < c (a leading zero, then cumsum)
    s_prev = torch.cat((torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]), dim=2).cumsum(dim=2)
    z_prev = torch.cat((torch.zeros_like(ksum[:, :, :1]), ksum[:, :, :-1]), dim=2).cumsum(dim=2)
    if state is not None:
        s_prev = s_prev + state[0][:, :, None]
        z_prev = z_prev + state[1][:, :, None]
    causal = torch.ones(c, c, dtype=torch.bool, device=fq.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, n, C, C]
    num = scores @ v + fq @ s_prev
    den = scores.sum(dim=-1) + (fq * z_prev[:, :, :, None, :]).sum(dim=-1)
    out = (num / den.clamp_min(eps)[..., None]).reshape(b, h, n * c, hs)[:, :, :t]
    new_state = (s_prev[:, :, -1] + kv[:, :, -1], z_prev[:, :, -1] + ksum[:, :, -1])
    return out, new_state


def linear_attention_flops(seq_len: int, n_head: int, head_size: int, features: int, map_cost: int) -> int:
    """Multiply-adds of causal kernelised attention over all heads, prefix-sum form.

    Per head and token: state update `fk v^T` (m hs) and read-out `fq S` (m hs), normaliser update and
    read-out (2 m), plus `map_cost` for the feature maps of q and k. (The chunked evaluation adds a masked
    C x C block per chunk, an implementation detail not counted, as the softmax row ignores the mask.)
    """
    return seq_len * n_head * (2 * features * head_size + 2 * features + map_cost)


# ---------------------------------------------------------------------------------------------- cores
class SoftmaxCore(nn.Module):
    """Exact causal softmax attention (SDPA) through `attend`; no parameters, so state dicts are unchanged."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_size = config.n_head, config.head_size

    def forward(self, q, k, v, cos, sin, kv_cache: KVCache | None = None) -> torch.Tensor:
        """q, k, v `[B, H, T, hs]`, cos/sin `[T, r]` -> `[B, T, H * hs]`."""
        return attend(q, k, v, cos, sin, kv_cache, self.layer_idx)

    def flops(self, seq_len: int) -> int:
        """2 s^2 d: scores and mixing over the full square (the project's rule, paper Table 1)."""
        return 2 * seq_len * seq_len * self.n_head * self.head_size


class _LinearCore(nn.Module):
    """Shared forward of the kernelised cores: features, chunked prefix sums, state in the cache."""

    eps: float = COSFORMER_EPS

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_size = config.n_head, config.head_size
        self.chunk = CHUNK  # positions per chunk of the prefix sums (tests shrink it to cross chunks)

    def features(self, q: torch.Tensor, k: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-negative features of q and k `[B, H, T, hs]` at positions `start..` -> two `[B, H, T, m]`."""
        raise NotImplementedError

    def forward(self, q, k, v, cos, sin, kv_cache: KVCache | None = None) -> torch.Tensor:
        """q, k, v `[B, H, T, hs]`, cos/sin `[T, r]` -> `[B, T, H * hs]` (in q's dtype)."""
        out_dtype = q.dtype
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        acc = _accumulation_dtype(q)
        start = kv_cache.length if kv_cache is not None else 0
        with torch.autocast(q.device.type, enabled=False):  # prefix sums in float32 even under bf16
            fq, fk = self.features(q.to(acc), k.to(acc), start)
            state = kv_cache.get_state(self.layer_idx) if kv_cache is not None else None
            y, new_state = causal_linear_attention(fq, fk, v.to(acc), state, self.eps, self.chunk)
        if kv_cache is not None:
            kv_cache.set_state(self.layer_idx, new_state)
        return _merge_heads(y.to(out_dtype))


class CosformerCore(_LinearCore):
    """cosFormer: ReLU features re-weighted by cos(pi/2 (i - j) / M), as cos and sin halves (2 hs/head)."""

    eps = COSFORMER_EPS

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.horizon = config.cosformer_horizon

    def features(self, q, k, start):
        """`[ReLU(x) cos(pi p / 2M), ReLU(x) sin(pi p / 2M)]` at absolute positions p -> `[B, H, T, 2 hs]`."""
        pos = torch.arange(start, start + q.shape[-2], device=q.device, dtype=q.dtype)
        angle = (math.pi / (2 * self.horizon)) * pos[:, None]  # [T, 1]
        c, s = angle.cos(), angle.sin()
        fq, fk = F.relu(q), F.relu(k)
        return torch.cat((fq * c, fq * s), dim=-1), torch.cat((fk * c, fk * s), dim=-1)

    def flops(self, seq_len: int) -> int:
        """Prefix-sum form, m = 2 hs features per head; the cos/sin re-weighting costs 2 hs per q and k."""
        hs = self.head_size
        return linear_attention_flops(seq_len, self.n_head, hs, 2 * hs, map_cost=4 * hs)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """`[m, d]` rows orthogonal within each block of d, with chi(d) norms (Performer's ORF, `scaling=0`).

    Each block is the Q of a Gaussian d x d matrix's QR (a uniformly random orthonormal basis); each row is
    then rescaled to the norm of an independent Gaussian vector, so every row is marginally N(0, I_d).
    """
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        blocks.append((q * torch.sign(torch.diagonal(r))[None, :]).T)  # sign fix: Haar-distributed
    w = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return (w * norms[:, None]).float()


class PerformerCore(_LinearCore):
    """Performer (FAVOR+): positive orthogonal random features of exp(q.k / sqrt(hs)), bound-stabilised.

    Buffers (persistent, in the state dict): `feature_matrix` `[m, hs]` (W), `feature_seed` (int64, the
    seed of later redraws) and `feature_draw` (int64, the current draw: resumed runs continue from it).
    """

    eps = PERFORMER_EPS

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(config, layer_idx)
        self.num_features = config.performer_num_features
        self.redraw_interval = config.performer_redraw_interval
        self.register_buffer("feature_matrix", torch.empty(self.num_features, self.head_size))
        self.register_buffer("feature_seed", torch.zeros((), dtype=torch.int64))
        self.register_buffer("feature_draw", torch.zeros((), dtype=torch.int64))
        if not self.feature_matrix.is_meta:  # meta device (FLOPs, checkpoint loading): shapes only
            # The seed comes from torch's global RNG, so `torch.manual_seed(s)` then two builds agree.
            self.feature_seed.fill_(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
            self._draw(0)

    def _draw(self, draw: int) -> None:
        """Set W to draw number `draw` of this layer: a pure function of (seed, draw)."""
        gen = torch.Generator().manual_seed(int(self.feature_seed) + 1_000_003 * draw)
        w = orthogonal_gaussian(self.num_features, self.head_size, gen)
        self.feature_matrix.copy_(w.to(self.feature_matrix.device))
        self.feature_draw.fill_(draw)

    @torch.no_grad()
    def begin_training_step(self, step: int) -> None:
        """Redraw W when optimizer step `step` enters a new interval (training only, no-op when off)."""
        if self.redraw_interval > 0 and step // self.redraw_interval != int(self.feature_draw):
            self._draw(step // self.redraw_interval)

    def features_of(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """phi(x) up to a per-query constant, `[B, H, T, hs]` -> `[B, H, T, m]`, bounded in (0, 1]."""
        w = self.feature_matrix.to(x.dtype)
        x = x * self.head_size ** -0.25  # exp(q.k / sqrt(hs)) = exp((q hs^-1/4).(k hs^-1/4))
        half_w2 = 0.5 * (w * w).sum(dim=-1)  # |w_r|^2 / 2, the bound of w_r.x - |x|^2 / 2
        logits = x @ w.T - 0.5 * (x * x).sum(dim=-1, keepdim=True)
        if is_query:
            logits = logits + half_w2
            return torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        return torch.exp(logits - half_w2)  # = exp(-|x - w_r|^2 / 2)

    def features(self, q, k, start):
        """Query and key features (positions do not enter: rotary already did)."""
        return self.features_of(q, True), self.features_of(k, False)

    def flops(self, seq_len: int) -> int:
        """Prefix-sum form with m features per head; the random projections W q and W k cost 2 m hs."""
        m, hs = self.num_features, self.head_size
        return linear_attention_flops(seq_len, self.n_head, hs, m, map_cost=2 * m * hs)


class LinformerCore(nn.Module):
    """Blockwise causal Linformer (module docstring): exact softmax in the own block + compressed past blocks.

    Parameters `E`, `F` `[k, L]` compress the keys and values of each completed block of L positions to k
    rows; initialised N(0, 1 / L) so that a compressed row has the scale of one key.
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_size = config.n_head, config.head_size
        self.k, self.block = config.linformer_k, config.linformer_block
        self.E = nn.Parameter(torch.empty(self.k, self.block))
        self.F = nn.Parameter(torch.empty(self.k, self.block))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """E, F ~ N(0, 1 / L)."""
        nn.init.normal_(self.E, std=self.block ** -0.5)
        nn.init.normal_(self.F, std=self.block ** -0.5)

    def forward(self, q, k, v, cos, sin, kv_cache: KVCache | None = None) -> torch.Tensor:
        """q, k, v `[B, H, T, hs]`, cos/sin `[T, r]` -> `[B, T, H * hs]`; the cache stores raw k, v."""
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        return _merge_heads(blockwise_linformer(q, k, v, self.E, self.F, self.block))

    def flops(self, seq_len: int) -> int:
        """Multiply-adds at sequence length `seq_len`, all heads (`linformer_flops`)."""
        return linformer_flops(seq_len, self.n_head, self.head_size, self.k, self.block)


def linformer_flops(seq_len: int, n_head: int, head_size: int, k: int, block: int) -> int:
    """Blockwise causal Linformer's multiply-adds, all heads.

    Per head: a block b of l_b queries scores l_b own positions (the full square, as the softmax rule) and
    b k compressed rows, then mixes as many values: 2 l_b (l_b + b k) hs; compressing keys and values of
    the nb - 1 completed blocks that a later block reads costs 2 k L hs each.
    """
    d, nb = n_head * head_size, -(-seq_len // block)
    lengths = [min(block, seq_len - b * block) for b in range(nb)]
    pairs = sum(length * (length + b * k) for b, length in enumerate(lengths))
    return 2 * pairs * d + 2 * (nb - 1) * k * block * d


def blockwise_linformer(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, E: torch.Tensor, Fm: torch.Tensor, block: int
) -> torch.Tensor:
    """Causal blockwise Linformer. q `[B, H, Tq, hs]` are the LAST Tq of the Tk positions of k, v.

    Keys/values `[B, H, Tk, hs]` of the completed blocks are compressed by E, Fm `[r, L]`; a query in block b
    attends to the r * b compressed rows of blocks < b and to its own block's positions <= itself.
    Returns `[B, H, Tq, hs]`. One Python iteration per block of queries (Tq / L + 1 at most).
    """
    b_, h, tq, hs = q.shape
    tk = k.shape[-2]
    q_start = tk - tq
    first, last = q_start // block, (tk - 1) // block
    kc = vc = None
    if last > 0:  # blocks 0 .. last-1 are complete: the only ones any of these queries reads compressed
        kb = k[:, :, : last * block].reshape(b_, h, last, block, hs)
        vb = v[:, :, : last * block].reshape(b_, h, last, block, hs)
        kc = torch.einsum("rl,bhnld->bhnrd", E.to(k.dtype), kb)
        vc = torch.einsum("rl,bhnld->bhnrd", Fm.to(v.dtype), vb)
    outs = []
    for blk in range(first, last + 1):
        qs, qe = max(q_start, blk * block), min(tk, (blk + 1) * block)
        q_pos = torch.arange(qs, qe, device=q.device)
        k_pos = torch.arange(blk * block, qe, device=q.device)
        own = k_pos[None, :] <= q_pos[:, None]  # [nq, nk] causal inside the block
        keys, vals = k[:, :, blk * block: qe], v[:, :, blk * block: qe]
        if blk > 0:
            r = kc.shape[3] * blk
            keys = torch.cat((kc[:, :, :blk].reshape(b_, h, r, hs), keys), dim=2)
            vals = torch.cat((vc[:, :, :blk].reshape(b_, h, r, hs), vals), dim=2)
            own = torch.cat((torch.ones(qe - qs, r, dtype=torch.bool, device=q.device), own), dim=1)
        qb = q[:, :, qs - q_start: qe - q_start]
        outs.append(F.scaled_dot_product_attention(qb, keys, vals, attn_mask=own))
    return torch.cat(outs, dim=2)


ATTENTION_CORES: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxCore,
    "linformer": LinformerCore,
    "cosformer": CosformerCore,
    "performer": PerformerCore,
}


def build_attention_core(config: ModelConfig, layer_idx: int = 0) -> nn.Module:
    """The attention core `config.attention` names (validated by `ModelConfig`)."""
    return ATTENTION_CORES[config.attention](config, layer_idx)
