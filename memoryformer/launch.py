"""What the processes of one launch (torchrun, srun, Lightning's own ranks) agree on before Hydra names the
run folder: which process launched the run (`is_launching_process`), the folder's last part (`run_stamp`),
and a torchrun restart setting that would never form a process group (`check_torchrun_restarts`).

## One run folder for every process of a launch

Hydra names a run's folder from the clock (`outputs/<name>/<time>`), in every process. The processes of one
torchrun or srun launch start at slightly different times, on different nodes with different clocks, so each
would compose its own folder. `run_stamp` (the `${run_stamp:FORMAT}` resolver of `hydra.run.dir`) names the
folder once for the whole launch instead:

- an srun step of several tasks (SLURM_NTASKS > 1): `slurm-<job id>.<step id>` (`<array job>_<task>` for an
  array job), which a requeued job keeps, so it finds its own folder again;
- torchrun with `--rdzv-id ID`: `torchrun-<ID>`;
- torchrun without one (its run id is then "none"): the time read by the first process to ask, shared
  through the TCP store that torchrun's agents host for their workers (`TORCHELASTIC_USE_AGENT_STORE`); the
  store outlives a restart of the worker group, so restarted workers find the same folder;
- a single process: the time, as Hydra's `${now:FORMAT}`.

The ranks Lightning itself starts (`trainer.devices=N` without a launcher) get the launching process's
folder on their command line from Lightning, so they never resolve it.

`check_torchrun_restarts` refuses `torchrun --max-restarts N` with the rendezvous store shared across
rounds (torch's default): a restarted group then finds the keys of the group before it in that store, and
its process group never forms (gloo: "Connection refused" to the dead workers' addresses, then a hang).
`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` gives every round its own store.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping

from memoryformer.errors import ConfigError

#: Environment variables that mark a process that is not the launching one (any value but 0).
RANK_VARS = ("LOCAL_RANK", "RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
#: The key under which torchrun's workers share the run stamp in their agents' store.
STAMP_KEY = "memoryformer/run_stamp"
STORE_TIMEOUT_S = 300


def is_launching_process(environ: Mapping[str, str] | None = None) -> bool:
    """True unless a rank variable (`LOCAL_RANK`, `RANK`, `NODE_RANK`, ...) says this is a worker."""
    env = os.environ if environ is None else environ
    return all(env.get(var, "0") in ("", "0") for var in RANK_VARS)


def check_torchrun_restarts(environ: Mapping[str, str] | None = None) -> None:
    """Raise `ConfigError` (one sentence) for a torchrun launch with restarts whose rendezvous store is
    shared across rounds; see the module docstring."""
    env = os.environ if environ is None else environ
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts > 0 and "TORCHELASTIC_RUN_ID" in env and env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        raise ConfigError(
            f"torchrun --max-restarts {restarts} restarts the worker group into the rendezvous store of the "
            f"group before it, where the new process group never forms; export "
            f"TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (each restart then gets its own store)."
        )


def slurm_launch_id(environ: Mapping[str, str]) -> str | None:
    """`<job>.<step>` of an srun step of several tasks (array jobs `<array job>_<task>.<step>`), else None."""
    if int(environ.get("SLURM_NTASKS", "1") or 1) <= 1 or not environ.get("SLURM_JOB_ID"):
        return None
    job = environ["SLURM_JOB_ID"]
    if environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return f"{job}.{environ.get('SLURM_STEP_ID', '0')}"


def run_stamp(fmt: str, environ: Mapping[str, str] | None = None) -> str:
    """The last component of the run folder for this launch (see the module docstring); `fmt` is the
    `strftime` format of the time stamp."""
    env = os.environ if environ is None else environ
    slurm = slurm_launch_id(env)
    if slurm is not None:
        return f"slurm-{slurm}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id is not None and int(env.get("WORLD_SIZE", "1") or 1) > 1:
        if run_id not in ("", "none"):
            return f"torchrun-{run_id}"
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return _shared_stamp(env, dt.datetime.now().strftime(fmt))
    return dt.datetime.now().strftime(fmt)


def _shared_stamp(env: Mapping[str, str], mine: str) -> str:
    """The stamp the first worker stored in torchrun's agent store (`mine` if this worker is the first)."""
    from torch.distributed import TCPStore

    store = TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        is_master=False,
        timeout=dt.timedelta(seconds=STORE_TIMEOUT_S),
    )
    shared = store.compare_set(STAMP_KEY, "", mine)
    return shared.decode() if isinstance(shared, bytes) else str(shared)
