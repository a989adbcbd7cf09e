"""Optimizer groups and lr schedule against the paper's recipe, computed independently here."""

from __future__ import annotations

import math

import pytest
import torch

from memoryformer.conf_schema import OptimConfig
from memoryformer.models import build_model
from memoryformer.nn.memory_layer import MemoryLayer
from memoryformer.training.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups


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


def test_weight_decay_groups_follow_the_recipe() -> None:
    model = build_model("nano", n_layer=1, block_size=32)
    groups = {g["name"]: g for g in parameter_groups(model, 0.1, decay_tables=True)}
    tables = {id(m.tables) for m in model.modules() if isinstance(m, MemoryLayer)}
    assert {id(p) for p in groups["tables"]["params"]} == tables and groups["tables"]["weight_decay"] == 0.1
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert id(model.lm_head.weight) in {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    biases = {id(m.bias) for m in model.modules() if isinstance(m, MemoryLayer)}
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert biases <= no_decay and norms <= no_decay and groups["no_decay"]["weight_decay"] == 0.0
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    off = {g["name"]: g for g in parameter_groups(model, 0.1, decay_tables=False)}
    assert off["tables"]["weight_decay"] == 0.0 and off["decay"]["weight_decay"] == 0.1


def test_adamw_hyper_parameters_reach_torch() -> None:
    model = build_model("nano", n_layer=1, block_size=32)
    opt = build_optimizer(model, OptimConfig())
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 3e-3
    assert isinstance(build_optimizer(model, OptimConfig(name="adam")), torch.optim.Adam)
