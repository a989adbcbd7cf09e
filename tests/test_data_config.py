"""DataConfig validation and the conf/data YAMLs as structured configs."""

import os

import pytest
from omegaconf import OmegaConf

from memoryformer.config import ConfigError
from memoryformer.data.config import DataConfig

CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "data")
FIX = os.path.join(os.path.dirname(__file__), "fixtures", "data")


def test_missing_indexed_prefix_is_named():
    with pytest.raises(ConfigError, match=r"data\.paths\[0\]='/no/such/pile' has no \.idx file"):
        DataConfig(source="indexed", paths=["/no/such/pile"])


def test_bad_choices_and_values():
    with pytest.raises(ConfigError, match="data.source='s3'"):
        DataConfig(source="s3")
    with pytest.raises(ConfigError, match="data.on_bad_line='ignore'"):
        DataConfig(on_bad_line="ignore")
    with pytest.raises(ConfigError, match=r"data\.files\[0\]='/nope/\*\.jsonl' matches no file"):
        DataConfig(source="files", files=["/nope/*.jsonl"], tokenizer=os.path.join(FIX, "tokenizer.json"))
    with pytest.raises(ConfigError, match="data.tokenizer is required"):
        DataConfig(source="hf", hf_name="x")


@pytest.mark.parametrize("name", ["sample", "pile_pythia", "pile_jsonl", "pile_hf"])
def test_yaml_keys_belong_to_the_schema(name, monkeypatch):
    monkeypatch.setenv("PILE_DIR", "/data/pile")
    schema = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(schema, OmegaConf.load(os.path.join(CONF, f"{name}.yaml")))
    resolved = OmegaConf.to_container(merged, resolve=True)
    assert (
        resolved["source"]
        == {"sample": "sample", "pile_pythia": "indexed", "pile_jsonl": "files", "pile_hf": "hf"}[name]
    )
    if name == "sample":
        assert isinstance(OmegaConf.to_object(merged), DataConfig)
    if name == "pile_pythia":
        assert resolved["seq_len"] == 2048 and resolved["num_samples"] == 143000 * 1024
