"""Every option has one home: the dataclass that declares it. The YAML files of conf/ add Hydra's settings
and what differs, never a restated default (issue #15), and the entry points compose on the dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memoryformer.conf_schema import OptimConfig, register_configs
from memoryformer.config import ModelConfig, field_defaults
from memoryformer.data.config import DataConfig
from memoryformer.evaluation.config import EvalSettings, EvaluateConfig
from memoryformer.generation import GenerateConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


@dataclass
class _Inner:
    sizes: list[int] = field(default_factory=lambda: [1, 2])

    def __post_init__(self) -> None:
        raise AssertionError("field_defaults must not construct the dataclass")


@dataclass
class _Outer:
    name: str = "x"
    limit: float | None = None
    inner: _Inner = field(default_factory=_Inner)


def test_field_defaults_reads_declarations_without_running_checks():
    assert field_defaults(_Outer) == {"name": "x", "limit": None, "inner": {"sizes": [1, 2]}}


def _compose(config_name: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name, overrides=list(overrides)), resolve=False)


@pytest.mark.parametrize("config_name, cls", [("evaluate", EvaluateConfig), ("generate", GenerateConfig)])
def test_entry_point_yaml_holds_only_hydra_settings(config_name, cls):
    spec = OmegaConf.load(CONF / f"{config_name}.yaml")
    assert set(spec) <= {"defaults", "hydra"}, set(spec)
    assert _compose(config_name) == field_defaults(cls)


def test_evaluate_defaults_are_what_evaluate_py_runs_with():
    # the composed defaults plus a checkpoint build the same settings as the dataclass's own defaults
    composed = _compose("evaluate", "checkpoint=/x")
    assert EvaluateConfig.from_mapping(composed).eval == EvalSettings()
    # the shorthands users type still pass the untyped node and are normalised by EvalSettings
    short = EvaluateConfig.from_mapping(_compose("evaluate", "checkpoint=/x", "eval.tasks=paper_wsc273",
                                                 "eval.metric=acc_norm"))
    assert short.eval.tasks[2] == "wsc273" and short.eval.metric == {"default": "acc_norm"}


def test_optimizer_group_is_optimconfig():
    assert not (CONF / "optim").exists()
    assert _compose("config")["optim"] == field_defaults(OptimConfig)


@pytest.mark.parametrize("path", sorted((CONF / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_data_files_state_only_what_differs(path):
    defaults = field_defaults(DataConfig)
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    restated = {k: v for k, v in spec.items() if k in defaults and defaults[k] == v}
    assert not restated, f"{path.name} restates DataConfig defaults: {restated}"


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_files_restate_no_model_or_run_default(path):
    # model keys equal to the chosen preset, or run keys equal to TrainConfig's, would be a second home
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cfg = _compose("config", f"experiment={path.stem}")
    name = cfg["model"]["name"]
    preset = ModelConfig.from_name(name).to_dict() if name in _presets() else {}
    restated = {k: v for k, v in (spec.get("model") or {}).items() if k != "name" and preset.get(k) == v}
    assert not restated, f"{path.name} restates the preset's model keys: {restated}"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = OmegaConf.to_container(compose("config"), resolve=False)
    run_keys = {k: v for k, v in spec.items() if not isinstance(v, dict) and k not in ("defaults", "name")}
    restated = {k: v for k, v in run_keys.items() if k in plain and plain[k] == v}
    assert not restated, f"{path.name} restates run-level defaults: {restated}"


def _presets() -> set[str]:
    from memoryformer.config import PRESETS

    return set(PRESETS)
