"""ModelConfig: presets match the paper and conf/model/*.yaml; impossible values fail in one sentence."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from memoryformer.config import PAPER_MODELS, PRESETS, ConfigError, ModelConfig

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"


def test_every_preset_has_a_yaml_and_they_agree():
    yaml_names = {p.stem for p in CONF_MODEL.glob("*.yaml")}
    assert yaml_names == set(PRESETS)
    for name in PRESETS:
        from_yaml = ModelConfig.from_dict(OmegaConf.to_container(OmegaConf.load(CONF_MODEL / f"{name}.yaml")))
        assert from_yaml == ModelConfig.from_name(name), name


@pytest.mark.parametrize(
    "name, layers, hidden, heads, tables",
    [
        # Paper Table 1 and section 3: tau = 8, K = 64 / 96 / 128.
        ("memoryformer_tiny", 6, 512, 8, 64),
        ("memoryformer_small", 12, 768, 12, 96),
        ("memoryformer_base", 24, 1024, 16, 128),
        # docs/paper-notes.md §6: the released small config has 6 layers and 8 heads.
        ("memoryformer_small_released", 6, 768, 8, 96),
    ],
)
def test_memoryformer_presets_follow_the_paper(name, layers, hidden, heads, tables):
    cfg = ModelConfig.from_name(name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.num_tables, cfg.code_length) == (
        layers, hidden, heads, tables, 8
    )
    assert cfg.num_tables * cfg.code_length == cfg.n_embd
    assert cfg.memory_block_hidden == tables * 10  # (tau + 2) K, paper section 2.4
    assert cfg.rotary_ndims == cfg.head_size // 4  # rotary on 25% of each head (16 of 64 dims)


def test_paper_models_are_presets():
    assert all(name in PRESETS for name in PAPER_MODELS)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            {"num_tables": 60},
            "model.n_embd=512 must equal model.num_tables (K=60) * model.code_length (tau=8)",
        ),
        ({"n_head": 7}, "model.n_embd=512 is not divisible by model.n_head=7"),
        ({"block": "mamba"}, "model.block='mamba' is not supported"),
        ({"expand_bits": 4}, "model.expand_bits=4"),
        ({"weighting": "softmax"}, "model.weighting='softmax'"),
        (
            {"memory_impl": "triton"},
            "model.memory_impl='triton' is not supported; choose one of: auto, torch, fused.",
        ),
        ({"temperature": 0.5}, "has no effect with model.weighting=l1_prob"),
        ({"code_length": 16, "num_tables": 32}, "keep it <= 16"),
    ],
)
def test_impossible_values_fail_with_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_name("memoryformer_tiny", **overrides)
    message = str(info.value)
    assert fragment in message
    assert message.count("\n") == 0


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model name 'gpt5' is unknown; choose one of: .*memoryformer_tiny"):
        ModelConfig.from_name("gpt5")


def test_from_dict_rejects_unknown_keys_and_round_trips():
    cfg = ModelConfig.from_name("nano")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden": 3})
