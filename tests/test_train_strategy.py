"""Trainer strategies: DDP/DeepSpeed from the YAML, and DeepSpeed ZeRO-2 really training our model on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from memoryformer.conf_schema import register_configs
from memoryformer.config import ConfigError
from memoryformer.training.strategy import build_strategy, deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _trainer(name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/tmp/x", f"trainer={name}", *overrides])
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.trainer, resolve=True)


@pytest.mark.parametrize(
    ("name", "stage", "offload"),
    [
        ("deepspeed_zero1", 1, False),
        ("deepspeed_zero2", 2, False),
        ("deepspeed_zero3", 3, False),
        ("deepspeed_zero2_offload", 2, True),
    ],
)
def test_deepspeed_configs_give_the_expected_dict(name: str, stage: int, offload: bool) -> None:
    t = _trainer(name)
    assert t["precision"] == "bf16-mixed" and t["accelerator"] == "gpu"
    config = deepspeed_config(t["strategy"], t["precision"])
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["reduce_bucket_size"] == 200_000_000 and zero["allgather_bucket_size"] == 200_000_000
    assert ("offload_optimizer" in zero) == offload
    if offload:
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "fp16" not in config  # bf16: Lightning adds {"bf16": {"enabled": True}} itself
    assert "gradient_accumulation_steps" not in config  # set by Lightning from accumulate_grad_batches
    # fp16 (the released code's precision): dynamic loss scale 2**12, window 1000, hysteresis 2
    fp16 = deepspeed_config(t["strategy"], "16-mixed")["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 12,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }


@pytest.mark.slow
def test_deepspeed_strategy_is_built_with_the_yaml_dict() -> None:
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    t = _trainer("deepspeed_zero2")
    strategy = build_strategy(t["strategy"], t["precision"])
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.config == deepspeed_config(t["strategy"], t["precision"])


def test_ddp_and_plain_strategies() -> None:
    from lightning.pytorch.strategies import DDPStrategy

    t = _trainer("ddp")
    s = build_strategy(t["strategy"], t["precision"])
    assert isinstance(s, DDPStrategy) and s._ddp_kwargs == {
        "find_unused_parameters": False,
        "gradient_as_bucket_view": True,
    }
    assert build_strategy("auto") == "auto" and build_strategy(None) == "auto"


def test_bad_strategy_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="trainer.strategy.name='horovod' is not supported"):
        build_strategy({"name": "horovod"})
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is set from the Trainer"):
        deepspeed_config(
            {"config": {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}}, "32"
        )
    with pytest.raises(ConfigError, match="stage=5 must be 0, 1, 2 or 3"):
        deepspeed_config({"config": {"zero_optimization": {"stage": 5}}}, "32")


DS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, deepspeed
    from memoryformer.models import build_model
    from memoryformer.conf_schema import OptimConfig
    from memoryformer.training.optim import build_optimizer
    from memoryformer.training.strategy import deepspeed_config

    spec = json.loads(sys.argv[1])
    config = deepspeed_config(spec, "32-true")
    # what Lightning's DeepSpeedStrategy adds from the Trainer
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = build_model("nano", n_layer=1, block_size=32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, block_lr_scale=0.5))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    changed = sum(not torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    groups = {g["name"]: [g["lr_group"], g["lr"]] for g in engine.optimizer.param_groups}
    print(json.dumps({"losses": losses, "changed": changed, "optimizer": type(engine.optimizer).__name__,
                      "stage": engine.zero_optimization_stage(), "groups": groups}))
    """
)


@pytest.mark.slow
def test_deepspeed_zero2_trains_our_model_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    import json

    t = _trainer("deepspeed_zero2")
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29561",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(t["strategy"])],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stage"] == 2 and out["optimizer"] == "DeepSpeedZeroOptimizer"
    assert out["changed"] > 0
    # the per-group lrs survive ZeRO's wrapping (nano's blocks hold only Memory Layer tables)
    groups = out["groups"]
    assert set(groups) == {"tables", "embeddings", "other"} and groups["tables"][0] == "blocks"
    assert groups["tables"][1] == pytest.approx(0.5 * groups["embeddings"][1])
    # same batch twice: a working optimizer step lowers the loss (nano starts near ln(4096) = 8.32)
    assert abs(out["losses"][0] - 8.32) < 0.3 and out["losses"][1] < out["losses"][0]
