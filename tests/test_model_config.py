"""ModelConfig: presets match the paper and are what `model=NAME` composes; impossible values fail in one
sentence; a user's own conf/model file can build on a preset."""

import re
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memoryformer.conf_schema import register_configs
from memoryformer.config import PAPER_MODELS, PAPER_ROWS, PRESETS, ConfigError, ModelConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _composed_model(conf_dir: Path, *overrides: str) -> ModelConfig:
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_group_option_is_the_python_preset(name):
    # one home for the presets: model=NAME composes ModelConfig.from_name(NAME)
    assert _composed_model(CONF, f"model={name}") == ModelConfig.from_name(name)


def test_own_model_file_builds_on_a_preset(tmp_path):
    # the example of conf/model/README.md, copied verbatim into a copy of conf/
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    readme = (CONF / "model" / "README.md").read_text()
    example = re.search(r"`conf/model/(\w+)\.yaml`:\n\n```yaml\n(.*?)```", readme, re.S)
    assert example, "conf/model/README.md lost its example file"
    (conf / "model" / f"{example.group(1)}.yaml").write_text(example.group(2))
    got = _composed_model(conf, f"model={example.group(1)}")
    expected = ModelConfig.from_name("mf_tiny").to_dict()
    expected.update(name="mf_tiny_k32", n_embd=256, num_tables=32)
    assert got == ModelConfig.from_dict(expected)


def test_paper_rows_are_table1_in_order():
    # paper Table 1: three Pythia baselines, each followed by the MemoryFormer of the same width
    assert PAPER_MODELS == ("pythia_70m", "mf_tiny", "pythia_160m", "mf_small", "pythia_410m", "mf_base")
    for row in PAPER_ROWS:
        if row.baseline:
            mf, pythia = ModelConfig.from_name(row.name), ModelConfig.from_name(row.baseline)
            assert (mf.n_layer, mf.n_embd, mf.n_head) == (pythia.n_layer, pythia.n_embd, pythia.n_head)
            assert mf.is_memoryformer and not pythia.is_memoryformer


@pytest.mark.parametrize(
    "name, layers, hidden, heads, tables",
    [
        # Paper Table 1 and section 3: tau = 8, K = 64 / 96 / 128.
        ("mf_tiny", 6, 512, 8, 64),
        ("mf_small", 12, 768, 12, 96),
        ("mf_base", 24, 1024, 16, 128),
        # docs/paper-notes.md §6: the released small config has 6 layers and 8 heads.
        ("mf_small_released", 6, 768, 8, 96),
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
            "model.memory_impl='triton' is not supported; choose one of: auto, torch.",
        ),
        ({"memory_impl": "fused"}, "is gone; set model.memory_impl=auto."),
        ({"temperature": 0.5}, "has no effect with model.weighting=l1_prob"),
        ({"code_length": 16, "num_tables": 32}, "keep it <= 16"),
    ],
)
def test_impossible_values_fail_with_one_sentence(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_name("mf_tiny", **overrides)
    message = str(info.value)
    assert fragment in message
    assert message.count("\n") == 0


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="model name 'gpt5' is unknown; choose one of: .*mf_tiny"):
        ModelConfig.from_name("gpt5")


def test_from_dict_rejects_unknown_keys_and_round_trips():
    cfg = ModelConfig.from_name("nano")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden": 3})


def test_model_readme_names_every_preset():
    names = set(re.findall(r"`(\w+)`", (CONF / "model" / "README.md").read_text().split("|---|---|")[1]))
    assert set(PRESETS) <= names, set(PRESETS) - names
