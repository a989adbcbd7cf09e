"""Megatron sampler: ranks see disjoint samples whose union is the single-rank order; resume is exact."""

import pytest

from memoryformer.data.sampler import MegatronSampler


@pytest.mark.parametrize("world,mb", [(2, 3), (4, 2), (3, 1)])
def test_ranks_disjoint_and_union_is_single_rank_order(world, mb):
    total = 101
    single = list(MegatronSampler(total, mb * world, 0, 1))
    per_rank = [list(MegatronSampler(total, mb, r, world)) for r in range(world)]
    assert all(len(p) == len(per_rank[0]) for p in per_rank)
    flat = [i for p in per_rank for i in p]
    assert len(set(flat)) == len(flat)  # disjoint
    # interleave the ranks' micro-batches step by step: exactly the single-rank sequence
    steps = len(per_rank[0]) // mb
    merged = [i for s in range(steps) for r in range(world) for i in per_rank[r][s * mb : (s + 1) * mb]]
    assert merged == single == list(range(total - total % (mb * world)))


def test_resume_from_consumed_samples():
    full = list(MegatronSampler(64, 4, 1, 2))
    resumed = list(MegatronSampler(64, 4, 1, 2, consumed_samples=24))
    assert resumed == full[12:]  # 24 global samples = 3 steps = 12 samples of rank 1
    assert len(MegatronSampler(64, 4, 1, 2, consumed_samples=24)) == len(resumed)


def test_wrap_starts_a_new_pass():
    s = MegatronSampler(10, 2, 0, 1, wrap=True, start_fn=lambda: 12)
    assert list(s)[:2] == [2, 3]
