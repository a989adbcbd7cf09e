"""Every train.py config composes, and every bad config is refused at start with one clear sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from memoryformer.conf_schema import register_configs
from memoryformer.config import PAPER_MODELS, ConfigError
from memoryformer.training.run import trainer_kwargs
from memoryformer.training.settings import check_config

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _compose(*overrides: str, tmp: Path | None = None):
    out = str(tmp or "/tmp/mf_cfg_test")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={out}", f"paths.runs_root={out}", *overrides])


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
#: The experiments of the paper's Table 1 rows (named as the rows) and Table 2's attention variants (the
#: ablation tables' experiments: tests/test_paper_tables.py).
TABLE1_EXPERIMENTS = [*PAPER_MODELS, "linformer_410m", "cosformer_410m", "performer_410m"]
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes_and_checks(trainer: str) -> None:
    cfg = _compose(f"trainer={trainer}", "trainer.devices=2", "trainer.accelerator=cpu")
    plan = check_config(cfg)
    assert plan.world_size == 2
    assert plan.micro_batch_size * 2 * plan.accumulate == cfg.global_batch_size


@pytest.mark.parametrize("experiment", TABLE1_EXPERIMENTS)
def test_paper_experiments_carry_the_papers_recipe(experiment: str) -> None:
    cfg = _compose(f"experiment={experiment}")
    # docs/paper-notes.md §4: 1024 sequences x 2048 tokens per step, Adam (0.9, 0.95), eps 1e-8, wd 0.1,
    # clip 1.0
    assert cfg.global_batch_size * cfg.data.seq_len == 2_097_152
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.1
    assert cfg.optim.grad_clip == 1.0 and cfg.optim.warmup_ratio == 0.01
    # paper section 3: MemoryFormer lr = 3x the matching Pythia lr (Pythia: 1e-3, 6e-4, 3e-4)
    lrs = {
        "mf_tiny": 3e-3,
        "mf_small": 1.8e-3,
        "mf_base": 9e-4,
        "pythia_70m": 1e-3,
        "pythia_160m": 6e-4,
        "pythia_410m": 3e-4,
        # paper Table 2: Pythia-410M's recipe with the attention swapped
        "linformer_410m": 3e-4,
        "cosformer_410m": 3e-4,
        "performer_410m": 3e-4,
    }
    assert cfg.optim.lr == pytest.approx(lrs[experiment])
    steps = 106418 if experiment.startswith("mf_") else 143000  # released MF configs / Pythia
    assert cfg.trainer.max_steps == steps


def test_paper_recipe_is_the_default_optimizer() -> None:
    cfg = _compose()
    o = cfg.optim
    assert (
        o.name,
        o.lr,
        list(o.betas),
        o.eps,
        o.weight_decay,
        o.grad_clip,
        o.warmup_ratio,
        o.min_lr_ratio,
    ) == ("adamw", 3e-3, [0.9, 0.95], 1e-8, 0.1, 1.0, 0.01, 0.01)
    kwargs = trainer_kwargs(check_config(cfg))
    assert kwargs["gradient_clip_val"] == 1.0


def test_smoke_and_nano_experiments_check() -> None:
    for name in ("smoke", "nano_cpu"):
        plan = check_config(_compose(f"experiment={name}"))
        assert plan.model.name == "nano" and plan.max_steps > 0


def test_max_tokens_sets_the_step_budget() -> None:
    cfg = _compose("experiment=smoke", "max_tokens=1000")
    plan = check_config(cfg)
    # smoke: 4 sequences x 32 tokens = 128 tokens per step -> ceil(1000 / 128) = 8
    assert plan.tokens_per_step == 128 and plan.max_steps == 8


def test_val_every_is_counted_in_optimizer_steps() -> None:
    cfg = _compose("experiment=smoke", "trainer.accumulate_grad_batches=2", "val_every_n_steps=3")
    kwargs = trainer_kwargs(check_config(cfg))
    assert kwargs["val_check_interval"] == 6 and kwargs["check_val_every_n_epoch"] is None


def test_unknown_model_name_is_refused() -> None:
    with pytest.raises(MissingConfigException, match="model/gpt5"):
        _compose("model=gpt5")


def test_unknown_key_is_refused_by_the_schema() -> None:
    with pytest.raises(Exception, match="lrr"):
        _compose("optim.lrr=1")


def test_hidden_size_must_equal_k_times_tau() -> None:
    cfg = _compose("model.num_tables=15")
    with pytest.raises(ConfigError, match=r"n_embd=128 must equal model.num_tables \(K=15\)"):
        check_config(cfg)


def test_batch_not_divisible_by_devices_times_accumulation() -> None:
    cfg = _compose("global_batch_size=10", "trainer.devices=2", "trainer.accumulate_grad_batches=2")
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible .* = 2 x 2 = 4") as err:
        check_config(cfg)
    assert str(err.value).count(";") == 1 and "\n" not in str(err.value)


def test_missing_data_path_is_refused(tmp_path: Path) -> None:
    cfg = _compose("data.source=indexed", f"data.paths=[{tmp_path}/nope]")
    with pytest.raises(ConfigError, match=r"data.paths\[0\].*nope.*does not exist"):
        check_config(cfg)


def test_wandb_online_without_api_key_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = _compose("logger=wandb")
    with pytest.raises(ConfigError, match="logger.wandb is W&B online but no API key"):
        check_config(cfg)
    check_config(_compose("logger=wandb", "logger.wandb.offline=true"))  # offline is fine
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_config(cfg)


def test_missing_resume_checkpoint_is_refused() -> None:
    with pytest.raises(ConfigError, match="ckpt_path='/no/such.ckpt' does not exist"):
        check_config(_compose("ckpt_path=/no/such.ckpt"))


def test_resume_settings_are_checked_and_fingerprinted_at_start(tmp_path) -> None:
    # a misspelt resume_mismatch is refused before anything is built, not when a resume is attempted
    with pytest.raises(ConfigError, match="resume_mismatch"):
        check_config(_compose("resume_mismatch=alow"))
    plan = check_config(_compose("ckpt_path=last", "micro_batch_size=4", f"paths.runs_root={tmp_path}"))
    assert plan.resume.ckpt_path == "last" and plan.resume.runs_root == str(tmp_path)
    # the record a resume compares is the one every checkpoint stores: one, with this run's accumulation
    assert plan.record["context"]["accumulate"] == plan.accumulate == 4


def test_loggers_compose_together() -> None:
    cfg = _compose("logger=[csv,tensorboard,wandb]", "logger.wandb.offline=true")
    assert set(cfg.logger) == {"csv", "tensorboard", "wandb"}
    assert OmegaConf.select(cfg, "logger.wandb.project") == "memoryformer"


@pytest.mark.parametrize("sweeper", ["grid", "optuna_lr", "optuna_hash"])
def test_sweeper_configs_compose(sweeper: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/sweeper={sweeper}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert "optim.lr" in params


def test_div_resolver_derives_k_from_tau() -> None:
    cfg = _compose("model.code_length=4", "model.num_tables='${div:${model.n_embd},${model.code_length}}'")
    assert check_config(cfg).model.num_tables == 32  # 128 / 4


#: The run-level defaults train.py runs with when no experiment is picked (TrainConfig in conf_schema.py is
#: their only home; conf/config.yaml states no values).
RUN_DEFAULTS = {
    "name": "run",
    "seed": 1234,
    "global_batch_size": 16,
    "max_tokens": None,
    "val_every_n_steps": None,
    "validate_at_start": False,
    "ckpt_every_n_steps": None,
    "keep_last_k": 3,
    "ckpt_path": None,
    "trust_checkpoint": False,
    "resume_mismatch": "refuse",
    "activation_checkpointing": False,
    "activation_checkpointing_every": 1,
    "compile": False,
    "peak_tflops_per_device": None,
    "bucket_stats_every_n_steps": 50,
    "export_final": True,
    "print_config": True,
    "validate_only": False,
}


def test_run_level_defaults_have_one_home() -> None:
    import dataclasses

    import yaml

    from memoryformer.conf_schema import TrainConfig

    primary = yaml.safe_load((CONF / "config.yaml").read_text())
    assert set(primary) == {"defaults"}, "conf/config.yaml must state no values; TrainConfig holds them"
    schema = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in RUN_DEFAULTS}
    assert schema == RUN_DEFAULTS
    cfg = _compose()
    assert {k: cfg[k] for k in RUN_DEFAULTS} == RUN_DEFAULTS


@pytest.mark.parametrize(
    ("experiment", "changed"),
    [
        (
            "nano_cpu",
            dict(name="nano_cpu", global_batch_size=16, val_every_n_steps=50, validate_at_start=True,
                 ckpt_every_n_steps=100),
        ),
        (
            "mf_tiny",
            dict(name="mf_tiny", global_batch_size=1024, val_every_n_steps=1000, ckpt_every_n_steps=1000),
        ),
        (
            "smoke",
            dict(name="smoke", global_batch_size=4, val_every_n_steps=4, ckpt_every_n_steps=4,
                 bucket_stats_every_n_steps=2, print_config=False),
        ),
    ],
)
def test_experiments_change_only_what_they_state(experiment: str, changed: dict) -> None:
    cfg = _compose(f"experiment={experiment}")
    assert {k: cfg[k] for k in RUN_DEFAULTS} == {**RUN_DEFAULTS, **changed}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=0", r"optim\.lr=0\.0 must be > 0 and optim\.min_lr_ratio=0\.01 in \[0, 1\]\."),
        ("optim.min_lr_ratio=2", r"optim\.lr=0\.003 must be > 0 and optim\.min_lr_ratio=2\.0 in \[0, 1\]\."),
        ("optim.betas=[0.9,1.0]", r"optim\.betas=\[0\.9, 1\.0\] must be two numbers in \[0, 1\)\."),
        ("optim.betas=[0.9]", r"optim\.betas=\[0\.9\] must be two numbers in \[0, 1\)\."),
        ("optim.name=sgd", r"optim\.name='sgd' is not supported; choose one of: adamw, adam\."),
        ("optim.schedule=step", r"optim\.schedule='step' is not supported; choose one of: cosine, linear, "
                                r"constant\."),
    ],
)
def test_bad_optim_values_are_refused_by_the_optim_config(override: str, message: str) -> None:
    from memoryformer.training.optim import OptimConfig

    cfg = _compose(override)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**OmegaConf.to_container(cfg.optim)).validate()


def test_a_run_reads_its_settings_once_and_never_the_composed_config_again(tmp_path, monkeypatch) -> None:
    """Below `check_config` a run reads only the resolved plan: with every key of the composed config
    removed the moment it has been resolved, the run still trains, checkpoints and saves its config."""
    from memoryformer.training import run as run_module

    resolve = run_module.check_config

    def resolve_then_empty(cfg):
        plan = resolve(cfg)
        OmegaConf.set_struct(cfg, False)
        for key in list(cfg):
            del cfg[key]
        return plan

    monkeypatch.setattr(run_module, "check_config", resolve_then_empty)
    cfg = _compose("experiment=smoke", "trainer.max_steps=2", "val_every_n_steps=2", "ckpt_every_n_steps=2",
                   "validate_at_start=true", "print_config=true", tmp=tmp_path)
    summary = run_module.train(cfg)
    assert len(cfg) == 0 and summary["step"] == 2 and summary["val_loss"] is not None
    saved = OmegaConf.load(tmp_path / "checkpoints" / "config.yaml")
    assert saved.trainer.max_steps == 2 and saved.name == "smoke"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "model").is_dir()
