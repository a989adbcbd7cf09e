"""Every option has one home: the dataclass that declares it. The YAML files of conf/ add Hydra's settings
and what differs, never a restated default (issue #15), and the entry points compose on the dataclasses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memoryformer.conf_schema import register_configs
from memoryformer.config import field_defaults
from memoryformer.data.config import DataConfig
from memoryformer.evaluation.config import EvalSettings, EvaluateConfig
from memoryformer.generation import GenerateConfig
from memoryformer.training.optim import OptimConfig

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


def _compose(config_name: str, *overrides: str, conf: Path = CONF, hydra: bool = False) -> dict:
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=hydra)
    return OmegaConf.to_container(cfg, resolve=False)


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
    assert _compose("config")["optim"] == field_defaults(OptimConfig)


@pytest.mark.parametrize("path", sorted((CONF / "data").glob("*.yaml")), ids=lambda p: p.stem)
def test_data_files_state_only_what_differs(path):
    defaults = field_defaults(DataConfig)
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    restated = {k: v for k, v in spec.items() if k in defaults and defaults[k] == v}
    assert not restated, f"{path.name} restates DataConfig defaults: {restated}"


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of the leaves of a plain mapping (lists are leaves)."""
    out = []
    for key, value in node.items():
        out += _leaves(value, (*prefix, key)) if isinstance(value, dict) and value else [(*prefix, key)]
    return out


def _without(node: dict, path: tuple[str, ...]) -> dict:
    """A copy of `node` without the leaf at `path` (and without parents it leaves empty)."""
    head, *rest = path
    out = dict(node)
    if rest:
        out[head] = _without(node[head], tuple(rest))
        if not out[head]:
            del out[head]
    else:
        del out[head]
    return out


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory) -> Path:
    conf = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF, conf)
    return conf


def _composed(conf: Path, *overrides: str) -> dict:
    """The train config in `conf` with `overrides`, and (as `sweep`) the multirun grid the file sets."""
    out = _compose("config", "paths.output_dir=/tmp/x", *overrides, conf=conf, hydra=True)
    sweep = out["hydra"]["sweeper"].get("params")
    return {k: v for k, v in out.items() if k != "hydra"} | {"sweep": sweep}


#: Values that equal what the default composition gives but state a recipe that must hold under other choices.
KEPT_ON_PURPOSE = {
    ("paper_recipe", "data.seq_len"),  # the paper's 2048 whatever data= is picked (data=sample says 256)
}
TRAINER_FILES = sorted((CONF / "trainer").glob("*.yaml"))
EXPERIMENT_FILES = sorted((CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("group, path", [("experiment", p) for p in EXPERIMENT_FILES]
                         + [("trainer", p) for p in TRAINER_FILES], ids=lambda v: getattr(v, "stem", v))
def test_every_value_a_file_states_changes_the_composed_config(group, path, conf_copy):
    # Drop each value the file states, in a copy of conf/: if the composed config does not change, the value
    # restated a default, a preset or a parent file, i.e. it had a second home.
    full = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    spec = {k: v for k, v in full.items() if k not in ("defaults", "hydra")}
    target = conf_copy / group / path.name
    original = target.read_text()
    expected = _composed(conf_copy, f"{group}={path.stem}")
    redundant = []
    try:
        for leaf in _leaves(spec):
            kept = {k: full[k] for k in ("defaults", "hydra") if k in full}
            trimmed = {**_without(spec, leaf), **kept}
            header = "# @package _global_\n" if original.startswith("# @package _global_") else ""
            target.write_text(header + OmegaConf.to_yaml(OmegaConf.create(trimmed)))
            if _composed(conf_copy, f"{group}={path.stem}") == expected:
                redundant.append(".".join(leaf))
    finally:
        target.write_text(original)
    redundant = [r for r in redundant if (path.stem, r) not in KEPT_ON_PURPOSE]
    assert not redundant, f"{group}/{path.name} restates values it would get anyway: {redundant}"


def test_registering_the_configs_does_not_load_torch():
    # train.py --cfg job, --help and a misspelt key answer before torch is imported (about 1.5 s here)
    code = "import sys, memoryformer.conf_schema as s; s.register_configs(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
