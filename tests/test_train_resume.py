"""`ckpt_path=last|auto|FILE` resumes only the run it belongs to (docs/resume.md).

Fast tests compose real configs and compare fingerprints, or search folders of small checkpoints written
here; the slow ones train the `smoke` experiment for real: the two commands of issue 23 (a second run with
another lr, seed and step budget must not continue the first), extending a run, and a two-job multirun
killed and relaunched with `ckpt_path=auto`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import tiny_model  # noqa: E402

from memoryformer.conf_schema import register_configs  # noqa: E402
from memoryformer.config import ConfigError  # noqa: E402
from memoryformer.training.resume import (
    CHECKPOINT_KEY,
    NOT_COUNTED,
    describe,
    differences,
    fingerprint_record,
    resolve_ckpt_path,  # noqa: E402
    run_fingerprint,
)
from memoryformer.training.settings import typed_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _cfg(*overrides: str, out: str = "/tmp/mf-resume-unused"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", f"paths.output_dir={out}", *overrides])


def _fingerprint(*overrides: str, max_steps: int = 8) -> dict:
    return run_fingerprint(typed_config(_cfg(*overrides)), max_steps)


# ------------------------------------------------------------------------------------------- what counts
def test_settings_that_keep_the_math_leave_the_fingerprint_unchanged() -> None:
    base = _fingerprint()
    same = [
        ("trainer.devices=2", "trainer.accumulate_grad_batches=2"),  # 2 x 2 x micro 1 = the global batch 4
        ("trainer.num_nodes=2", "trainer.precision=bf16-mixed", "trainer=ddp"),
        ("val_every_n_steps=2", "ckpt_every_n_steps=1", "keep_last_k=5", "trainer.log_every_n_steps=5"),
        ("logger=none", "name=renamed", "paths.runs_root=/elsewhere", "print_config=true"),
        ("export_final=false", "trainer.enable_progress_bar=true", "trainer.deterministic=true"),
        ("compile=true", "activation_checkpointing=true", "optim.fused=false", "model.memory_impl=torch"),
        ("data.val_samples=4", "data.cache_dir=/tmp/other-cache", "data.num_workers=2", "ckpt_path=auto"),
        ("resume_mismatch=allow", "trust_checkpoint=true", "bucket_stats_every_n_steps=0"),
    ]
    for overrides in same:
        assert differences(base, _fingerprint(*overrides)) == [], overrides


def test_settings_that_define_the_run_change_the_fingerprint() -> None:
    base = _fingerprint()
    for override, key, there, here in (
        ("optim.lr=1e-3", "optim.lr", 3e-3, 1e-3),
        ("seed=7", "seed", 1234, 7),
        ("global_batch_size=8", "global_batch_size", 4, 8),
        ("model.n_layer=2", "model.n_layer", 1, 2),
        ("data.seq_len=16", "data.seq_len", 32, 16),
        ("data.seed=1", "data.seed", 1234, 1),
        ("optim.warmup_ratio=0.1", "optim.warmup_ratio", 0.01, 0.1),
        ("data.val_fraction=0.05", "data.val_fraction", 0.01, 0.05),
    ):
        diffs = differences(base, _fingerprint(override))
        assert (key, there, here) in diffs, (override, diffs)
    # a streaming source's document shards follow its workers: there num_workers counts
    files = ("data.source=files", f"data.files=[{ROOT / 'README.md'}]",
             f"data.tokenizer={ROOT / 'tests' / 'fixtures' / 'data' / 'tokenizer.json'}")
    diffs = differences(_fingerprint(*files), _fingerprint(*files, "data.num_workers=2"))
    assert diffs == [("data.num_workers", 0, 2)]


def test_a_longer_budget_extends_a_run_only_with_its_horizon_and_mapping_pinned() -> None:
    # optim.decay_steps null: trainer.max_steps is the lr horizon (and sizes the sample mapping)
    short, longer = _fingerprint(max_steps=20), _fingerprint(max_steps=40)
    assert differences(short, longer) == [("schedule_horizon", 20, 40), ("data.num_samples", 80, 160)]
    text = describe(differences(short, longer))
    assert text.endswith("to extend that run, pass optim.decay_steps=20 data.num_samples=80)"), text
    pinned = ("optim.decay_steps=20", "data.num_samples=80")
    assert differences(short, _fingerprint(*pinned, max_steps=40)) == []
    # max_tokens gives the same budget as the equivalent trainer.max_steps (4 x 32 tokens per step)
    from memoryformer.training.settings import check_config

    by_tokens = _cfg("max_tokens=2560", "logger=none")
    plan = check_config(by_tokens)
    assert plan.max_steps == 20
    assert differences(short, run_fingerprint(plan.config, plan.max_steps)) == []


def test_differences_read_as_in_the_issue() -> None:
    there = {"optim.lr": 1e-3, "seed": 1234, "model.n_layer": 1}
    here = {"optim.lr": 3e-3, "seed": 7, "model.n_layer": 1, "optim.new_key": 2}
    assert describe(differences(there, here)) == (
        "optim.lr=0.001 there, 0.003 here; optim.new_key=<unset> there, 2 here; seed=1234 there, 7 here"
    )


def test_not_counted_is_one_flat_list_of_dotted_keys() -> None:
    assert len(set(NOT_COUNTED)) == len(NOT_COUNTED)
    assert all(re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key) for key in NOT_COUNTED)


# ---------------------------------------------------------------------------------- which one is resumed
def _write(path: Path, record: dict | None, step: int = 4, age_s: float = 0.0) -> Path:
    model = tiny_model()
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "global_step": step,
        "hyper_parameters": {"model": model.config.to_dict()},
    }
    if record is not None:
        ckpt[CHECKPOINT_KEY] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def _record(*overrides: str, max_steps: int = 8, world: int = 1) -> dict:
    return fingerprint_record(typed_config(_cfg(*overrides)), max_steps, world)


def test_search_skips_other_runs_with_their_differences_and_takes_this_runs_checkpoint(tmp_path, caplog):
    here = _record("optim.lr=3e-3", "seed=7")
    runs = tmp_path / "runs"
    for name in ("last.ckpt", "step-00000004.ckpt"):  # another run, newer: one line for its folder
        _write(runs / "a" / "checkpoints" / name, _record("optim.lr=1e-3"), age_s=10)
    _write(runs / "old" / "checkpoints" / "last.ckpt", None, age_s=20)  # saved before fingerprints
    ours = _write(runs / "b" / "checkpoints" / "last.ckpt", here, step=6, age_s=100)
    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("last", runs, runs / "c", tiny_model().config, record=here) == str(ours)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"ckpt_path=last: skipping {runs / 'a'} (optim.lr=0.001 there, 0.003 here; seed=1234 there, 7 here)",
        f"ckpt_path=last: skipping {runs / 'old'} (it records no run fingerprint: it was saved before "
        f"memoryformer compared run settings)",
        f"Resuming from {ours} (step 6)",
    ]


def test_own_folder_comes_first_and_other_jobs_of_the_sweep_are_never_taken(tmp_path, caplog):
    here = _record()
    sweep = tmp_path / "sweep"
    newer = _write(sweep / "1" / "checkpoints" / "last.ckpt", here, step=8)  # a twin job of this sweep
    model = tiny_model().config
    assert resolve_ckpt_path("auto", sweep, sweep / "0", model, record=here, sweep_dir=sweep) is None
    assert f"skipping {sweep / '1'} (another job of this sweep)" in caplog.text
    assert "ckpt_path=auto: no checkpoint of this run under" in caplog.text
    own = _write(sweep / "0" / "checkpoints" / "last.ckpt", here, step=2, age_s=50)  # older than `newer`
    found = resolve_ckpt_path("auto", tmp_path, sweep / "0", tiny_model().config, record=here)
    assert found == str(own) and newer.exists()


def test_a_sweep_relaunched_into_a_new_time_folder_finds_each_jobs_earlier_checkpoint(tmp_path):
    """The default layout multirun/<name>/<time>/<job>: the relaunch runs in a new time folder, and each job
    takes the earlier sweep's checkpoint with its own settings, not the other job's newer one."""
    model = tiny_model().config
    old, new = tmp_path / "multirun" / "smoke" / "t1", tmp_path / "multirun" / "smoke" / "t2"
    job0 = _write(old / "0" / "checkpoints" / "last.ckpt", _record("optim.lr=1e-3"), step=8, age_s=100)
    job1 = _write(old / "1" / "checkpoints" / "last.ckpt", _record("optim.lr=3e-3"), step=3)
    roots = [tmp_path / "outputs" / "smoke", tmp_path / "multirun" / "smoke"]
    for job, lr, expected in ((0, "1e-3", job0), (1, "3e-3", job1)):
        here = _record(f"optim.lr={lr}")
        found = resolve_ckpt_path("auto", roots, new / str(job), model, record=here, sweep_dir=new)
        assert found == str(expected)


def test_last_without_a_match_warns_naming_what_it_skipped(tmp_path, recwarn):
    _write(tmp_path / "a" / "checkpoints" / "last.ckpt", _record("seed=1"))
    assert resolve_ckpt_path("last", tmp_path, None, tiny_model().config, record=_record()) is None
    (msg,) = [str(w.message) for w in recwarn.list]
    assert msg.startswith(f"ckpt_path=last found no checkpoint of this run under {tmp_path}; starting from")
    assert msg.endswith(f"; skipped {tmp_path / 'a'}: seed=1 there, 1234 here.") and "\n" not in msg


def test_an_explicit_checkpoint_of_other_settings_is_refused_unless_allowed(tmp_path, recwarn):
    path = _write(tmp_path / "a.ckpt", _record("optim.lr=1e-3"))
    here = _record()
    with pytest.raises(ConfigError) as err:
        resolve_ckpt_path(str(path), tmp_path, None, tiny_model().config, record=here)
    msg = str(err.value)
    assert msg.startswith(f"ckpt_path={path} was saved by a run with other settings (optim.lr=0.001 there, ")
    assert "pass resume_mismatch=allow" in msg and "\n" not in msg
    allowed = resolve_ckpt_path(str(path), tmp_path, None, tiny_model().config, record=here, mismatch="allow")
    assert allowed == str(path)
    assert any("resume_mismatch=allow: resuming" in str(w.message) for w in recwarn.list)
    old = _write(tmp_path / "old.ckpt", None)
    with pytest.raises(ConfigError, match="records no run fingerprint"):
        resolve_ckpt_path(str(old), tmp_path, None, tiny_model().config, record=here)


def _write_zero(
    path: Path, record: dict, stage: int, world: int, step: int, skip: tuple[str, ...] = ()
) -> Path:
    """A DeepSpeed checkpoint directory named as DeepSpeed 0.19 names its files (`runtime/engine.py`,
    `_get_ckpt_name`): ZeRO 1-2 write one `mp_rank_00_model_states.pt`, ZeRO-3 one
    `zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank; both one `*zero_pp_rank_{r}_*optim_states.pt` per
    rank. The client state (Lightning's checkpoint dict) sits in rank 0's model states. `skip` names files
    left out, as a save killed midway would."""
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    states = {
        "dp_world_size": world, "global_step": step, CHECKPOINT_KEY: record,
        "ds_config": {"zero_optimization": {"stage": stage}},
    }
    files = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    files += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3 else [
        "mp_rank_00_model_states.pt"
    ]
    for name in files:
        if name not in skip:
            torch.save(states if "model_states" in name else {"optimizer_state_dict": {}}, tag / name)
    return path


def test_zero3_directories_are_recognised_and_a_torn_one_is_never_chosen(tmp_path, caplog):
    """ZeRO-3 names its model states per rank (no `mp_rank_00_model_states.pt`): such a directory resumes; one
    that lacks a rank's file (a save killed midway) is skipped, and the older whole one is taken."""
    here = _record("trainer=deepspeed_zero3", world=2)
    ckpts = tmp_path / "run" / "checkpoints"
    whole = _write_zero(ckpts / "step-00000004.ckpt", here, stage=3, world=2, step=4)
    model = tiny_model().config
    assert resolve_ckpt_path("auto", tmp_path, tmp_path / "run", model, record=here) == str(whole)
    lost = ("zero_pp_rank_1_mp_rank_00_model_states.pt",)
    torn = _write_zero(ckpts / "last.ckpt", here, stage=3, world=2, step=6, skip=lost)
    with caplog.at_level("INFO"):
        assert resolve_ckpt_path("auto", tmp_path, tmp_path / "run", model, record=here) == str(whole)
    assert f"skipping {torn}: {torn / 'checkpoint'} lacks {lost[0]}" in caplog.text


def test_the_highest_stored_step_wins_whatever_the_folder_times(tmp_path):
    """DeepSpeed rewrites `last.ckpt/` in place, so the folder keeps the time of its first save: a step-6
    folder written later must not win over the step-8 `last.ckpt` (nor an older `.ckpt` file over a newer
    step)."""
    here = _record("trainer=deepspeed_zero2", world=1)
    ckpts = tmp_path / "run" / "checkpoints"
    last = _write_zero(ckpts / "last.ckpt", here, stage=2, world=1, step=8)
    os.utime(last, (time.time() - 100, time.time() - 100))
    _write_zero(ckpts / "step-00000006.ckpt", here, stage=2, world=1, step=6)
    model = tiny_model().config
    assert resolve_ckpt_path("last", tmp_path, tmp_path / "run", model, record=here) == str(last)
    files, here = tmp_path / "files" / "checkpoints", _record()
    newest = _write(files / "last.ckpt", here, step=12, age_s=100)
    _write(files / "step-00000010.ckpt", here, step=10)
    found = resolve_ckpt_path("last", tmp_path / "files", tmp_path / "files", model, record=here)
    assert found == str(newest)


def test_a_change_between_deepspeed_and_lightning_checkpoints_is_refused_naming_the_trainer(tmp_path):
    """A ZeRO folder and a Lightning `.ckpt` hold optimizer state in formats the other strategy cannot read:
    the run stops before any process group with one sentence naming the trainer it was saved with, for an
    explicit path and for a search (which never skips the run's own state)."""
    zero = _write_zero(tmp_path / "a" / "checkpoints" / "last.ckpt", _record(), stage=2, world=2, step=4)
    for ckpt_path in (str(zero), "auto"):
        with pytest.raises(ConfigError) as err:
            resolve_ckpt_path(ckpt_path, tmp_path / "a", None, tiny_model().config, record=_record())
        msg = str(err.value)
        assert "is a DeepSpeed ZeRO-2 checkpoint and this run uses a strategy without DeepSpeed" in msg
        assert "resume it with trainer=deepspeed_zero2" in msg and "\n" not in msg
    plain = _write(tmp_path / "b" / "checkpoints" / "last.ckpt", _record(), step=4)
    ds = _record("trainer=deepspeed_zero3")
    with pytest.raises(ConfigError, match="is a Lightning .ckpt file and this run uses DeepSpeed ZeRO-3"):
        resolve_ckpt_path(str(plain), tmp_path / "b", None, tiny_model().config, record=ds)
    # the same strategy and world size resume it as it is
    same = _record("trainer=deepspeed_zero2", world=2)
    assert resolve_ckpt_path(str(zero), tmp_path, None, tiny_model().config, record=same) == str(zero)


# ------------------------------------------------------------------------------------- real training runs
def _train_cfg(out: Path, runs: Path, *overrides: str):
    common = ("logger=none", "export_final=false", "val_every_n_steps=null", "trainer.limit_val_batches=0")
    return _cfg(f"paths.runs_root={runs}", *common, *overrides, out=str(out))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_the_issues_two_commands_leave_run_a_untouched_and_start_run_b_fresh(tmp_path, caplog, recwarn):
    from memoryformer.training.module import LMTrainingModule
    from memoryformer.training.run import train

    runs = tmp_path / "R"
    train(_train_cfg(runs / "a", runs, "trainer.max_steps=4", "optim.lr=1e-3"))
    before = _snapshot(runs / "a")
    starts = []
    original = LMTrainingModule.on_train_start

    def record_start(self):
        starts.append(self.trainer.global_step)
        original(self)

    LMTrainingModule.on_train_start = record_start
    try:
        with caplog.at_level("INFO"):
            run_b = ("trainer.max_steps=8", "optim.lr=3e-3", "seed=7", "ckpt_path=last")
            summary = train(_train_cfg(runs / "b", runs, *run_b))
        assert starts == [0] and summary["step"] == 8  # run b trained from scratch
        assert _snapshot(runs / "a") == before  # and never touched run a
        skip = (
            f"ckpt_path=last: skipping {runs / 'a'} (schedule_horizon=4 there, 8 here; data.num_samples=16 "
            f"there, 32 here; optim.lr=0.001 there, 0.003 here; seed=1234 there, 7 here ("
        )
        assert skip in caplog.text, caplog.text
        assert "Resuming from" not in caplog.text
        (warned,) = [str(w.message) for w in recwarn.list if "ckpt_path=last" in str(w.message)]
        assert f"skipped {runs / 'a'}: schedule_horizon=4 there, 8 here;" in warned

        # extending run a: a longer trainer.max_steps with its horizon and sample mapping pinned
        caplog.clear()
        starts.clear()
        with caplog.at_level("INFO"):
            summary = train(
                _train_cfg(
                    runs / "c", runs, "trainer.max_steps=6", "optim.lr=1e-3", "optim.decay_steps=4",
                    "data.num_samples=16", "ckpt_path=last",
                )
            )
        assert starts == [4] and summary["step"] == 6
        assert (
            f"Resuming from {runs / 'a' / 'checkpoints' / 'last.ckpt'} (step 4); extending the run from "
            f"trainer.max_steps=4 to 6; the lr schedule keeps its horizon of 4 steps and stays at its "
            f"minimum after it"
        ) in caplog.text
        assert _snapshot(runs / "a") == before
    finally:
        LMTrainingModule.on_train_start = original


def _multirun(sweep: Path, runs: Path, max_steps: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable, "train.py", "-m", "experiment=smoke", "logger=none", "export_final=false",
        "model.n_layer=1", f"trainer.max_steps={max_steps}", "optim.decay_steps=12", "data.num_samples=48",
        "val_every_n_steps=null", "trainer.limit_val_batches=0", "ckpt_every_n_steps=1",
        "optim.lr=1e-3,3e-3", "ckpt_path=auto", f"hydra.sweep.dir={sweep}", f"paths.runs_root={runs}",
    ]
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=pipe, stderr=subprocess.STDOUT, text=True)


def _step_and_lr(ckpt: Path) -> tuple[int, float]:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    return int(saved["global_step"]), float(saved["hyper_parameters"]["optim"]["lr"])


@pytest.mark.slow
def test_a_killed_multirun_relaunched_with_auto_resumes_each_job_from_its_own_checkpoint(tmp_path):
    """Job 0 (lr 1e-3) finishes, job 1 (lr 3e-3) is SIGKILLed after its first checkpoints; the relaunched
    sweep finds both jobs' checkpoints under the same runs_root, and each job resumes its own."""
    sweep, runs = tmp_path / "sweep", tmp_path
    proc = _multirun(sweep, runs, max_steps=10)
    job1 = sweep / "1" / "checkpoints"
    deadline = time.time() + 300
    while not (job1 / "last.ckpt").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step0, lr0 = _step_and_lr(sweep / "0" / "checkpoints" / "last.ckpt")
    step1, lr1 = _step_and_lr(job1 / "last.ckpt")
    assert (step0, lr0) == (10, 1e-3) and lr1 == 3e-3 and 0 < step1 < 10

    relaunched = _multirun(sweep, runs, max_steps=12)
    out, _ = relaunched.communicate(timeout=600)
    assert relaunched.returncode == 0, out[-3000:]
    resumed = re.findall(r"Resuming from (\S+) \(step (\d+)\)", out)
    assert resumed == [
        (str(sweep / "0" / "checkpoints" / "last.ckpt"), "10"),
        (str(job1 / "last.ckpt"), str(step1)),
    ], out[-3000:]
    assert _step_and_lr(sweep / "0" / "checkpoints" / "last.ckpt") == (12, 1e-3)
    assert _step_and_lr(job1 / "last.ckpt") == (12, 3e-3)


def test_a_resumed_run_keeps_the_csv_rows_of_the_steps_before_its_checkpoint(tmp_path):
    """Lightning's CSV logger deletes `metrics.csv` in a non-empty folder; ours keeps the rows before the
    first step the resumed run logs, and replaces those it logs again (steps redone after a dead rank)."""
    from memoryformer.training.run import CSVLogger

    first = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(8):
        first.log_metrics({"train/loss": 10.0 - step}, step=step)
    first.save()
    resumed = CSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6, 9):
        resumed.log_metrics({"train/loss": 1.0 * step, "train/grad_norm": 0.5}, step=step)
    resumed.save()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(9))
    assert [float(r["train/loss"]) for r in rows] == [10.0 - s for s in range(6)] + [6.0, 7.0, 8.0]
    assert [r["train/grad_norm"] for r in rows[5:]] == ["", "0.5", "0.5", "0.5"]


def test_a_resume_with_another_accumulation_steps_on_whole_global_batches(tmp_path, monkeypatch):
    """A run saved at step 3 with 1 micro-batch of 4 per step, resumed with 2 micro-batches of 2 (what a
    resize to half the ranks does): Lightning counts micro-batches, so without rescaling its counters the
    first step after the resume took one micro-batch, half the global batch. Each resumed step must take
    2 micro-batches, and the run end on the samples an uninterrupted run ends on."""
    import lightning as L

    from memoryformer.training import run as run_module

    class MicroBatchesPerStep(L.Callback):
        def __init__(self) -> None:
            self.counts, self.n, self.last = [], 0, None

        def on_train_start(self, trainer, pl_module) -> None:
            self.last = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.n += 1
            if trainer.global_step != self.last:
                self.counts.append(self.n)
                self.n, self.last = 0, trainer.global_step

    probe = MicroBatchesPerStep()
    pinned = ("optim.decay_steps=5", "data.num_samples=20", "ckpt_every_n_steps=null", "logger=none",
              "export_final=false", "val_every_n_steps=null", "trainer.limit_val_batches=0")
    run_module.train(_cfg(f"paths.runs_root={tmp_path / 'a'}", "trainer.max_steps=3", "micro_batch_size=4",
                          *pinned, out=str(tmp_path / "a")))
    build = run_module.build_callbacks
    monkeypatch.setattr(run_module, "build_callbacks", lambda plan: [*build(plan), probe])
    resumed = run_module.train(_cfg(f"paths.runs_root={tmp_path / 'a'}", "trainer.max_steps=5",
                                    "micro_batch_size=2", "ckpt_path=last", *pinned, out=str(tmp_path / "b")))
    assert resumed["step"] == 5 and probe.counts == [2, 2], probe.counts
    state = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["LMDataModule"]["consumed_samples"] == 5 * 4, state["LMDataModule"]
