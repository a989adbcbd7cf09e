"""The Memory Layer: a hash-table lookup that stands in for `nn.Linear` (paper section 2.2-2.3).

For one token x in R^d, split into K contiguous chunks z_k of tau values (d = K * tau):

    code_k   = sum_j [z_kj >= 0] * 2**(tau - 1 - j)             (sign bits, MSB first, 0 counts as +)
    p(z_k)   = prod_j 1 / (1 + exp(-2 |z_kj| / t))               (paper Eq. 10, the factorised softmax)
    w_k      = ||z_k||_1 * p(z_k; t=1)   ("l1_prob", released code)   or   p(z_k; t)   ("prob", paper)
    y        = sum_k w_k * tables[code_k + k * 2**tau]  (+ bias)   (paper Eq. 11)

Gradients (paper Eq. 12): the tables receive `w_k * dL/dy` on the selected rows only; x receives gradient
only through the weights w_k, since the codes are piecewise constant:

    dp/dz_j = p * (2/t) * sign(z_j) * (1 - sigmoid(2 |z_j| / t))
    dw/dz_j = sign(z_j) * p + ||z||_1 * dp/dz_j                   ("l1_prob", t = 1)

At exactly z_j = 0 the weight has a kink (|z_j| is not differentiable there) and we take
d|z_j|/dz_j = 0, the symmetric subgradient that `torch.abs` gives and that the released code's torch ops
therefore used. So sign(z_j) in the two lines above is 0 at z_j = 0 and a zero coordinate passes no gradient
through its own factor; the chunk's other coordinates still do. (The hash, in contrast, counts 0 as +.)

The bit order is the released code's (most significant bit = first element of the chunk), the reverse
of the paper's Eq. 4. It is a bijection on codes, so it changes nothing but which row a code names, and
keeping the released order keeps the authors' checkpoints loadable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memoryformer.config import check_code_length, check_memory_impl, check_weighting
from memoryformer.nn import memory_ops

#: Default std of the tables' N(0, std^2) init; the Memory Block keeps it (`memoryformer.models.init`).
TABLE_INIT_STD = 0.02


def _check_code_length(code_length: int) -> None:
    # bool is an int subclass; True would silently mean tau = 1.
    if isinstance(code_length, bool) or not isinstance(code_length, int):
        raise TypeError(f"code_length={code_length!r} must be an int number of bits per chunk, such as 8.")
    check_code_length("code_length", code_length)


def _check_float(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise TypeError(f"Memory Layer input must be floating-point but has dtype {x.dtype}; cast it first.")


@dataclass
class HashCodes:
    """The result of hashing one input: which row of each table to read, and with what weight.

    `rows`: int64 `[..., K]`, the global row index `code_k + k * 2**tau` into a `[K * 2**tau, out]` table.
    `weights`: float `[..., K]`, the soft weight w_k of each chunk (differentiable w.r.t. the input; the
    weighting and temperature are those of the layer or call that hashed).
    `code_length`: tau, so a consumer can check it was hashed the way it expects.
    """

    rows: torch.Tensor
    weights: torch.Tensor
    code_length: int

    @property
    def num_tables(self) -> int:
        """K, the number of chunks (and tables)."""
        return self.rows.shape[-1]

    def codes(self) -> torch.Tensor:
        """Per-table codes in `[0, 2**tau)`, shape `[..., K]` (rows with the table offsets removed)."""
        offsets = torch.arange(self.num_tables, device=self.rows.device) << self.code_length
        return self.rows - offsets


def sign_codes(z: torch.Tensor) -> torch.Tensor:
    """Integer code of each chunk's sign pattern. `z`: `[..., K, tau]` -> int64 `[..., K]`.

    Bit j (0-based within the chunk) is 1 when z_j >= 0 (so 0 and -0.0 count as +) and has weight
    2**(tau-1-j) (MSB first, as in the released code).
    """
    tau = z.shape[-1]
    bit_weights = 1 << torch.arange(tau - 1, -1, -1, device=z.device, dtype=torch.int64)
    return ((z >= 0).to(torch.int64) * bit_weights).sum(dim=-1)


def chunk_weights(z: torch.Tensor, weighting: str = "l1_prob", temperature: float = 1.0) -> torch.Tensor:
    """Soft weight of each chunk. `z`: `[..., K, tau]` -> `[..., K]`, computed in at least float32.

    "prob": p(z) = prod_j sigmoid(2 |z_j| / t), in [2**-tau, 1) (paper Eq. 10).
    "l1_prob": ||z||_1 * p(z; t=1), the released code's score (it trained the published models).
    The product is taken as exp(sum(logsigmoid)) so that tau = 16 does not underflow. The gradient at an
    exact z_j = 0 is that of d|z_j|/dz_j = 0 (see the module docstring).
    """
    check_weighting(weighting, temperature)
    return _chunk_weights(z, weighting, temperature)


def _chunk_weights(z: torch.Tensor, weighting: str, temperature: float) -> torch.Tensor:
    compute_dtype = torch.promote_types(z.dtype, torch.float32)
    a = z.to(compute_dtype).abs()
    if weighting == "prob":
        return torch.exp(F.logsigmoid(a * (2.0 / temperature)).sum(dim=-1))  # paper Eq. 10
    return a.sum(dim=-1) * torch.exp(F.logsigmoid(2.0 * a).sum(dim=-1))  # ||z||_1 * Eq. 10 at t = 1


def hash_chunks(
    x: torch.Tensor, code_length: int, weighting: str = "l1_prob", temperature: float = 1.0
) -> HashCodes:
    """Hash `x`: `[..., K * tau]` into `HashCodes` with rows `[..., K]` and weights `[..., K]`."""
    _check_code_length(code_length)
    _check_float(x)
    if x.shape[-1] % code_length:
        raise ValueError(f"input width {x.shape[-1]} is not divisible by code_length={code_length}.")
    check_weighting(weighting, temperature)
    return _hash_chunks(x, code_length, weighting, temperature)


def _hash_chunks(x: torch.Tensor, code_length: int, weighting: str, temperature: float) -> HashCodes:
    num_tables = x.shape[-1] // code_length
    z = x.unflatten(-1, (num_tables, code_length))  # z_k: K chunks of tau values (paper Eq. 6)
    with torch.no_grad():  # h(z_k) (paper Eq. 2-5), offset into the k-th table's rows
        offsets = torch.arange(num_tables, device=x.device, dtype=torch.int64) << code_length
        rows = sign_codes(z) + offsets
    weights = _chunk_weights(z, weighting, temperature)  # w_k (paper Eq. 8-10)
    return HashCodes(rows=rows, weights=weights, code_length=code_length)


class MemoryLayer(nn.Module):
    """A drop-in for `nn.Linear(in_features, out_features)` computed by K hash-table lookups.

    K = in_features / code_length tables of `2**code_length x out_features`, stored as one parameter
    `tables` of shape `[K * 2**code_length, out_features]` (row = code + k * 2**code_length).
    Forward: `[..., in_features]` -> `[..., out_features]`.

    `weighting` defaults to "l1_prob", the released code's ||z||_1 * p(z; t=1), because that is what
    trained the paper's published numbers; "prob" is the paper's p(z; t) with `temperature` t.
    `bias` defaults to True as in the released code (init 0.001 * N(0, 1)); the paper's Eq. 11 has none.

    Precision: the weights are computed in at least float32; the lookup returns the tables' dtype and
    accumulates in fp32, also under `torch.autocast`, because casting the tables (hundreds of MB) every
    step would cost far more than reading K rows per token. `impl` picks the lookup's compute path
    ("auto": the device's fused kernel | "torch": the reference; see `memoryformer.nn.memory_ops`).

    Several layers reading the same input share one hash: `h = q.hash(x)`, then `q(x, hashed=h)`,
    `k(x, hashed=h)`, ...; the weights are those of the hashing layer's weighting. For bucket-usage
    statistics, `memoryformer.nn.bucket_usage.watch_hashes` reports the codes of every forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        code_length: int = 8,
        weighting: str = "l1_prob",
        temperature: float = 1.0,
        bias: bool = True,
        init_std: float = TABLE_INIT_STD,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        # Every argument is checked here, once: forward runs on every decoded token.
        check_memory_impl("impl", impl)
        self.impl = impl
        _check_code_length(code_length)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int.")
        if in_features % code_length:
            raise ValueError(
                f"in_features={in_features} is not divisible by code_length={code_length}; the input is "
                f"split into in_features / code_length chunks, so pick a code_length that divides it."
            )
        check_weighting(weighting, temperature)
        self.in_features = in_features
        self.out_features = out_features
        self.code_length = code_length
        self.num_tables = in_features // code_length
        self.weighting = weighting
        self.temperature = float(temperature)
        self.init_std = init_std
        factory = {"device": device, "dtype": dtype}
        self.tables = nn.Parameter(torch.empty(self.num_tables << code_length, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables ~ N(0, init_std^2); bias ~ 0.001 * N(0, 1) as in the released code."""
        nn.init.normal_(self.tables, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.normal_(self.bias, mean=0.0, std=0.001)

    def hash(self, x: torch.Tensor) -> HashCodes:
        """Which row of each table, and with what weight (paper Eq. 2-10): `x` `[..., in_features]` ->
        `HashCodes` with rows and weights `[..., K]`, shareable across layers reading the same x."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"MemoryLayer expects input of shape [..., {self.in_features}], got shape {tuple(x.shape)}."
            )
        fused = memory_ops.fused_hash(x, self.code_length, self.weighting, self.temperature, self.impl)
        if fused is not None:  # no gradient needed: one C++ call
            return HashCodes(rows=fused[0], weights=fused[1], code_length=self.code_length)
        _check_float(x)
        return _hash_chunks(x, self.code_length, self.weighting, self.temperature)

    def lookup(self, hashed: HashCodes) -> torch.Tensor:
        """y = sum_k w_k * T_k[h(z_k)] + bias (paper Eq. 11): `HashCodes` `[..., K]` -> `[..., out]`."""
        if hashed.num_tables != self.num_tables or hashed.code_length != self.code_length:
            raise ValueError(
                f"these codes were hashed for K={hashed.num_tables}, tau={hashed.code_length}, but this "
                f"layer has K={self.num_tables}, tau={self.code_length}; share a hash only between layers "
                f"with the same in_features and code_length."
            )
        if hashed.weights.shape != hashed.rows.shape:
            raise ValueError(
                f"HashCodes weights have shape {tuple(hashed.weights.shape)} but rows have shape "
                f"{tuple(hashed.rows.shape)}; they must match."
            )
        y = memory_ops.weighted_lookup(hashed.rows, hashed.weights, self.tables, impl=self.impl)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor, hashed: HashCodes | None = None) -> torch.Tensor:
        """`[..., in_features]` -> `[..., out_features]`: hash, then look up; pass `hashed` to reuse another
        layer's hash of this same x (q, k and v share one)."""
        if hashed is None:
            # no gradient needed: one C++ call. `_parameters` directly: nn.Module.__getattr__ costs ~2 us per
            # parameter here, a fifth of a whole decoding step's lookup (getattr still serves parametrized
            # or wrapped parameters).
            params = self._parameters
            tables, bias = params.get("tables"), params.get("bias")
            if tables is None:
                tables = self.tables
            if bias is None and "bias" not in params:
                bias = self.bias
            y = memory_ops.fused_layer(
                x, tables, bias, self.code_length, self.weighting, self.temperature, self.impl
            )
            if y is not None:
                return y
            hashed = self.hash(x)
        elif hashed.rows.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"hashed was computed for tokens of shape {tuple(hashed.rows.shape[:-1])}, but x has leading "
                f"shape {tuple(x.shape[:-1])}; pass the HashCodes of this same x."
            )
        return self.lookup(hashed)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"code_length={self.code_length}, num_tables={self.num_tables}, weighting={self.weighting!r}, "
            f"bias={self.bias is not None}"
        )

    @property
    def storage_bytes_fp16(self) -> int:
        """Bytes of the tables in fp16, the paper's "Memory Size" unit (Tables 3 and 5)."""
        return self.tables.numel() * 2
