"""Megatron's pretraining sampler: consecutive global batches, each split into per-rank micro-batches.

With micro-batch `b` and world size `W`, global batch g is samples `[g*b*W, (g+1)*b*W)`; rank r takes the
r-th contiguous block of `b`. So the ranks' samples are disjoint and, interleaved block by block, give the
single-rank order; this is how GPT-NeoX (hence Pythia) assigned samples to data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DistributedSampler


class MegatronSampler(DistributedSampler):
    """Yields this rank's sample indices from `consumed_samples` on (global count, all ranks together).

    A `DistributedSampler` subclass so that Lightning leaves it in place instead of injecting its own.
    Use with `DataLoader(batch_size=micro_batch_size, drop_last=True)`. Indices wrap around `total`
    when `wrap` is set (a second pass over the mapped samples), else the last incomplete global batch
    is dropped. `start_fn`, when given, is called at each `__iter__` to read the current consumed count
    (so a re-iterated loader resumes where training is).
    """

    def __init__(
        self,
        total: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        consumed_samples: int = 0,
        wrap: bool = False,
        start_fn=None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.total, self.micro_batch_size = total, micro_batch_size
        self.rank, self.world_size = rank, world_size
        # DistributedSampler's attributes, for code that inspects them
        self.num_replicas, self.shuffle, self.drop_last, self.epoch, self.seed = world_size, False, True, 0, 0
        self.global_batch = micro_batch_size * world_size
        if total < self.global_batch:
            raise ValueError(f"{total} samples cannot fill one global batch of {self.global_batch}")
        self.consumed_samples, self.wrap, self.start_fn = consumed_samples, wrap, start_fn

    def _start(self) -> int:
        start = self.start_fn() if self.start_fn is not None else self.consumed_samples
        return start % self.usable if self.wrap else start

    @property
    def usable(self) -> int:
        """Samples in whole global batches."""
        return self.total - self.total % self.global_batch

    def __len__(self) -> int:
        return max(0, self.usable - self._start()) // self.world_size

    def __iter__(self) -> Iterator[int]:
        b = self.micro_batch_size
        for g in range(self._start(), self.usable - self.global_batch + 1, self.global_batch):
            lo = g + self.rank * b
            yield from range(lo, lo + b)
