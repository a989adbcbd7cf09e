"""Optimizer groups and lr schedule against the paper's recipe, computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from memoryformer.errors import ConfigError
from memoryformer.models import build_model
from memoryformer.nn.memory_layer import MemoryLayer
from memoryformer.training.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    group_lrs,
    lr_multiplier,
    parameter_groups,
)


def _reference_lr(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """GPT-NeoX's warmup + cosine (docs/paper-notes.md §4), written out here: lr of update `step+1`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    min_lr = lr * min_ratio
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def test_cosine_schedule_matches_reference_and_paper_endpoints() -> None:
    # MF-tiny: lr 3e-3, min lr 3e-5 (released config), warmup 1% of 106418 steps = 1064
    lr, total, warm = 3e-3, 106418, 1064
    fn = lr_multiplier("cosine", warm, total, 0.01)
    for step in (0, 1, 500, 1063, 1064, 2000, 50000, 106417, 106418, 200000):
        assert lr * fn(step) == pytest.approx(_reference_lr(step, lr, warm, total, 0.01), rel=1e-12)
    assert lr * fn(warm) == pytest.approx(3e-3)
    assert lr * fn(total) == pytest.approx(3e-5)
    assert lr * fn((warm + total) // 2) == pytest.approx((3e-3 + 3e-5) / 2, rel=1e-4)


def test_scheduler_drives_the_optimizer_lr() -> None:
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1e-3, warmup_ratio=0.1, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=100)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:3] == pytest.approx([1e-4, 2e-4, 3e-4])  # warmup 10 steps
    assert seen[9] == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # min lr 0.1 x lr after 100 steps


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_are_named_by_what_the_parameters_are_and_decay_follows_the_recipe() -> None:
    model = build_model("nano", n_layer=1, block_size=32)
    groups = {g["name"]: g for g in parameter_groups(model, 0.1)}
    assert set(groups) == {"tables", "embeddings", "other"}  # nano MemoryFormer blocks hold only tables
    tables = {id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer)}
    assert _ids(groups["tables"]["params"]) == tables and groups["tables"]["weight_decay"] == 0.1
    assert _ids(groups["embeddings"]["params"]) == {id(model.wte.weight), id(model.lm_head.weight)}
    assert groups["embeddings"]["weight_decay"] == 0.1
    other = _ids(groups["other"]["params"])
    biases = {id(m.bias) for m in model.modules() if isinstance(m, MemoryLayer)}
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert biases <= other and norms <= other and groups["other"]["weight_decay"] == 0.0
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    assert {g["lr_group"] for g in groups.values()} == {"blocks", "embeddings", "other"}
    off = {g["name"]: g for g in parameter_groups(model, 0.1, table_weight_decay=0.0)}
    assert off["tables"]["weight_decay"] == 0.0 and off["embeddings"]["weight_decay"] == 0.1


def test_dense_block_matrices_form_the_blocks_group() -> None:
    model = build_model("nano", n_layer=1, block_size=32, block="pythia")
    groups = {g["name"]: g for g in parameter_groups(model, 0.1, lr=1e-2, block_lr_scale=0.3)}
    assert set(groups) == {"blocks", "embeddings", "other"}
    block = model.blocks[0]
    matrices = {id(block.attn.query_key_value.weight), id(block.attn.dense.weight)}
    matrices |= {id(block.ffn.fc_in.weight), id(block.ffn.fc_out.weight)}
    assert _ids(groups["blocks"]["params"]) == matrices
    assert groups["blocks"]["lr"] == pytest.approx(3e-3) and groups["blocks"]["weight_decay"] == 0.1
    assert groups["embeddings"]["lr"] == pytest.approx(1e-2) and groups["other"]["lr"] == pytest.approx(1e-2)


def test_tied_embedding_and_head_are_one_parameter_in_the_embeddings_group() -> None:
    model = build_model("nano", n_layer=1, block_size=32)
    model.lm_head.weight = model.wte.weight
    groups = {g["name"]: g for g in parameter_groups(model, 0.1, lr=1e-3, embedding_lr_scale=2.0)}
    assert _ids(groups["embeddings"]["params"]) == {id(model.wte.weight)}
    assert groups["embeddings"]["lr"] == pytest.approx(2e-3)


def test_group_lrs_keep_their_scales_at_every_step_and_across_a_resume() -> None:
    cfg = OptimConfig(lr=1e-2, block_lr_scale=0.3, embedding_lr_scale=2.0, warmup_ratio=0.1, fused=False)

    def fresh():
        torch.manual_seed(0)
        model = build_model("nano", n_layer=1, block_size=16, block="pythia", vocab_size=64, n_embd=32,
                            n_head=2)
        opt = build_optimizer(model, cfg)
        return model, opt, build_scheduler(opt, cfg, max_steps=20)

    def step(model, opt, sched) -> dict[str, float]:
        lrs = group_lrs(opt)
        model(torch.arange(16).view(1, 16), torch.arange(16).view(1, 16))[1].backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        return lrs

    model, opt, sched = fresh()
    seen = [step(model, opt, sched) for _ in range(20)]
    for i, lrs in enumerate(seen):
        base = 1e-2 * lr_multiplier("cosine", 2, 20, cfg.min_lr_ratio)(i)
        assert lrs["other"] == pytest.approx(base, rel=1e-9)
        assert lrs["blocks"] == pytest.approx(0.3 * base, rel=1e-9)
        assert lrs["embeddings"] == pytest.approx(2.0 * base, rel=1e-9)
    # resume after 7 steps from the state dicts, as a checkpoint does: the same lrs follow
    model, opt, sched = fresh()
    for _ in range(7):
        step(model, opt, sched)
    state = (opt.state_dict(), sched.state_dict())
    model2, opt2, sched2 = fresh()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    resumed = [step(model2, opt2, sched2) for _ in range(13)]
    assert [sorted(d.items()) for d in resumed] == [sorted(d.items()) for d in seen[7:]]


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_block_lr_scale_zero_freezes_the_blocks_despite_weight_decay(name: str) -> None:
    torch.manual_seed(0)
    model = build_model("nano", n_layer=1, block_size=16, vocab_size=64)
    cfg = OptimConfig(name=name, lr=1e-2, block_lr_scale=0.0, weight_decay=0.1, fused=False)
    opt = build_optimizer(model, cfg)
    tables = [m.tables for m in model.modules() if isinstance(m, MemoryLayer)]
    before = [t.detach().clone() for t in tables] + [model.wte.weight.detach().clone()]
    for _ in range(3):
        model(torch.arange(16).view(1, 16) % 64, torch.arange(1, 17).view(1, 16) % 64)[1].backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(t, b) for t, b in zip(tables, before, strict=False))  # weight decay x lr 0 = 0
    assert not torch.equal(model.wte.weight, before[-1])  # the embeddings trained


def test_optim_scales_and_table_decay_are_checked() -> None:
    with pytest.raises(ConfigError, match="optim.block_lr_scale=-1"):
        OptimConfig(block_lr_scale=-1).validate()
    with pytest.raises(ConfigError, match="optim.table_weight_decay=-0.1"):
        OptimConfig(table_weight_decay=-0.1).validate()
    with pytest.raises(ConfigError, match="optim.decay_tables was removed; set optim.table_weight_decay=0"):
        OptimConfig.from_dict({"lr": 1e-3, "decay_tables": False})
    # a checkpoint saved before the removal still loads, with the same decay
    assert OptimConfig.from_dict({"decay_tables": False}, saved=True).table_weight_decay == 0.0
    assert OptimConfig.from_dict({"decay_tables": True}, saved=True).table_weight_decay is None


def test_adamw_hyper_parameters_reach_torch() -> None:
    model = build_model("nano", n_layer=1, block_size=32)
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 3e-3
    assert isinstance(build_optimizer(model, OptimConfig(name="adam")), torch.optim.Adam)


@pytest.mark.slow
def test_train_logs_each_groups_lr_every_step_and_scale_zero_freezes_the_blocks(tmp_path) -> None:
    """The issue's check, on the smoke experiment (nano, logged every step): lr/blocks = 0.3 x
    lr/embeddings in metrics.csv; with block_lr_scale=0 the block tables of the step-4 and step-8
    checkpoints are equal while the embeddings moved."""
    import csv
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs
    from memoryformer.training.run import train

    root = Path(__file__).resolve().parents[1]
    register_configs()

    def run(out: Path, scale: str) -> Path:
        with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    "experiment=smoke",
                    f"optim.block_lr_scale={scale}",
                    "export_final=false",
                    f"paths.output_dir={out}",
                    f"paths.runs_root={out.parent}",
                ],
            )
        train(cfg)
        return out

    out = run(tmp_path / "scaled", "0.3")
    rows = [r for r in csv.DictReader((out / "csv" / "metrics.csv").open()) if r.get("lr/blocks")]
    assert [int(r["step"]) for r in rows] == list(range(8))  # every optimizer step
    for r in rows:
        assert float(r["lr/blocks"]) == pytest.approx(0.3 * float(r["lr/embeddings"]), rel=1e-6)
        assert float(r["lr/other"]) == pytest.approx(float(r["lr/embeddings"]), rel=1e-6)
        assert float(r["train/lr"]) == pytest.approx(float(r["lr/other"]), rel=1e-6)

    out = run(tmp_path / "frozen", "0")
    ckpts = [torch.load(out / "checkpoints" / f"step-0000000{s}.ckpt", weights_only=False) for s in (4, 8)]
    first, last = (c["state_dict"] for c in ckpts)
    tables = [k for k in first if k.endswith(".tables")]
    assert tables and all(torch.equal(first[k], last[k]) for k in tables)
    assert not torch.equal(first["model.wte.weight"], last["model.wte.weight"])


def test_table_init_std_sets_the_memory_block_tables_only() -> None:
    torch.manual_seed(0)
    model = build_model("nano", n_layer=1, block_size=32, table_init_std=0.05)
    ffn = model.blocks[0].ffn
    for layer in (ffn.layer1, ffn.layer2):  # 655k and 2.1M N(0, 0.05^2) entries: std within 1%
        assert layer.tables.std().item() == pytest.approx(0.05, rel=0.01)
    small = math.sqrt(2 / (5 * 128))  # GPT-NeoX small_init keeps the Q/K/V tables
    assert model.blocks[0].attn.qkv.tables.std().item() == pytest.approx(small, rel=0.01)
    with pytest.raises(ConfigError, match="model.table_init_std=0"):
        build_model("nano", table_init_std=0.0)
