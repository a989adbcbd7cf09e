"""`make cluster-check`: a cluster on this machine, and the faults a multi-node run lives through.

Each launch starts the README's multi-node command as simulated nodes: `nodes` torchrun agents on 127.0.0.1
(`--rdzv-backend c10d`), each in its own working directory (so each node composes its own Hydra run folder
from its own clock, as on a cluster), each in its own session (so a signal reaches one node's agent and
workers, as SLURM delivers it), all sharing one runs folder (`outputs/` and `multirun/` are links to it) and
one data cache. The processes use gloo and DeepSpeed's CPU accelerator. `scripts/cluster_probe.py` records
what every rank does (start step, restored checkpoint, per-step loss of the global batch).

For DDP, ZeRO-2 and ZeRO-3 it runs an uninterrupted reference, then one chain of launches that meets every
fault in turn, each resuming from what the previous one left:

1. preemption: SIGTERM to every process (agents and workers) at a step; the next launch must start at the
   step saved on the signal;
2. a dead rank: SIGKILL to one worker mid-step under `--max-restarts 1`; the restarted group must resume,
   every rank from the same newest whole checkpoint, redoing at most `ckpt_every_n_steps` steps;
3. a torn save: SIGKILL to every process while a checkpoint's files are being written; the partial
   checkpoint must never be chosen;
4. a resize 4 -> 2 ranks (one node), stopped by SIGTERM to all, and 5. back 2 -> 4 (two nodes), stopped by
6. Ctrl+C on node 0's terminal: SIGINT to its torchrun agent alone, which forwards it to its workers;
   every rank of both nodes must stop at the same step, and the newest checkpoint hold that step;

and compares every step with the reference: at 4 ranks the weights bit for bit and the loss within
`SAME_WORLD_RTOL`, within `RESIZE_RTOL` once the run has trained on another world size. Then the strategy
changes (refused before any process group, or continued through a universal copy), and a SLURM time limit
through submitit's local executor: its preemption signal, a checkpoint, the requeue and the resumed job. It
prints one table (scenario, strategy, steps redone, largest loss difference, wall time) and writes it into
`--doc` (docs/resume.md, between its cluster-check markers).

    python scripts/cluster_check.py                 # everything (make cluster-check)
    python scripts/cluster_check.py --strategies ddp --scenarios chain
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
#: At an equal world size the weights after every step equal the reference's bit for bit under DeepSpeed;
#: the loss a step reports may differ in its last float32 bit, because a vectorised sum's order depends on
#: the alignment of the memory a process happens to allocate (the gradients, computed apart, are
#: unaffected: the next step's weights are equal again). Under DDP the weights after a resume differ in
#: their last bits: DDP rebuilds its gradient buckets in gradient-ready order after each process's first
#: step, and a resumed process's first step still reduces in the initial layout, so the ring all-reduce adds
#: the ranks' gradients in another order for that step (with `find_unused_parameters=true`, which never
#: rebuilds, the digests match; measured). Across world sizes the gradient sums run in another order.
SAME_WORLD_RTOL = 1e-6
RESIZE_RTOL = 1e-4
STRATEGIES = {"ddp": "trainer=ddp", "zero2": "trainer=deepspeed_zero2", "zero3": "trainer=deepspeed_zero3"}
#: the run every launch shares: nano, one block, 8 sequences of 32 tokens a step as 2 per rank (4 ranks, or
#: 2 ranks accumulating 2), a checkpoint every 3 steps, the lr horizon and sample mapping pinned
STEPS = 18
CKPT_EVERY = 3
REFERENCE_STEPS = STEPS + 4
RUN = (
    "experiment=nano_cpu",
    "name=cluster",
    "model.n_layer=1",
    "data.seq_len=32",
    "data.val_samples=8",
    "global_batch_size=8",
    "micro_batch_size=2",
    f"trainer.max_steps={STEPS}",
    f"optim.decay_steps={STEPS}",
    f"data.num_samples={STEPS * 8}",
    "optim.warmup_steps=2",
    f"ckpt_every_n_steps={CKPT_EVERY}",
    "val_every_n_steps=null",
    "validate_at_start=false",
    "bucket_stats_every_n_steps=0",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_config=false",
    "export_final=false",
    "ckpt_path=auto",
)


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous endpoint of one launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_events(events_dir: Path) -> list[dict[str, Any]]:
    """Every event the probes wrote under `events_dir`, in time order."""
    events = []
    for f in sorted(events_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda e: e["time"])


@dataclass
class Launch:
    """One multi-node launch: a torchrun agent per simulated node, each in its own session."""

    tag: str
    procs: list[subprocess.Popen]
    logs: list[Path]
    events_dir: Path
    started: float = field(default_factory=time.time)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """This launch's events (of `kind` when given)."""
        found = [e for e in read_events(self.events_dir) if e["time"] >= self.started]
        return [e for e in found if kind is None or e["event"] == kind]

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll `check()` until it returns something true; raise naming `what` (and the logs' tails)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = check()
            if found:
                return found
            if all(p.poll() is not None for p in self.procs):
                found = check()
                if found:
                    return found
                raise RuntimeError(f"{self.tag}: every node exited before {what}\n{self.tails()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.tag}: no {what} within {timeout:.0f} s\n{self.tails()}")

    def wait_step(self, step: int, timeout: float = 300) -> int:
        """Wait until rank 0 has logged optimizer step `step` (or later); returns the newest step."""
        return self.wait_for(
            lambda: max((e["step"] for e in self.events("step") if e["step"] >= step), default=0),
            timeout,
            f"step {step}",
        )

    def worker_pids(self) -> list[int]:
        """The pids of this launch's live workers (of every torchrun restart), from their `start` events
        (a pid is taken only while it still runs train.py: pids are reused)."""
        pids = []
        for pid in sorted({e["pid"] for e in self.events("start")}):
            try:
                if b"train.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                continue
        return pids

    def signal_all(self, sig: signal.Signals) -> None:
        """Send `sig` to every process of every node, the agents and their workers, as SLURM does (torchrun
        starts each worker in a session of its own, so the agents' process groups do not hold them)."""
        groups = [p.pid for p in self.procs if p.poll() is None] + self.worker_pids()
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    def kill_rank(self, rank: int, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send `sig` to the worker of global rank `rank` (its pid from its newest `start` event)."""
        starts = [e for e in self.events("start") if e["rank"] == rank]
        pid = starts[-1]["pid"]
        os.kill(pid, sig)
        return pid

    def wait(self, timeout: float = 300) -> list[int]:
        """Wait for every node's agent to exit, then make sure no worker outlives it; returns the agents'
        exit codes (everything is killed after `timeout`)."""
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.signal_all(signal.SIGKILL)
                codes.append(p.wait())
        self.signal_all(signal.SIGKILL)  # a worker whose agent was killed would train on, orphaned
        return codes

    def tails(self, chars: int = 3000) -> str:
        """The end of every node's log, for an error message."""
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in self.logs if log.exists())


class Cluster:
    """Simulated nodes under `root`: `node<i>/` working directories sharing `shared/` (runs, cache)."""

    def __init__(self, root: Path, max_nodes: int = 2) -> None:
        self.root = root
        self.shared = root / "shared"
        self.events_dir = self.shared / "events"
        for sub in ("outputs", "multirun", "cache", "events"):
            (self.shared / sub).mkdir(parents=True, exist_ok=True)
        self.nodes = []
        for i in range(max_nodes):
            node = root / f"node{i}"
            node.mkdir(parents=True, exist_ok=True)
            for sub in ("outputs", "multirun"):
                link = node / sub
                if not link.exists():
                    link.symlink_to(self.shared / sub, target_is_directory=True)
            self.nodes.append(node)
        self.launches = 0
        self.all_launches: list[Launch] = []

    def env(self) -> dict[str, str]:
        """The environment of every node: offline, one thread per rank, the shared cache, the probe's import
        path, and none of this process's distributed variables."""
        drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in drop and not k.startswith(("TORCHELASTIC", "SLURM"))
        }
        paths = [str(ROOT / "scripts"), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            WANDB_MODE="offline",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",  # torchrun --max-restarts needs it (training/settings.py)
            MEMORYFORMER_CACHE=str(self.shared / "cache"),
            PYTHONPATH=os.pathsep.join(paths),
        )
        return env

    def launch(
        self,
        nodes: int,
        nproc: int,
        overrides: Iterable[str],
        max_restarts: int = 0,
        probe: Iterable[str] = (),
    ) -> Launch:
        """Start `nodes` torchrun agents of `nproc` workers each running train.py with `overrides`."""
        self.launches += 1
        tag = f"launch{self.launches}"
        port = free_port()
        args = [
            *overrides,
            f"trainer.devices={nproc}",
            f"trainer.num_nodes={nodes}",
            "+callbacks.cluster_probe._target_=cluster_probe.ClusterProbe",
            f"+callbacks.cluster_probe.events_dir={self.events_dir}",
            *probe,
        ]
        procs, logs = [], []
        for i in range(nodes):
            cmd = [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", str(nodes), "--nproc-per-node", str(nproc),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--max-restarts", str(max_restarts),
                str(TRAIN_PY), *args,
            ]  # fmt: skip
            log = self.root / f"{tag}.node{i}.log"
            with open(log, "w") as out:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=self.nodes[i],
                        env=self.env(),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            logs.append(log)
        launch = Launch(tag, procs, logs, self.events_dir)
        self.all_launches.append(launch)
        return launch

    def stop_everything(self) -> None:
        """Kill every process any launch of this cluster started (after a failed check, say)."""
        for launch in self.all_launches:
            launch.signal_all(signal.SIGKILL)


# --------------------------------------------------------------------------------------------- scenarios
@dataclass
class Row:
    """One line of the table: what was checked, how many steps were trained twice, the largest relative
    difference of a step's loss from the reference's (None where no step compares), the wall time, and
    whether every check of the scenario held (`problems` says which did not)."""

    scenario: str
    strategy: str
    redone: int | None
    max_rel_diff: float | None
    wall_s: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check held."""
        return not self.problems


def loss_diff(steps: list[dict[str, Any]], reference: dict[int, dict[str, Any]]) -> float | None:
    """The largest relative difference between each `step` event's loss and the reference's at its step."""
    diffs = [
        abs(e["loss"] - reference[e["step"]]["loss"]) / abs(reference[e["step"]]["loss"])
        for e in steps
        if e["step"] in reference
    ]
    return max(diffs) if diffs else None


def same_weights(
    problems: list[str], steps: list[dict[str, Any]], reference: dict[int, dict[str, Any]], strategy: str
) -> None:
    """At an equal world size: a problem for every step after which rank 0's weights differ from the
    reference's (DeepSpeed), and for losses further than `SAME_WORLD_RTOL` from the reference's (all)."""
    if strategy != "ddp":  # see SAME_WORLD_RTOL for why DDP's weights differ in their last bits
        differ = [e["step"] for e in steps if e["digest"] != reference[e["step"]]["digest"]]
        check(problems, not differ, f"weights differ from the reference's after steps {differ}")
    diff = loss_diff(steps, reference)
    check(problems, diff is not None and diff <= SAME_WORLD_RTOL, f"loss off the reference by {diff}")


def check(problems: list[str], ok: bool, what: str) -> None:
    """Record `what` as a problem unless `ok`."""
    if not ok:
        problems.append(what)


def starts_of(launch: Launch, ranks: int, after: float = 0.0, timeout: float = 300) -> list[dict[str, Any]]:
    """The `start` events of the `ranks` workers of `launch` that started after time `after` (waits for
    them). torchrun's restart count cannot tell a restarted group apart: a node restarts its workers without
    counting a restart when another node's worker failed."""

    def found() -> list[dict[str, Any]]:
        starts = [e for e in launch.events("start") if e["time"] > after]
        return starts if len({e["rank"] for e in starts}) == ranks else []

    return launch.wait_for(found, timeout, f"{ranks} ranks starting")


def agreed_start(problems: list[str], starts: list[dict[str, Any]], what: str) -> int:
    """The step every rank of `starts` resumed at; a problem unless all ranks resumed the same checkpoint."""
    steps, ckpts = {e["step"] for e in starts}, {e["ckpt"] for e in starts}
    check(
        problems, len(steps) == 1 and len(ckpts) == 1, f"{what}: ranks resumed {sorted(steps)} from {ckpts}"
    )
    return min(steps)


def run_reference(cluster: Cluster, strategy: str) -> tuple[dict[int, dict[str, Any]], float]:
    """The `step` event of every step of an uninterrupted 2 x 2 run (loss, weights digest), and its wall
    time."""
    t0 = time.time()
    steps_run = [f"trainer.max_steps={REFERENCE_STEPS}"]  # beyond the chain's, for the strategy changes
    launch = cluster.launch(2, 2, [*RUN, STRATEGIES[strategy], f"name=ref-{strategy}", *steps_run])
    codes = launch.wait(600)
    if any(codes):
        raise RuntimeError(f"the {strategy} reference run failed: {codes}\n{launch.tails()}")
    steps = {e["step"]: e for e in launch.events("step")}
    if sorted(steps) != list(range(1, REFERENCE_STEPS + 1)):
        raise RuntimeError(f"the {strategy} reference logged steps {sorted(steps)}\n{launch.tails()}")
    return steps, time.time() - t0


def run_chain(cluster: Cluster, strategy: str, reference: dict[int, dict[str, Any]]) -> list[Row]:
    """Preemption, a dead rank, a torn save and two resizes, one after another (see the module docstring)."""
    base = [*RUN, STRATEGIES[strategy], f"name=chain-{strategy}"]
    rows: list[Row] = []
    flag = cluster.root / f"slow-save-{strategy}"
    probe = [f"+callbacks.cluster_probe.slow_save_flag={flag}", "+callbacks.cluster_probe.slow_save_s=20"]

    # 1. preemption: SIGTERM to every process of both nodes
    t0 = time.time()
    first = cluster.launch(2, 2, base)
    first.wait_step(4)
    first.signal_all(signal.SIGTERM)
    first.wait(300)
    problems: list[str] = []
    stops = first.events("stop")
    check(
        problems, len({e["rank"] for e in stops}) == 4, f"{len(stops)} of 4 ranks stopped at a step: {stops}"
    )
    saved = max((e["step"] for e in stops), default=-1)
    check(problems, len({e["step"] for e in stops}) == 1, f"ranks stopped at different steps: {stops}")
    logged = max(e["step"] for e in first.events("step"))

    second = cluster.launch(2, 2, base, max_restarts=1, probe=probe)
    resumed = agreed_start(problems, starts_of(second, 4), "preemption")
    check(
        problems,
        resumed == saved,
        f"resumed at step {resumed}, not at the step saved on the signal ({saved})",
    )
    steps = first.events("step") + second.events("step")
    rows.append(
        Row("preemption (SIGTERM to all)", strategy, logged - resumed, None, time.time() - t0, problems)
    )

    # 2. a dead rank: SIGKILL one worker of node 1 mid-step; torchrun restarts the group
    t1 = time.time()
    problems = []
    second.wait_step(resumed + 2)
    flag.touch()  # from now on every save is slow: the restarted group's first one will be torn (3.)
    killed = time.time()
    second.kill_rank(3)
    before = [e for e in second.events("step") if e["time"] < killed]
    restart = starts_of(second, 4, after=killed)
    restarted = agreed_start(problems, restart, "dead rank")
    redone = max(e["step"] for e in before) - restarted
    check(
        problems, 0 <= redone <= CKPT_EVERY, f"{redone} steps redone after the restart (at most {CKPT_EVERY})"
    )
    rows[-1].max_rel_diff = loss_diff(steps + before, reference)
    same_weights(rows[-1].problems, steps + before, reference, strategy)

    # 3. a torn save: SIGKILL to every process while a checkpoint's files are being written
    began = max(e["time"] for e in restart)
    saves = lambda: [e for e in second.events("saving") if e["time"] > began]  # noqa: E731
    saving = second.wait_for(saves, 300, "a checkpoint save")[0]
    second.signal_all(signal.SIGKILL)
    second.wait(60)
    flag.unlink()
    after_restart = [e for e in second.events("step") if e["time"] > killed]
    same_weights(problems, after_restart, reference, strategy)
    rows.append(
        Row("dead rank (SIGKILL one worker)", strategy, redone, loss_diff(after_restart, reference),
            time.time() - t1, problems)
    )  # fmt: skip
    torn_step = saving["step"]

    # 4. resize 4 -> 2 (one node of two workers), from the checkpoint before the torn one
    t2 = time.time()
    problems = []
    third = cluster.launch(1, 2, base)
    resumed = agreed_start(problems, starts_of(third, 2), "resize 4->2")
    whole = max(restarted, torn_step - CKPT_EVERY)  # the newest save before the torn one
    check(problems, resumed == whole, f"resumed at {resumed}; the newest whole checkpoint is step {whole}")
    rows.append(
        Row("torn save (SIGKILL mid-save)", strategy, torn_step - resumed, None, time.time() - t2, problems)
    )
    problems = []
    third.wait_step(resumed + 2)
    third.signal_all(signal.SIGTERM)
    third.wait(300)
    stops = third.events("stop")
    saved = max((e["step"] for e in stops), default=-1)
    diff = loss_diff(third.events("step"), reference)
    check(problems, diff is not None and diff <= RESIZE_RTOL, f"loss off the reference by {diff}")
    rows.append(Row("resize 4 -> 2 ranks", strategy, 0, diff, time.time() - t2, problems))

    # 5. resize 2 -> 4, then 6. Ctrl+C on node 0's terminal: only its torchrun agent gets SIGINT (the workers
    # run in sessions of their own) and forwards it to its two workers; node 1 hears of it from them
    t3 = time.time()
    problems = []
    fourth = cluster.launch(2, 2, base)
    resumed = agreed_start(problems, starts_of(fourth, 4), "resize 2->4")
    check(problems, resumed == saved, f"resumed at {resumed}, saved at {saved}")
    fourth.wait_step(resumed + 2)
    os.killpg(fourth.procs[0].pid, signal.SIGINT)
    fourth.wait(300)
    diff = loss_diff(fourth.events("step"), reference)
    check(problems, diff is not None and diff <= RESIZE_RTOL, f"loss off the reference by {diff}")
    rows.append(Row("resize 2 -> 4 ranks", strategy, 0, diff, time.time() - t3, problems))
    t4 = time.time()
    problems = []
    stops = fourth.events("stop")
    check(problems, len({e["rank"] for e in stops}) == 4, f"{len(stops)} of 4 ranks stopped: {stops}")
    check(problems, {e["exception"] for e in stops} == {"SIGTERMException"}, f"stops: {stops}")
    saved = max((e["step"] for e in stops), default=-1)
    check(problems, len({e["step"] for e in stops}) == 1, f"ranks stopped at different steps: {stops}")
    newest = saved_step(cluster.shared / "outputs" / f"chain-{strategy}")
    check(problems, newest == saved, f"the newest checkpoint holds step {newest}, not the stop's {saved}")
    logged = max(e["step"] for e in fourth.events("step"))
    rows.append(Row("Ctrl+C on node 0's terminal", strategy, logged - saved, None, time.time() - t4,
                    problems))  # fmt: skip
    return rows


def saved_step(runs: Path) -> int | None:
    """The optimizer step stored in the newest `last.ckpt` under `runs` (a file or a DeepSpeed folder)."""
    import torch

    from memoryformer.checkpoint import deepspeed_layout

    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    if found[-1].is_dir():
        return int(deepspeed_layout(found[-1]).states["global_step"])
    return int(torch.load(found[-1], map_location="cpu", weights_only=False, mmap=True)["global_step"])


def refused_before_any_process_group(problems: list[str], launch: Launch, fragment: str) -> None:
    """A problem unless `launch` exited with status 2 and one sentence containing `fragment`, before any rank
    started a process group (Lightning and DeepSpeed log that they do)."""
    codes = launch.wait(300)
    text = "\n".join(log.read_text() for log in launch.logs)
    started = "nitializing distributed" in text or "nitializing deepspeed distributed" in text
    check(problems, not started, "a process group started before the refusal")
    check(problems, fragment in text, f"no refusal saying {fragment!r}")
    check(problems, all(c != 0 for c in codes) and "error: " in text, f"exit codes {codes}")


def run_strategy_changes(cluster: Cluster, zero2_reference: dict[int, dict[str, Any]]) -> list[Row]:
    """Continue the chains with another strategy: a Lightning `.ckpt` (DDP or one device) into ZeRO-2 and a
    ZeRO-2 folder into one device are refused before any process group starts; ZeRO-2 -> ZeRO-3 and back
    continue through a universal copy and must follow the ZeRO-2 reference (`zero2_reference`)."""
    rows: list[Row] = []
    extend = lambda steps: [f"trainer.max_steps={steps}"]  # noqa: E731 (lr horizon and mapping stay pinned)

    t0 = time.time()
    problems: list[str] = []
    launch = cluster.launch(1, 2, [*RUN, STRATEGIES["zero2"], "name=chain-ddp", *extend(STEPS + 2)])
    refused_before_any_process_group(
        problems, launch, "is a Lightning .ckpt file and this run uses DeepSpeed"
    )
    rows.append(
        Row("DDP / 1-device .ckpt -> ZeRO-2 (refused)", "ddp", None, None, time.time() - t0, problems)
    )

    t0 = time.time()
    problems = []
    one = [*RUN, "trainer=cpu", "name=chain-zero2", *extend(STEPS + 2)]
    launch = cluster.launch(1, 1, one)
    refused_before_any_process_group(problems, launch, "is a DeepSpeed ZeRO-2 checkpoint and this run uses a")
    rows.append(Row("ZeRO-2 -> 1 device (refused)", "zero2", None, None, time.time() - t0, problems))

    # the ZeRO-2 chain stopped on Ctrl+C before STEPS: on to STEPS under ZeRO-3, then on to REFERENCE_STEPS
    # under ZeRO-2 again, each compared with the ZeRO-2 reference's steps
    reference = zero2_reference
    for target, until in (("zero3", STEPS), ("zero2", REFERENCE_STEPS)):
        t0 = time.time()
        problems = []
        before = saved_step(cluster.shared / "outputs" / "chain-zero2")
        launch = cluster.launch(1, 2, [*RUN, STRATEGIES[target], "name=chain-zero2", *extend(until)])
        resumed = agreed_start(problems, starts_of(launch, 2), f"-> {target}")
        codes = launch.wait(300)
        check(problems, resumed == before, f"resumed at {resumed}, the newest checkpoint holds {before}")
        final = max((e["step"] for e in launch.events("step")), default=-1)
        check(problems, codes == [0] and final == until, f"ended at {final}, exit codes {codes}")
        diff = loss_diff(launch.events("step"), reference)
        check(problems, diff is not None and diff <= RESIZE_RTOL, f"loss off the reference by {diff}")
        name = "ZeRO-2 -> ZeRO-3 (converted)" if target == "zero3" else "ZeRO-3 -> ZeRO-2 (converted)"
        rows.append(Row(name, "zero2", 0, diff, time.time() - t0, problems))
    return rows


def run_slurm_requeue(cluster: Cluster) -> Row:
    """A time limit as SLURM and submitit handle it, through submitit's local executor: the job gets
    submitit's preemption signal (SIGUSR2) mid-training, must save, be requeued by submitit's own handler
    (checkpoint, then `_requeue`), and the requeued job must resume at the saved step and finish."""
    t0 = time.time()
    problems: list[str] = []
    sweep = cluster.shared / "multirun" / "slurm-requeue"
    events = cluster.shared / "events-slurm"
    cmd = [
        sys.executable, str(TRAIN_PY), "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}", *RUN, "trainer=cpu", "name=slurm-requeue",
        "+callbacks.cluster_probe._target_=cluster_probe.ClusterProbe",
        f"+callbacks.cluster_probe.events_dir={events}",
    ]  # fmt: skip
    log = cluster.root / "slurm-requeue.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cluster.nodes[0], env=cluster.env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    job = Launch("slurm-requeue", [proc], [log], events)
    cluster.all_launches.append(job)
    job.wait_step(4)
    (first,) = job.events("start")
    os.kill(first["pid"], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the limit (--signal=USR2@)
    second = job.wait_for(
        lambda: [e for e in job.events("start") if e["pid"] != first["pid"]], 300, "the requeue"
    )
    code = proc.wait(timeout=300)
    stops = job.events("stop")
    saved = stops[0]["step"] if stops else None
    check(problems, [e["exception"] for e in stops] == ["SIGTERMException"], f"stops: {stops}")
    check(
        problems,
        second[0]["step"] == saved,
        f"the requeued job resumed at {second[0]['step']}, saved {saved}",
    )
    final = max(e["step"] for e in job.events("step"))
    check(problems, code == 0 and final == STEPS, f"exit code {code}, last step {final}")
    submitit_logs = "".join(p.read_text() for p in sweep.rglob("*_log.*"))
    check(problems, "Requeued job" in submitit_logs, "submitit did not requeue the job")
    redone = max(e["step"] for e in job.events("step") if e["time"] < second[0]["time"]) - second[0]["step"]
    return Row("SLURM time limit (submitit, requeue)", "1 process", redone, None, time.time() - t0, problems)


# ------------------------------------------------------------------------------------------------- report
TABLE_BEGIN = "<!-- cluster-check table: written by `make cluster-check` (scripts/cluster_check.py) -->"
TABLE_END = "<!-- end of cluster-check table -->"


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| scenario | strategy | steps redone | largest loss difference (relative) | wall time | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = "" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}"
        redone = "" if r.redone is None else str(r.redone)
        result = "ok" if r.ok else "FAILED: " + "; ".join(r.problems)
        lines.append(f"| {r.scenario} | {r.strategy} | {redone} | {diff} | {r.wall_s:.0f} s | {result} |")
    return "\n".join(lines)


def write_table(doc: Path, table: str, header: str) -> None:
    """Replace the block between `TABLE_BEGIN` and `TABLE_END` in `doc` with `header` and `table`."""
    text = doc.read_text()
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{doc} has no cluster-check table markers ({TABLE_BEGIN!r} ... {TABLE_END!r}).")
    head, rest = text.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    doc.write_text(f"{head}{TABLE_BEGIN}\n{header}\n\n{table}\n{TABLE_END}{tail}")


def run_all(root: Path, strategies: list[str], scenarios: list[str]) -> list[Row]:
    """Every scenario asked for, on a fresh cluster under `root`; see the module docstring."""
    cluster = Cluster(root)
    rows: list[Row] = []
    try:
        references = {}
        if "chain" in scenarios:
            for strategy in strategies:
                references[strategy], wall = run_reference(cluster, strategy)
                rows.append(Row("uninterrupted reference (2 nodes x 2)", strategy, None, None, wall))
                rows += run_chain(cluster, strategy, references[strategy])
        if "strategy-change" in scenarios:
            if not ("chain" in scenarios and {"ddp", "zero2"} <= set(strategies)):
                raise SystemExit(
                    "--scenarios strategy-change continues the ddp and zero2 chains: run them too."
                )
            rows += run_strategy_changes(cluster, references["zero2"])
        if "slurm" in scenarios:
            rows.append(run_slurm_requeue(cluster))
    finally:
        cluster.stop_everything()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the table, write it into `--doc`; exit status 1 if any check failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument(
        "--scenarios", nargs="+", default=["chain", "strategy-change", "slurm"],
        choices=["chain", "strategy-change", "slurm"],
    )  # fmt: skip
    parser.add_argument(
        "--root", type=Path, help="where the simulated nodes live (default: a temporary folder)"
    )
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "resume.md", help="the doc to write into")
    parser.add_argument("--no-doc", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    t0 = time.time()
    root = args.root or Path(tempfile.mkdtemp(prefix="cluster-check-"))
    rows = run_all(root, args.strategies, args.scenarios)
    if args.root is None and all(r.ok for r in rows):
        shutil.rmtree(root, ignore_errors=True)
    elif not all(r.ok for r in rows):
        print(f"the nodes' logs and events are kept in {root}")
    table = format_table(rows)
    print(table)
    if not args.no_doc:
        header = (
            f"`make cluster-check` on {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}, "
            f"{time.time() - t0:.0f} s in all (torch {_version('torch')}, lightning {_version('lightning')}, "
            f"deepspeed {_version('deepspeed')}):"
        )
        write_table(args.doc, table, header)
    return 0 if all(r.ok for r in rows) else 1


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
