"""End-to-end training on CPU: smoke fit, logged keys, checkpoint format, exact resume, NaN stop, W&B offline.

All runs use `experiment=smoke` (a 1-layer nano MemoryFormer on the bundled corpus, a handful of steps).
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from memoryformer.conf_schema import register_configs
from memoryformer.nn.bucket_usage import bucket_counts, bucket_usage
from memoryformer.training.module import NonFiniteLossError
from memoryformer.training.run import train

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "experiment=smoke",
                f"paths.output_dir={out}",
                f"paths.runs_root={out.parent}",
                *overrides,
            ],
        )


def _train_losses(out: Path) -> dict[int, float]:
    """Step -> train/loss from the CSV logger (logged every step in the smoke experiment)."""
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").read_text().splitlines()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "full"
    summary = train(_cfg(out))
    return out, summary


def test_smoke_run_trains_logs_and_checkpoints(smoke_run: tuple[Path, dict]) -> None:
    out, summary = smoke_run
    assert summary["step"] == 8
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step-00000004.ckpt", "step-00000008.ckpt"]
    assert (out / "checkpoints" / "config.yaml").is_file()
    header = next(csv.reader((out / "csv" / "metrics.csv").read_text().splitlines()))
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "train/tokens_per_s",
        "train/tflops",
        "val/loss",
        "buckets/used_min",
        "hash/weight_mean",
        "buckets/blocks.0.attn.qkv/used_min",
        "buckets/blocks.0.ffn.layer2/used_mean",
    ):
        assert key in header, key
    lines = (out / "csv" / "metrics.csv").read_text().splitlines()
    rows = [r for r in csv.DictReader(lines) if r.get("train/tokens_seen")]
    # 4 sequences x 32 tokens per step (smoke experiment)
    assert float(rows[-1]["train/tokens_seen"]) == 8 * 4 * 32
    losses = _train_losses(out)
    # a fresh nano model predicts ~uniformly over 4096 ids: first loss ~ ln 4096 = 8.318
    assert abs(losses[min(losses)] - math.log(4096)) < 0.3


def test_checkpoint_is_loadable_by_the_evaluation_loader(smoke_run: tuple[Path, dict]) -> None:
    from memoryformer.checkpoint import load_model

    out, summary = smoke_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["model"]["n_layer"] == 1
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    assert Path(ckpt["hyper_parameters"]["tokenizer_path"]).is_file()
    model, tok = load_model(out / "checkpoints" / "last.ckpt")
    exported, tok2 = load_model(summary["export_dir"])
    x = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x)[0], exported(x)[0])
    assert tok is not None and tok2 is not None


def test_token_count_is_saved_in_the_checkpoint(smoke_run: tuple[Path, dict]) -> None:
    # Lightning keys callback state by class name; a resumed run continues the token count from here.
    out, _ = smoke_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["callbacks"]["TokenThroughputMonitor"] == {"tokens_seen": 8 * 4 * 32}


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(smoke_run: tuple[Path, dict], tmp_path: Path) -> None:
    full, _ = smoke_run
    resumed = tmp_path / "resumed"
    train(_cfg(resumed, f"ckpt_path={full / 'checkpoints' / 'step-00000004.ckpt'}"))
    a, b = _train_losses(full), _train_losses(resumed)
    later = sorted(s for s in b if s >= 4)
    assert len(later) >= 4
    for step in later:
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from memoryformer.models import LanguageModel

    forward = LanguageModel.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 6:  # the 6th training step
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(LanguageModel, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="training loss is nan at step 5"):
        train(_cfg(out))
    names = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert names == ["last.ckpt", "step-00000004.ckpt"]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (out / "model").exists()


@pytest.mark.slow
def test_wandb_offline_writes_the_logged_keys(tmp_path: Path, monkeypatch) -> None:
    """The offline run file holds the logged keys; it is read only after `wandb.teardown()` has shut the
    wandb-core service down (which flushes and closes the file), so no background writer races the read."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "wb"
    train(
        _cfg(
            out,
            "logger=wandb",
            "logger.wandb.offline=true",
            "trainer.max_steps=2",
            "val_every_n_steps=2",
            "ckpt_every_n_steps=null",
            "export_final=false",
        )
    )
    wandb.teardown()  # joins the service process: the .wandb file is complete and no longer written
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    keys = _wandb_keys(Path(runs[0]))
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "val/loss",
        "buckets/used_min",
        "lr/blocks",
        "lr/embeddings",
        "lr/other",
    ):
        assert key in keys, (key, sorted(keys)[:20])


def _wandb_keys(run_dir: Path) -> set[str]:
    """History keys in an offline run's `.wandb` file, parsed here: a 7-byte header, then LevelDB-log records
    (crc32, uint16 length, type) in 32 KiB blocks, each payload a `wandb_internal_pb2.Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, keys = 32768, 7, b"", set()
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                keys.update(item.key or "/".join(item.nested_key) for item in rec.history.item)
    return keys


def test_bucket_usage_counts_distinct_codes_per_table() -> None:
    # K = 3 tables, tau = 2 (4 buckets each): table 0 sees {0, 1}, table 1 {3}, table 2 {0, 1, 2, 3}
    codes = torch.tensor([[0, 3, 0], [1, 3, 1], [0, 3, 2], [1, 3, 3]], dtype=torch.int32)
    assert bucket_usage(codes, 2).tolist() == [0.5, 0.25, 1.0]
    assert bucket_counts(codes, 2).tolist() == [[2, 2, 0, 0], [0, 0, 0, 4], [1, 1, 1, 1]]
    # independent check on random codes: Python sets per table
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (5, 7, 16), generator=g)
    expected = [len(set(codes[..., k].flatten().tolist())) / 256 for k in range(16)]
    assert bucket_usage(codes, 8).tolist() == pytest.approx(expected)


@pytest.mark.slow
def test_make_train_recipe_learns(tmp_path: Path) -> None:
    """`make train`'s own recipe (read from `make -n train`, run in a temporary run folder): nano_cpu's
    validation loss ends well below the untrained model's, and the evaluation stage (evaluate.py through
    lm-eval) reports a finite held-out perplexity below that of the untrained model on the same task."""
    import json
    import shlex
    import subprocess
    import sys

    from memoryformer.checkpoint import load_model
    from memoryformer.evaluation.config import EvalSettings, EvaluateConfig
    from memoryformer.evaluation.lm_adapter import MemoryFormerLM
    from memoryformer.evaluation.runner import run_evaluation
    from memoryformer.models import LanguageModel

    run_dir = tmp_path / "make_train"
    args = f"TRAIN_ARGS=--run-dir {run_dir} trainer.enable_progress_bar=false print_config=false"
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "train", args],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    # the recipe line; earlier ones may set up .venv (and under `make test` make prints directory lines)
    recipe = [line for line in dry.stdout.splitlines() if "scripts/make_train.py" in line]
    assert len(recipe) == 1, dry.stdout
    cmd = shlex.split(recipe[0])
    assert cmd[1] == "scripts/make_train.py", cmd
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "=== make train: summary ===" in proc.stdout

    summary = json.loads((run_dir / "make_train.json").read_text())
    initial, final = summary["val_loss_first"], summary["val_loss_last"]
    assert abs(initial - math.log(4096)) < 0.3  # untrained: ~uniform over the 4096-token vocabulary
    assert final < 0.7 * initial, (initial, final)

    trained = json.loads((run_dir / "eval" / "results.json").read_text())["results"]["sample_heldout"]
    assert summary["heldout"]["word_perplexity"] == trained["word_perplexity,none"]
    assert (run_dir / "eval" / "results.md").is_file()
    model_cfg = load_model(run_dir / "model")[0].config  # the exported Hugging Face directory
    torch.manual_seed(0)
    untrained_lm = MemoryFormerLM(
        model=LanguageModel(model_cfg), tokenizer=str(run_dir / "model" / "tokenizer.json")
    )
    settings = EvalSettings(tasks=["sample"], data_dir=str(run_dir / "eval_data"), bootstrap_iters=0)
    untrained = run_evaluation(
        EvaluateConfig(checkpoint="unused", eval=settings), tmp_path / "untrained", lm=untrained_lm
    )["results"]["sample_heldout"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        value = trained[f"{metric},none"]
        assert math.isfinite(value) and value < untrained[f"{metric},none"], (metric, value, untrained)


# --------------------------------------------------------------------------------------- checkpoint safety
def _older_lightning_copy(src: Path, dst: Path) -> Path:
    """`src` with its hyper-parameters stored as an OmegaConf node, as older Lightning runs wrote them: a
    normal checkpoint that nevertheless needs full unpickling."""
    from omegaconf import OmegaConf

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"] = OmegaConf.create(ckpt["hyper_parameters"])
    torch.save(ckpt, dst)
    return dst


@pytest.mark.slow
def test_resume_needs_trust_only_for_checkpoints_that_unpickle_objects(
    smoke_run: tuple[Path, dict], tmp_path: Path
) -> None:
    from memoryformer.config import ConfigError

    full, _ = smoke_run
    older = _older_lightning_copy(full / "checkpoints" / "step-00000004.ckpt", tmp_path / "older.ckpt")
    refused = rf"ckpt_path: {re.escape(str(older))} needs the global omegaconf.*trust_checkpoint=true"
    with pytest.raises(ConfigError, match=refused):
        train(_cfg(tmp_path / "refused", f"ckpt_path={older}"))
    assert not (tmp_path / "refused" / "checkpoints" / "last.ckpt").exists()
    summary = train(
        _cfg(tmp_path / "trusted", f"ckpt_path={older}", "trust_checkpoint=true", "trainer.max_steps=5",
             "optim.decay_steps=8", "data.num_samples=32", "export_final=false")  # same run, fewer steps
    )
    assert summary["step"] == 5


@pytest.mark.slow
def test_checkpoint_of_another_shape_or_vocab_is_refused_before_training(
    smoke_run: tuple[Path, dict], tmp_path: Path
) -> None:
    from memoryformer.config import ConfigError

    full, _ = smoke_run
    last = full / "checkpoints" / "last.ckpt"
    for name, override, expected in (
        ("shape", "model.n_layer=2", "model.n_layer=1 there vs 2 here"),
        ("vocab", "model.vocab_size=5000", "model.vocab_size=4096 there vs 5000 here"),
    ):
        with pytest.raises(ConfigError) as err:
            train(_cfg(tmp_path / name, f"ckpt_path={last}", override))
        msg = str(err.value)
        assert str(last) in msg and expected in msg and "\n" not in msg, msg
        assert not (tmp_path / name / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import errno

    from memoryformer.atomic_io import AtomicWriteError

    save, calls = torch.save, {"n": 0}

    def fills_up(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "global_step" in obj:
            calls["n"] += 1
            if calls["n"] == 3:  # step-4 and last.ckpt at step 4 succeed; the step-8 save hits a full disk
                f.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    out = tmp_path / "full"
    with pytest.raises(AtomicWriteError) as err:
        train(_cfg(out, "export_final=false"))
    monkeypatch.undo()
    msg = str(err.value)
    assert msg.startswith(f"the disk holding {out / 'checkpoints'} ran out of space") and "\n" not in msg
    assert "free space there or point paths.output_dir at a larger disk" in msg
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["config.yaml", "last.ckpt", "step-00000004.ckpt"], names
    from memoryformer.checkpoint import safe_torch_load

    assert safe_torch_load(out / "checkpoints" / "last.ckpt")["global_step"] == 4
