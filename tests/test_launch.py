"""The run folder of a multi-process launch is named once for all its processes (`memoryformer/launch.py`)."""

from __future__ import annotations

import datetime as dt

import pytest
from torch.distributed import TCPStore

from memoryformer import launch
from memoryformer.launch import run_stamp

FMT = "%Y-%m-%d_%H-%M-%S"


def test_a_single_process_is_named_by_the_clock():
    stamp = run_stamp(FMT, {})
    assert dt.datetime.strptime(stamp, FMT)
    assert run_stamp(FMT, {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}) != "slurm-77.0"  # one task: the clock


def test_an_srun_step_is_named_by_its_job_and_step_which_a_requeue_keeps():
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "32", "SLURM_STEP_ID": "0", "SLURM_PROCID": "17"}
    assert run_stamp(FMT, env) == "slurm-4242.0"
    assert run_stamp(FMT, {**env, "SLURM_STEP_ID": "1"}) == "slurm-4242.1"  # the next srun of the job
    array = {**env, "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_stamp(FMT, array) == "slurm-900_3.0"


def test_torchrun_with_a_rendezvous_id_is_named_by_it():
    env = {"TORCHELASTIC_RUN_ID": "exp7", "WORLD_SIZE": "8", "RANK": "5"}
    assert run_stamp(FMT, env) == "torchrun-exp7"


def test_torchrun_without_one_shares_the_first_workers_time_through_the_agent_store(monkeypatch, free_port):
    """Workers on two nodes whose clocks read different seconds get the first one's stamp; a restarted
    worker group (same store) keeps it."""
    port = free_port
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    env = {
        "TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }
    clocks = iter([dt.datetime(2026, 12, 7, 17, 0, 0), dt.datetime(2026, 12, 7, 17, 0, 1)])

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return next(clocks)

    monkeypatch.setattr(launch.dt, "datetime", Clock)
    first = run_stamp(FMT, {**env, "RANK": "0"})
    second = run_stamp(FMT, {**env, "RANK": "3"})
    assert first == second == "2026-12-07_17-00-00"
    del server


def test_torchrun_restarts_into_a_shared_rendezvous_store_are_refused():
    from memoryformer.config import ConfigError
    from memoryformer.launch import check_torchrun_restarts

    env = {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_MAX_RESTARTS": "1"}
    with pytest.raises(ConfigError, match="export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun"):
        check_torchrun_restarts(env)
    check_torchrun_restarts({**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    check_torchrun_restarts({**env, "TORCHELASTIC_MAX_RESTARTS": "0"})
    check_torchrun_restarts({})
