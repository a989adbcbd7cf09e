"""What Hydra composes the entry points' configs on: `train.py`'s typed schema (`train_schema`) and the
declared defaults of `evaluate.py` and `generate.py` (`evaluate_defaults`, `generate_defaults`), all
registered in Hydra's ConfigStore by `register_configs`, which each entry point calls at import.

`conf/config.yaml` lists `train_schema` first in its defaults, so every composed config is checked against
these dataclasses: a misspelt key (`optim.lrr=1`) or a wrong type (`optim.lr=fast`) fails at composition
with OmegaConf's message naming the key. The model and data groups reuse the dataclasses that validate
them (`ModelConfig`, `DataConfig`); `trainer`, `logger` and `callbacks` are free-form because their keys
are Lightning's own arguments (`trainer.max_steps=60` is `Trainer(max_steps=60)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from memoryformer.config import PRESETS, ModelConfig, field_defaults
from memoryformer.data.config import DataConfig
from memoryformer.launch import run_stamp
from memoryformer.training.optim import OptimConfig


@dataclass
class TrainConfig:
    """The root of `train.py`'s config: groups plus the run-level keys that tie them together.

    Batch arithmetic (docs/memory-plan.md): `global_batch_size` sequences per optimizer step =
    `micro_batch_size` x accumulation x devices x `trainer.num_nodes`. The micro-batch is the knob and the
    accumulation is derived; a stated `trainer.accumulate_grad_batches` must agree with it.

    The run-level defaults below are the only ones: `conf/config.yaml` picks the groups and states no
    values, and `conf/experiment/*.yaml` state only what they change (tests/test_config_train.py checks
    the effective defaults).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: dict[str, Any] | None = None
    callbacks: dict[str, Any] | None = None
    paths: dict[str, Any] = field(default_factory=dict)

    name: str = "run"  # run name: outputs/<name>/<time>/ and the logger run name
    seed: int = 1234
    global_batch_size: int = 16  # sequences per optimizer step = micro x accumulate x devices x nodes
    # sequences per device per forward: an int >= 1; "auto": the largest that the memory plan fits into the
    # device (10% headroom); None: the device's whole share of the global batch (accumulate 1, or
    # global_batch_size / (devices x nodes x trainer.accumulate_grad_batches) when that is stated)
    micro_batch_size: Any = None
    max_tokens: int | None = None  # token budget; when set it decides trainer.max_steps
    val_every_n_steps: int | None = None  # optimizer steps between validations (None: Lightning's per-epoch)
    validate_at_start: bool = False  # log val/loss of the untrained model at step 0 (fresh runs only)
    ckpt_every_n_steps: int | None = None  # optimizer steps between step checkpoints (None: only last.ckpt)
    keep_last_k: int = 3  # step checkpoints kept besides last.ckpt
    # resume from: a .ckpt path, or "last"/"auto": the newest checkpoint of this same run (same settings,
    # docs/resume.md) in this run folder or under paths.runs_root ("last" warns when there is none, "auto"
    # logs one line); None: a fresh run
    ckpt_path: str | None = None
    # an explicit ckpt_path saved with other settings: "refuse" (stop, naming them) | "allow" (resume anyway)
    resume_mismatch: str = "refuse"
    trust_checkpoint: bool = False  # unpickle checkpoint files fully (can run code): only for trusted files
    activation_checkpointing: bool = False  # recompute each block in backward (saves activation memory)
    activation_checkpointing_every: int = 1  # with activation_checkpointing: every n-th block (1 = all)
    compile: bool = False  # torch.compile the model for training
    # datasheet peak for MFU, 2 FLOPs per multiply-add (H100 SXM bf16: 989); None: MFU not logged
    peak_tflops_per_device: float | None = None
    bucket_stats_every_n_steps: int = 50  # Memory Layer bucket-usage stats cadence; 0 disables
    export_final: bool = True  # export the final model to <output_dir>/model for evaluate.py
    print_config: bool = True  # print the composed config at start
    validate_only: bool = False  # build and check everything, then exit without training (tests, dry runs)
    dry_run: bool = False  # check the config, print the memory plan, write plan.json; no data, no device
    device_memory_gb: float | None = None  # plan for a device of this many GB (1e9 bytes); None: this one's


def register_configs() -> None:
    """Register in Hydra's ConfigStore: `TrainConfig` as `train_schema`, `OptimConfig()` as the option
    `optim=adamw`, and every model preset of `memoryformer.config.PRESETS` as the option `model=NAME`.

    Typed defaults have one home: the presets are defined once, in Python, as litgpt does (`model=mf_tiny`
    on the command line and `ModelConfig.from_name("mf_tiny")` in code give the same config), and the
    optimizer's values are `OptimConfig`'s defaults. A YAML file `conf/model/NAME.yaml` adds an option
    beside the presets (conf/model/README.md).

    Also registers evaluate.py's and generate.py's defaults (`EvaluateConfig`, `GenerateConfig`) and the
    `div` and `mul` resolvers used by the hash-shape sweeps (Table 3), and `run_stamp`, the last part of a
    run's folder (`conf/hydra/default.yaml`).
    """
    if not OmegaConf.has_resolver("div"):
        # `${div:a,b}` = a // b, e.g. model.num_tables=${div:${model.n_embd},${model.code_length}} in sweeps
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))
    if not OmegaConf.has_resolver("run_stamp"):
        # `${run_stamp:%Y-%m-%d_%H-%M-%S}`: the time, or the launcher's job id shared by all processes of a
        # multi-process launch (memoryformer.launch); one value per process, as Hydra's `now`
        stamps: dict[str, str] = {}

        def stamp(fmt: str) -> str:
            return stamps.setdefault(fmt, run_stamp(fmt))

        OmegaConf.register_new_resolver("run_stamp", stamp)
    if not OmegaConf.has_resolver("mul"):
        # `${mul:a,b}` = a * b, e.g. model.hashed_width=${mul:${model.num_tables},${model.code_length}}
        OmegaConf.register_new_resolver("mul", lambda a, b: int(a) * int(b))
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="optim", name="adamw", node=OptimConfig())
    for name in PRESETS:
        cs.store(group="model", name=name, node=ModelConfig.from_name(name))
    # evaluate.py and generate.py check their options themselves (from_mapping, one sentence per mistake,
    # and they accept shorthands such as eval.tasks=piqa,arc_easy or eval.metric=acc_norm that a typed
    # node would refuse), so Hydra gets their declared defaults as plain values, not a schema.
    from memoryformer.evaluation.config import EvaluateConfig
    from memoryformer.generation import GenerateConfig

    cs.store(name="evaluate_defaults", node=field_defaults(EvaluateConfig))
    cs.store(name="generate_defaults", node=field_defaults(GenerateConfig))
