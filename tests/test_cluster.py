"""The multi-node path under faults, on simulated nodes of this machine (`scripts/cluster_check.py`, which
`make cluster-check` runs and docs/resume.md#what-survives-what describes).

Each strategy's reference and fault chain runs once per session, in one cluster shared by the tests; the
strategy changes continue the DDP and ZeRO-2 chains' final checkpoints. Every check of a scenario must hold;
a failure prints the scenario table with what went wrong.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from cluster_check import (  # noqa: E402
    Cluster,
    Row,
    format_table,
    run_chain,
    run_reference,
    run_slurm_requeue,
    run_strategy_changes,
)

pytest.importorskip("deepspeed")
#: `make test` runs these apart, one at a time, after the rest of the suite (they start four ranks each)
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two simulated nodes sharing one runs folder and cache; every process stopped at the end."""
    nodes = Cluster(tmp_path_factory.mktemp("cluster"))
    nodes.chains, nodes.references = {}, {}
    yield nodes
    nodes.stop_everything()


def chain(cluster: Cluster, strategy: str) -> list[Row]:
    """The reference and fault chain of `strategy`, run once per module."""
    if strategy not in cluster.chains:
        cluster.references[strategy], _ = run_reference(cluster, strategy)
        cluster.chains[strategy] = run_chain(cluster, strategy, cluster.references[strategy])
    return cluster.chains[strategy]


def assert_ok(rows: list[Row]) -> None:
    assert all(r.ok for r in rows), "\n" + format_table(rows)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3"])
def test_preemption_dead_rank_torn_save_and_resizes_continue_the_reference(cluster, strategy):
    rows = chain(cluster, strategy)
    assert [r.scenario.split(" (")[0] for r in rows] == [
        "preemption", "dead rank", "torn save", "resize 4 -> 2 ranks", "resize 2 -> 4 ranks",
        "Ctrl+C on node 0's terminal",
    ]
    assert rows[0].redone == 0 and 0 <= rows[1].redone <= 3
    assert_ok(rows)


@pytest.mark.slow
def test_strategy_changes_are_converted_or_refused_before_any_process_group(cluster):
    chain(cluster, "ddp")
    chain(cluster, "zero2")
    assert_ok(run_strategy_changes(cluster, cluster.references["zero2"]))


@pytest.mark.slow
def test_a_slurm_time_limit_saves_before_submitit_requeues_and_the_job_resumes(cluster):
    assert_ok([run_slurm_requeue(cluster)])
