"""The protocol of the paper's Tables 3-6: each table's multirun expands to the paper's rows, the ablation
schedule, the GeLU switch, the d = 510 row's width, fp16 for every paper experiment, and the six-table report.

Expected values are the paper's (Tables 3-6 and section 3), written here, not read from the code under test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from memoryformer.conf_schema import register_configs
from memoryformer.config import PAPER_MODELS, ConfigError, ModelConfig
from memoryformer.models import LanguageModel
from memoryformer.training.optim import OptimConfig, build_optimizer, build_scheduler
from memoryformer.training.settings import check_config, optim_for_precision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the paper-table printer
import paper_flops  # noqa: E402

CONF = ROOT / "conf"
register_configs()

PAPER_EXPERIMENTS = [
    *PAPER_MODELS, "mf_tiny_ablation", "table3_tau", "table4_lr", "table5_expand_bits", "table6_gelu",
]

def _experiment_chain(name: str) -> list[str]:
    """`name` and the experiment files it builds on (its first non-override defaults entry), in order."""
    chain = [name]
    while True:
        spec = OmegaConf.load(CONF / "experiment" / f"{chain[-1]}.yaml")
        parents = [d for d in spec.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        if not parents:
            return chain
        chain.append(parents[0])


def _compose(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            # device_memory_gb: the 80 GB GPU the paper experiments' micro_batch_size=auto plans for
            overrides=["paths.output_dir=/tmp/mf_tables", "paths.runs_root=/tmp/mf_tables",
                       "device_memory_gb=80", *overrides],
            return_hydra_config=hydra,
        )


def _check(cfg) -> None:
    """`check_config`'s model, optimizer and batch checks, without requiring the Pile on this machine."""
    cfg = cfg.copy()
    local = {"source": "sample", "paths": [], "val_paths": [], "tokenizer": None}
    OmegaConf.update(cfg, "data", local, merge=True)
    check_config(cfg)


def _jobs(experiment: str) -> list[list[str]]:
    """The per-job overrides Hydra's basic sweeper launches for `python train.py -m experiment=NAME`."""
    params = _compose(f"experiment={experiment}", hydra=True).hydra.sweeper.params
    args = [f"{k}={v}" for k, v in OmegaConf.to_container(params).items()]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    return batch


# ------------------------------------------------------------------------------------ one multirun per table
# (swept key, the paper's row values, resolved keys to check per row)
TABLE_ROWS = {
    # Table 3: tau/K = 4/128, 8/64, 10/51 at widths 512, 512, 510 (hashed); outputs 512 wide in every row
    "table3_tau": [
        {"model.code_length": 4, "model.num_tables": 128, "model.hashed_width": 512, "model.n_embd": 512},
        {"model.code_length": 8, "model.num_tables": 64, "model.hashed_width": 512, "model.n_embd": 512},
        {"model.code_length": 10, "model.num_tables": 51, "model.hashed_width": 510, "model.n_embd": 512},
    ],
    "table4_lr": [{"optim.lr": lr} for lr in (1e-3, 2e-3, 3e-3, 4e-3)],
    "table5_expand_bits": [{"model.expand_bits": e} for e in (0, 1, 2, 3)],
    "table6_gelu": [{"model.memory_block_activation": a} for a in ("none", "gelu")],
}


@pytest.mark.parametrize("experiment", list(TABLE_ROWS))
def test_each_table_multirun_expands_to_the_papers_rows(experiment):
    jobs = _jobs(experiment)
    expected = TABLE_ROWS[experiment]
    rows = {"table3_tau": 3, "table4_lr": 4, "table5_expand_bits": 4, "table6_gelu": 2}
    assert len(jobs) == rows[experiment]
    for job, want in zip(jobs, expected, strict=True):
        cfg = _compose(f"experiment={experiment}", *job)
        _check(cfg)  # every row is a valid model and recipe (Table 3's d = 510 row included)
        for key, value in want.items():
            assert OmegaConf.select(cfg, key) == pytest.approx(value) if isinstance(value, float) else (
                OmegaConf.select(cfg, key) == value
            ), (experiment, key)
        assert cfg.name == experiment
        # Tables 3-5: "after 8000 training steps"; Table 6: the full MF-tiny recipe of Table 1 (106418 steps)
        assert cfg.trainer.max_steps == (106418 if experiment == "table6_gelu" else 8000)
        assert cfg.model.n_layer == 6 and cfg.global_batch_size == 1024 and cfg.data.seq_len == 2048


def test_ablation_schedule_spans_8000_steps_and_one_key_gives_the_full_runs():
    cfg = _compose("experiment=mf_tiny_ablation")
    assert cfg.trainer.max_steps == 8000 and cfg.optim.decay_steps is None and cfg.optim.lr == 3e-3
    long = _compose("experiment=mf_tiny_ablation", "optim.decay_steps=106418")
    assert long.optim.decay_steps == 106418 and long.trainer.max_steps == 8000


def _lrs(optim: OptimConfig, max_steps: int, steps: list[int]) -> dict[int, float]:
    opt = build_optimizer(torch.nn.Linear(2, 2), optim)
    sched = build_scheduler(opt, optim, max_steps)
    seen = {}
    for step in range(max(steps) + 1):
        if step in steps:
            seen[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return seen


def _cosine(step: int, lr: float, warmup: int, horizon: int, min_ratio: float) -> float:
    """GPT-NeoX: linear warmup (update step+1), cosine from lr to min_ratio*lr at `horizon`, then flat."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (horizon - warmup))
    return lr * min_ratio + lr * (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


def test_decay_steps_sets_the_cosine_horizon_and_its_warmup():
    steps = [0, 9, 10, 50, 99, 150, 199, 250]
    # decay_steps unset: the horizon is max_steps (200), warmup 5% of it = 10 steps
    got = _lrs(OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_ratio=0.05, fused=False), 200, steps)
    for s in steps:
        assert got[s] == pytest.approx(_cosine(s, 1e-3, 10, 200, 0.1), rel=1e-9), s
    assert got[250] == pytest.approx(1e-4)  # past the horizon: min lr
    # decay_steps=100 in a 260-step run: warmup 5% of 100 = 5 steps, min lr from step 100 on
    optim = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_ratio=0.05, decay_steps=100, fused=False)
    got = _lrs(optim, 260, steps)
    for s in steps:
        assert got[s] == pytest.approx(_cosine(s, 1e-3, 5, 100, 0.1), rel=1e-9), s
    assert got[150] == pytest.approx(1e-4)


def test_decay_steps_must_be_positive():
    with pytest.raises(ConfigError, match=r"optim.decay_steps=0 must be a positive number of steps"):
        opt = build_optimizer(torch.nn.Linear(2, 2), OptimConfig(fused=False))
        build_scheduler(opt, OptimConfig(decay_steps=0), 10)


# ------------------------------------------------------------------------------------ GeLU switch (Table 6)
def test_gelu_switch_changes_the_output_and_sits_before_the_memory_block_norm():
    torch.manual_seed(0)
    small = dict(n_layer=1, block_size=32, vocab_size=256)
    plain = LanguageModel(ModelConfig.from_name("nano", **small))
    gelu_cfg = ModelConfig.from_name("nano", **small, memory_block_activation="gelu")
    gelu = LanguageModel(gelu_cfg)
    gelu.load_state_dict(plain.state_dict())  # GELU has no parameters: same weights, only the switch differs
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        a, b = plain(ids)[0], gelu(ids)[0]
    assert not torch.allclose(a, b)
    mb = gelu.blocks[0].ffn
    x = torch.randn(3, 128)
    with torch.no_grad():
        by_hand = mb.layer2(mb.norm(torch.nn.functional.gelu(mb.layer1(x))))
        assert torch.allclose(mb(x), by_hand)


def test_memory_block_activation_is_validated():
    message = r"^model.memory_block_activation='relu' is not supported; choose one of: none, gelu.$"
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_name("mf_tiny", memory_block_activation="relu")


# ------------------------------------------------------------------------------------ Table 3's d = 510 row
def test_d510_row_hashes_510_dims_and_outputs_512():
    cfg = ModelConfig.from_name("mf_tiny", code_length=10, num_tables=51, hashed_width=510)
    with torch.device("meta"):
        model = LanguageModel(cfg)
    q = model.blocks[0].attn.qkv
    assert (q.in_features, q.num_tables, q.out_features) == (510, 51, 3 * 512)
    assert model.blocks[0].ffn.layer1.in_features == 510
    with pytest.raises(ConfigError, match="set model.hashed_width=510"):
        ModelConfig.from_name("mf_tiny", code_length=10, num_tables=51)


def test_hashed_width_model_runs_and_ignores_unhashed_dims_in_its_codes():
    cfg = ModelConfig.from_name(
        "nano", n_layer=1, block_size=32, vocab_size=256, code_length=10, num_tables=12, hashed_width=120
    )
    model = LanguageModel(cfg)
    logits = model(torch.randint(0, 256, (2, 8)))[0]
    assert logits.shape == (2, 8, 256) and torch.isfinite(logits).all()
    attn = model.blocks[0].attn
    x = torch.randn(4, 128)
    y = x.clone()
    y[:, 120:] += 5.0  # dims past K * tau are carried by the residual, not hashed
    rows = [attn.qkv.hash(t[:, :120]).rows for t in (x, y)]
    assert torch.equal(*rows)


def test_flops_tool_prints_table3_rows():
    # Table 3: FLOPs of one Memory Layer at s = 2048 (printed rounded up) and Memory Size of Memory Layer Q
    rows = paper_flops.table3_rows()
    assert [(r["d"], r["tau"], r["K"], r["out"]) for r in rows] == [(512, 4, 128, 512), (512, 8, 64, 512),
                                                                     (510, 10, 51, 512)]
    assert [math.ceil(r["flops_g"] * 100) / 100 for r in rows] == [0.14, 0.07, 0.06]
    assert [round(r["memory_mb_fp16"], 1) for r in rows] == [2.1, 16.8, 53.5]
    assert rows[2]["memory_mb_fp16"] == pytest.approx(51 * 2**10 * 512 * 2 / 1e6)  # 53.48 MB needs h = 512


# ------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_paper_experiment_states_precision_and_composes_in_fp16(experiment):
    chain = _experiment_chain(experiment)
    assert chain[-1] == "paper_recipe", chain  # every paper experiment builds on the one recipe
    # MF-base's 6.75B table parameters fit an 80 GB GPU only sharded (its experiment file says so)
    sharded = ["trainer=deepspeed_zero3", "trainer.devices=8"] if experiment == "mf_base" else []
    cfg = _compose(f"experiment={experiment}", *sharded, "trainer.precision=16-mixed")
    _check(cfg)
    assert cfg.trainer.precision == "16-mixed"
    # Lightning's fp16 AMP refuses to clip gradients with a fused optimizer: the step falls back to foreach
    # (DeepSpeed clips by itself and keeps the fused step)
    optim = optim_for_precision(OmegaConf.to_container(cfg.optim), OmegaConf.to_container(cfg.trainer))
    assert optim["fused"] is bool(sharded) and optim["grad_clip"] == 1.0


def test_deepspeed_keeps_the_fused_step_in_fp16():
    cfg = _compose("experiment=mf_tiny", "trainer=deepspeed_zero2", "trainer.precision=16-mixed")
    optim = optim_for_precision(OmegaConf.to_container(cfg.optim), OmegaConf.to_container(cfg.trainer))
    assert optim["fused"] is True


def _fp16_smoke(tmp_path: Path, accelerator: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[
            "experiment=smoke", f"paths.output_dir={tmp_path}", f"paths.runs_root={tmp_path}",
            "trainer.precision=16-mixed", f"trainer.accelerator={accelerator}", "trainer.devices=1",
            "trainer.max_steps=1", "val_every_n_steps=1", "ckpt_every_n_steps=1", "logger=none",
            "export_final=false",
        ])


def test_fp16_on_cpu_is_refused_with_one_sentence(tmp_path):
    # Lightning has no fp16 AMP on CPU: it warns and trains in bf16-mixed, which would fake an fp16 run.
    with pytest.raises(ConfigError, match=r"^trainer.precision=16-mixed needs a CUDA GPU: .* on CPU use "
                       r"trainer.precision=bf16-mixed or 32-true.$"):
        check_config(_fp16_smoke(tmp_path, "cpu"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 mixed precision needs a CUDA GPU")
def test_one_fp16_training_step_runs_on_cuda(tmp_path):
    """One optimizer step with trainer.precision=16-mixed (GradScaler, clipping, non-fused AdamW)."""
    from memoryformer.training.run import train

    summary = train(_fp16_smoke(tmp_path, "gpu"))
    assert summary["step"] == 1 and math.isfinite(summary["val_loss"])


# ------------------------------------------------------------------------------------ the six-table report
TASKS = ("piqa", "winogrande", "arc_easy", "arc_challenge", "logiqa")


def _train_run(d: Path, name: str, model: dict, lr: float = 3e-3, ppl: float | None = None,
               max_steps: int = 8000) -> Path:
    (d / "checkpoints").mkdir(parents=True)
    config = {"name": name, "model": {"name": "mf_tiny", **model}, "optim": {"lr": lr},
              "trainer": {"max_steps": max_steps}}
    (d / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(config))
    if ppl is not None:
        (d / "csv").mkdir()
        loss = math.log(ppl)
        (d / "csv" / "metrics.csv").write_text(
            "epoch,step,train/loss,val/loss,val/ppl,val/at_step\n"
            f"0,998,3.1,,,\n0,999,,{loss + 0.5},{math.exp(loss + 0.5)},1000\n"
            f"0,7999,,{loss},{ppl},{max_steps}\n"
        )
    return d


def _eval_run(d: Path, train_dir: Path, scores: dict[str, float]) -> Path:
    d.mkdir(parents=True)
    res = {t: {"acc,none": v, "acc_stderr,none": 0.01, "alias": t} for t, v in scores.items()}
    (d / "results.json").write_text(json.dumps({"results": res, "n-samples": {}}))
    info = {
        "kind": "memoryformer",
        "checkpoint": str(train_dir / "checkpoints" / "last.ckpt"),
        "label": "mf_tiny",
        "model": ModelConfig.from_name("mf_tiny").to_dict(),
        "settings": {"eval": {"tasks": list(scores), "metric": {"default": "acc"}}},
    }
    (d / "run_info.json").write_text(json.dumps(info))
    return d


def _section(md: str, n: int) -> list[str]:
    part = md.split(f"## Table {n}:")[1].split("## Table")[0]
    return [line for line in part.splitlines() if line.startswith("| ")]


def test_report_renders_all_six_tables_from_runs(tmp_path):
    from memoryformer.evaluation.report import render  # python -m memoryformer.evaluation.report

    runs = tmp_path / "runs"
    _train_run(runs / "multirun/table4_lr/t/1", "table4_lr", {}, lr=2e-3, ppl=19.5)
    _train_run(runs / "outputs/mf_tiny_ablation/t", "mf_tiny_ablation", {}, ppl=18.9)
    _train_run(runs / "multirun/table3_tau/t/2", "table3_tau",
               {"code_length": 10, "num_tables": 51, "hashed_width": 510}, ppl=18.7)
    full = dict(piqa=0.6, winogrande=0.5, arc_easy=0.4, arc_challenge=0.2, logiqa=0.25)
    tiny = _train_run(runs / "outputs/mf_tiny/t", "mf_tiny", {}, max_steps=106418)
    _eval_run(runs / "eval/tiny", tiny, {**full, "wsc": 0.375})
    gelu = _train_run(runs / "multirun/table6_gelu/t/1", "table6_gelu", {"memory_block_activation": "gelu"},
                      max_steps=106418)
    _eval_run(runs / "eval/gelu", gelu, {**full, "wsc273": 0.55})
    _train_run(runs / "outputs/pythia_70m/t", "pythia_70m", {}, max_steps=143000)  # trained, not evaluated

    md = render([runs], tmp_path / "report")
    for n in range(1, 7):
        assert f"## Table {n}:" in md
        png = tmp_path / "report" / f"table{n}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "report" / "report.md").read_text() == md

    t4 = _section(md, 4)
    assert any(r.startswith("| 1e-3 |") and "| not run |" in r for r in t4)
    assert any(r.startswith("| 2e-3 | 19.07 | 19.50 | 8000 |") for r in t4)
    assert any(r.startswith("| 3e-3 |") and "| 18.90 | 8000 |" in r for r in t4)  # the plain ablation run
    t3 = _section(md, 3)
    assert any(r.startswith("| d=510, τ=10, K=51 |") and "| 18.67 | 18.70 |" in r for r in t3)
    assert any(r.startswith("| d=512, τ=4, K=128 |") and "not run" in r for r in t3)
    t5 = _section(md, 5)
    assert sum("not run" in r for r in t5) == 3 and any(r.startswith("| 2 |") and "18.90" in r for r in t5)

    t1 = _section(md, 1)
    i = next(k for k, r in enumerate(t1) if r.startswith("| MF-tiny | paper |"))
    assert "| 0.375 |" in t1[i + 1] and "wsc273" not in t1[i + 1]  # SuperGLUE WSC: the paper's column
    pythia = "| Pythia-70M | ours (outputs/pythia_70m/t) |"
    assert any(r.startswith(pythia) and "not evaluated" in r for r in t1)
    assert any(r.startswith("| MF-small | ours |") and "not run" in r for r in t1)
    t2 = _section(md, 2)
    assert any(r.startswith("| Linformer | ours |") and "not run" in r for r in t2)
    t6 = _section(md, 6)
    j = next(k for k, r in enumerate(t6) if r.startswith("| MemoryFormer-tiny + GeLU | paper |"))
    assert "| 0.550 (wsc273) |" in t6[j + 1] and "(incl. wsc273)" in t6[j + 1]
    k = next(k for k, r in enumerate(t6) if r.startswith("| MemoryFormer-tiny | paper |"))
    assert "| 0.375 |" in t6[k + 1]  # the mf_tiny run fills Table 6's first row
    # rows that were not run are never shown as a number
    assert "0.000" not in md


@pytest.mark.slow
def test_table3_multirun_trains_every_row_and_the_report_reads_it(tmp_path):
    """`train.py -m experiment=table3_tau` for real, shrunk to a nano width (128: tau 10 hashes 120 dims)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", "-m", "experiment=table3_tau", "model=nano", "model.n_embd=128",
           "model.n_layer=1", "model.block_size=64", "data=sample", "data.seq_len=32", "data.val_samples=8",
           "trainer=cpu", "trainer.accumulate_grad_batches=1", "trainer.max_steps=2", "global_batch_size=4",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "val_every_n_steps=2",
           "ckpt_every_n_steps=2", "export_final=false", "print_config=false", "bucket_stats_every_n_steps=0",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    from memoryformer.evaluation.report import render

    t3 = _section(render([tmp_path / "sweep"]), 3)
    assert len(t3) == 1 + 3 and not any("not run" in r for r in t3)  # header + the 3 rows
    assert all("| 2 |" in r for r in t3[1:])  # validated at optimizer step 2 of 2
