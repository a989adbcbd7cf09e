"""Trainer strategies from the YAML (DeepSpeed training through train.py: tests/test_train_deepspeed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from memoryformer.conf_schema import register_configs
from memoryformer.config import ConfigError
from memoryformer.training.parallel import build_strategy, deepspeed_config

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
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}  # micro-batches add up in fp32 (issue #29)
    assert "data_types" not in deepspeed_config(t["strategy"], "16-mixed")
    assert "data_types" not in deepspeed_config(t["strategy"], "32-true")
    zero0 = {**t["strategy"], "config": {**config, "zero_optimization": {**zero, "stage": 0}}}
    zero0["config"].pop("data_types")
    assert "data_types" not in deepspeed_config(zero0, "bf16-mixed")  # DeepSpeed refuses bf16 + fp32 there
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


@pytest.mark.parametrize("spec", [{"name": "fsdp"}, "fsdp", "fsdp_cpu_offload"])
def test_fsdp_is_refused_naming_the_deepspeed_trainers(spec) -> None:
    # its clipping norm would be per shard (LMTrainingModule.configure_gradient_clipping)
    with pytest.raises(ConfigError, match=r"fsdp.* is refused because gradient clipping under FSDP would use "
                       r"each shard's own norm; use trainer=deepspeed_zero1, deepspeed_zero2, "
                       r"deepspeed_zero2_offload or deepspeed_zero3"):
        build_strategy(spec, "bf16-mixed")
