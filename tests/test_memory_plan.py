"""The memory plan and the batch arithmetic (docs/memory-plan.md).

The plan's numbers are checked against numbers from outside it: the tensors autograd really saves
(`saved_tensors_hooks` on a CPU forward), DeepSpeed's own model-state estimators, and a real training
step's peak resident memory on CPU (slow test; the full table is benchmarks/bench_memory_plan.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memoryformer.conf_schema import register_configs
from memoryformer.config import ConfigError, ModelConfig
from memoryformer.models import LanguageModel
from memoryformer.nn import memory_ops
from memoryformer.nn.rotary import rotary_cos_sin
from memoryformer.training import sizing as mp
from memoryformer.training.settings import check_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GB = 10**9
register_configs()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["paths.output_dir=/tmp/mf_plan_test", *overrides])


# ----------------------------------------------------------------------------- activations vs autograd
def _saved_bytes_of_one_block(config: ModelConfig, autocast: bool, batch: int = 2, seq: int = 64) -> int:
    """Bytes of the distinct storages autograd saves in one block's forward (parameters and the 16-bit
    copies autocast makes of them left out: the plan counts those separately)."""
    torch.manual_seed(0)
    model = LanguageModel(config)
    block = model.blocks[0]
    param_ptrs = {p.untyped_storage().data_ptr() for p in block.parameters()}
    param_shapes = {tuple(p.shape) for p in block.parameters()}
    param_shapes |= {tuple(reversed(shape)) for shape in param_shapes}  # linear saves weight.t()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        cast_weight = t.dtype == torch.bfloat16 and tuple(t.shape) in param_shapes
        if ptr not in param_ptrs and not cast_weight:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(batch, seq, config.n_embd, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(seq), config.rotary_ndims, config.rotary_base, x.dtype)
    cos_sin = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        block(x, cos, sin)
    return sum(seen.values()) - cos_sin  # rotary tables are [T, r], not per token of the batch


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(expand_bits=0, code_length=4, num_tables=64),
        dict(memory_block_activation="gelu"),
        dict(block="pythia"),
        dict(block="pythia", parallel_residual=False),
    ],
    ids=["mf", "mf-tau4-e0", "mf-gelu", "pythia", "pythia-sequential"],
)
def test_block_activations_are_what_autograd_saves(overrides: dict, autocast: bool) -> None:
    values = dict(vocab_size=512, n_layer=1, n_embd=256, n_head=4, block_size=64, num_tables=32)
    config = ModelConfig(**{**values, **overrides})
    layout = mp.Layout(precision="bf16-mixed" if autocast else "32-true", device="cpu")
    a = mp.activation_bytes(layout)
    if memory_ops.load_cpu_extension() is None:  # no compiler: the CPU lookup is F.embedding_bag too
        a = mp.ActivationBytes(a.stream, a.matmul, a.cpu_buffers, embedding_bag=True)
    tokens = 2 * 64
    planned = mp.block_activation_bytes(config, a) * tokens
    saved = _saved_bytes_of_one_block(config, autocast)
    assert planned == pytest.approx(saved, rel=0.03)


def test_activation_checkpointing_keeps_block_inputs_and_one_recompute() -> None:
    config = ModelConfig.from_name("mf_tiny")
    a = mp.activation_bytes(mp.Layout(device="cuda"))
    tokens = 4 * 2048
    full, recompute = mp.activation_total(config, tokens, a, checkpointing=False, every=1)
    ckpt, ckpt_recompute = mp.activation_total(config, tokens, a, checkpointing=True, every=1)
    per_block = mp.block_activation_bytes(config, a) * tokens
    head = mp.head_activation_bytes(config, a) * tokens
    assert recompute == 0 and full == 6 * per_block + head
    assert ckpt == 6 * 4 * config.n_embd * tokens + head and ckpt_recompute == per_block
    half, _ = mp.activation_total(config, tokens, a, checkpointing=True, every=2)  # blocks 0, 2, 4
    assert half == 3 * per_block + 3 * 4 * config.n_embd * tokens + head


# ----------------------------------------------------------------------------- model states vs DeepSpeed
def test_zero_model_states_agree_with_deepspeeds_estimators() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params = mp.param_counts(ModelConfig.from_name("mf_base"))
    p = params.total
    for gpus in (1, 8):
        for offload in (False, True):
            layout = mp.Layout(strategy="deepspeed", precision="bf16-mixed", world_size=gpus, zero_stage=2,
                               offload_optimizer=offload)
            states = mp.model_states(params, layout)
            _, gpu = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=gpus, cpu_offload=offload)
            assert states.weights + states.gradients + states.optimizer_states == pytest.approx(gpu, abs=16)
        layout = mp.Layout(strategy="deepspeed", precision="bf16-mixed", world_size=gpus, zero_stage=3)
        states = mp.model_states(params, layout)
        gpu = estimate_zero3_model_states_mem_needs(p, params.largest, num_gpus_per_node=gpus,
                                                    cpu_offload=False)[1]
        sharded = states.weights + states.gradients + states.optimizer_states
        # DeepSpeed's ZeRO-3 estimate (18 bytes/param / GPUs + the largest layer) leaves out the 16-bit
        # weight partition itself (2 bytes/param / GPUs), which its ZeRO-2 estimate counts in full
        assert sharded == pytest.approx(gpu - 4 * params.largest + 2 * p / gpus, abs=16)


def test_without_deepspeed_every_device_holds_16_bytes_per_parameter() -> None:
    params = mp.param_counts(ModelConfig.from_name("pythia_70m"))
    model = LanguageModel(ModelConfig.from_name("pythia_70m"))
    assert params.total == sum(p.numel() for p in model.parameters())
    for layout in (mp.Layout(), mp.Layout(strategy="ddp", world_size=8, precision="bf16-mixed")):
        states = mp.model_states(params, layout)
        assert states.weights + states.gradients + states.optimizer_states == 16 * params.total


# ----------------------------------------------------------------------------- batch arithmetic
def test_default_config_keeps_16_by_1() -> None:
    for overrides in ((), ("experiment=nano_cpu",)):
        plan = check_config(_compose(*overrides))
        assert (plan.micro_batch_size, plan.accumulate, plan.world_size) == (16, 1, 1)
        assert plan.memory["micro_batch_size"] == 16 and plan.memory["accumulate_grad_batches"] == 1


def test_accumulation_is_derived_from_the_micro_batch() -> None:
    plan = check_config(_compose("micro_batch_size=4"))
    assert (plan.micro_batch_size, plan.accumulate) == (4, 4)
    stated = ("micro_batch_size=2", "trainer.devices=2", "trainer.accumulate_grad_batches=4")
    plan = check_config(_compose(*stated))
    assert (plan.micro_batch_size, plan.accumulate) == (2, 4)  # a stated value that agrees is fine


def test_accelerator_auto_is_resolved_once_to_the_device_lightning_will_use(monkeypatch) -> None:
    from memoryformer.training.run import trainer_kwargs

    # no CUDA here: Lightning's auto trains on the CPU, so the plan uses CPU kernels and the host's RAM
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _compose("experiment=nano_cpu", "trainer=gpu", "trainer.accelerator=auto")
    plan = check_config(cfg)
    assert plan.memory["layout"]["device"] == "cpu" and plan.memory["device_memory_source"] == "host RAM"
    assert trainer_kwargs(plan)["accelerator"] == "cpu"
    # with CUDA: the same key gives CUDA kernels and the GPU's own memory, read in one place
    gpu = type("Props", (), {"total_memory": 80 * GB, "name": "Fake GPU"})()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    plan = check_config(cfg)
    assert plan.memory["layout"]["device"] == "cuda" and plan.memory["device_memory_source"] == "Fake GPU"
    assert trainer_kwargs(plan)["accelerator"] == "cuda"


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (("micro_batch_size=0",), ["micro_batch_size=0", "micro_batch_size=1 or more"]),
        (("micro_batch_size=3",), ["global_batch_size=16", "3 x 1 = 3", "divides 16"]),
        (("micro_batch_size=4", "trainer.accumulate_grad_batches=2"),
         ["trainer.accumulate_grad_batches=2", "= 4", "micro_batch_size=8"]),
        (("device_memory_gb=-1",), ["device_memory_gb=-1", "device_memory_gb=80"]),
        (("experiment=mf_tiny", "trainer=gpu", "data=sample"),
         ["micro_batch_size=auto", "device_memory_gb=N"]),
    ],
    ids=["zero", "not-dividing", "disagreeing-accumulation", "negative-memory", "auto-without-a-gpu"],
)
def test_bad_batch_settings_are_one_sentence(overrides: tuple, needles: list[str]) -> None:
    if "trainer=gpu" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so auto can read its memory")
    with pytest.raises(ConfigError) as err:
        check_config(_compose(*overrides))
    message = str(err.value)
    assert "\n" not in message and message.endswith(".")
    for needle in needles:
        assert needle in message, (needle, message)


def _plan(micro: int, **layout) -> mp.MemoryPlan:
    config = ModelConfig.from_name("mf_tiny")
    return mp.plan_memory(config, 2048, micro, mp.Layout(precision="bf16-mixed", **layout), accumulate=2)


def test_auto_takes_the_largest_micro_batch_that_fits_with_headroom() -> None:
    plan = check_config(_compose("experiment=mf_tiny", "trainer=gpu", "device_memory_gb=80", "dry_run=true"))
    micro, device = plan.micro_batch_size, 80 * GB
    assert micro * plan.accumulate == 1024
    assert _plan(micro).peak_bytes <= 0.9 * device < _plan(2 * micro).peak_bytes
    assert plan.memory["memory_gib"] == pytest.approx(_plan(micro).peak_bytes / 2**30, abs=1e-3)


def test_a_plan_larger_than_the_device_names_the_micro_batch_that_fits() -> None:
    fits = max(m for m in (1, 2, 4, 8, 16, 32, 64) if _plan(m).peak_bytes <= 24 * GB)
    cfg = _compose("experiment=mf_tiny", "trainer=gpu", "device_memory_gb=24", "dry_run=true",
                   "micro_batch_size=64")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert f"set micro_batch_size={fits} (the largest that fits)" in message
    assert f"needs {_plan(64).memory_gib:.1f} GiB" in message
    for option in ("activation_checkpointing=true", "deepspeed_zero2", "more devices"):
        assert option in message


# ----------------------------------------------------------------------------- the paper's experiments
def _sweep_points(name: str) -> list[list[str]]:
    """The Hydra sweep of experiment `name` as override lists (one empty list when it has no sweep)."""
    params = OmegaConf.load(CONF / "experiment" / f"{name}.yaml").get("hydra", {}).get("sweeper", {})
    points: list[list[str]] = [[]]
    for key, values in (params.get("params") or {}).items():
        if key.startswith("optim."):
            continue  # no effect on memory
        points = [[*p, f"{key}={v}"] for p in points for v in str(values).split(",")]
    return points


PAPER_EXPERIMENTS = sorted(
    p.stem for p in (CONF / "experiment").glob("*.yaml")
    if p.stem not in ("nano_cpu", "smoke", "paper_recipe")
)
#: MF-base's 6.75B parameters need sharding (conf/experiment/mf_base.yaml, README troubleshooting).
MF_BASE_TRAINERS = {1: "deepspeed_zero2_offload", 8: "deepspeed_zero3"}


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_every_paper_experiment_fits_80gb_devices(experiment: str, devices: int) -> None:
    trainer = MF_BASE_TRAINERS[devices] if experiment == "mf_base" else ("gpu" if devices == 1 else "ddp")
    for point in _sweep_points(experiment):
        cfg = _compose(f"experiment={experiment}", f"trainer={trainer}", f"trainer.devices={devices}",
                       "device_memory_gb=80", "dry_run=true", *point)
        assert cfg.micro_batch_size == "auto"
        plan = check_config(cfg)
        summary = plan.memory
        assert summary["memory_gib"] <= 0.9 * summary["device_memory_gib"], (point, summary)
        assert plan.micro_batch_size * plan.accumulate * devices == 1024


def test_mf_base_does_not_fit_one_80gb_gpu_unsharded() -> None:
    with pytest.raises(ConfigError, match="even a micro-batch of 1 does not fit"):
        check_config(_compose("experiment=mf_base", "trainer=gpu", "device_memory_gb=80", "dry_run=true"))


@pytest.mark.slow
def test_dry_run_writes_plan_json_without_data(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PILE_DIR", "PILE_TOKENIZER")}
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        # the README's eight-GPU line (every documented command is planned by tests/test_doc_commands.py)
        [sys.executable, "train.py", "experiment=mf_tiny", "data=pile_pythia", "trainer=deepspeed_zero2",
         "trainer.devices=8", "dry_run=true", "device_memory_gb=80",
         f"hydra.run.dir={run_dir}", "print_config=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    for key in ("micro_batch_size", "accumulate_grad_batches", "devices", "num_nodes", "device_memory_gib",
                "memory_gib", "breakdown"):
        assert key in plan
    assert plan["devices"] == 8 and plan["memory_gib"] <= plan["device_memory_gib"]
    for key in ("weights", "gradients", "optimizer_states", "activations", "logits_and_loss"):
        assert key in plan["breakdown"]
    assert not (run_dir / "checkpoints").exists()  # nothing trained, nothing saved
    assert "Memory plan: micro-batch" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- against a real step
@pytest.mark.slow
def test_plan_is_within_25_percent_of_a_measured_cpu_step() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory_plan

    for shape in (dict(block="pythia", micro=8, checkpointing=False),
                  dict(block="memoryformer", micro=4, checkpointing=True)):
        planned, _ = bench_memory_plan.planned_bytes(shape)
        measured = bench_memory_plan.measure(shape)
        assert planned == pytest.approx(measured, rel=0.25), shape


def test_plan_counts_the_bounded_lookup_backward_on_cuda_only() -> None:
    # MF-tiny at 128 x 2048 tokens: the largest of its three Memory Layers' bounded backward (one chunk's
    # workspace, at most LOOKUP_BACKWARD_BOUND, and two fp32 table-sized buffers); PyTorch's own backward
    # would take ~104 GB for the Q/K/V layer alone
    config, tokens = ModelConfig.from_name("mf_tiny"), 128 * 2048
    shapes = [(64, 64 * 256, 1536), (64, 64 * 256, 640), (64, 64 * 1024, 512)]  # (K, rows, width)
    want = max(memory_ops.lookup_backward_bytes(tokens, k, width, rows) for k, rows, width in shapes)
    cuda = mp.plan_memory(config, 2048, 128, mp.Layout(precision="bf16-mixed", device="cuda"), accumulate=8)
    assert cuda.breakdown["lookup_backward"] == want
    assert want < memory_ops.LOOKUP_BACKWARD_BOUND + 2 * 4 * 64 * 1024 * 512
    assert memory_ops.unbounded_lookup_backward_bytes(tokens, 64, 1536) > 100 * GB
    cpu = mp.plan_memory(config, 2048, 128, mp.Layout(precision="bf16-mixed", device="cpu"), accumulate=8)
    assert cpu.breakdown["lookup_backward"] == 0  # the C++ kernel's backward has no per-index workspace
    pythia = mp.plan_memory(ModelConfig.from_name("pythia_410m"), 2048, 16,
                            mp.Layout(precision="bf16-mixed", device="cuda"), accumulate=64)
    assert pythia.breakdown["lookup_backward"] == 0


def test_zero3_plan_counts_one_chunk_of_logits() -> None:
    # the loss runs inside the LM head's forward, which ZeRO-3 gathers the head around (ChunkedLossHead)
    config, tokens = ModelConfig.from_name("mf_base"), 8 * 2048
    layout = mp.Layout(strategy="deepspeed", precision="bf16-mixed", world_size=8, zero_stage=3)
    plan = mp.plan_memory(config, 2048, 8, layout, accumulate=16)
    v, d = config.vocab_size, config.n_embd
    kept = 4 * v * d + 4 * tokens * d  # fp32 gradients of the head and of the hidden states
    one_chunk = 1024 * v * (2 + 4 + 4)  # bf16 matmul out, fp32 copy, fp32 gradient
    assert plan.breakdown["logits_and_loss"] in (kept, kept + one_chunk)
    assert plan.breakdown["logits_and_loss"] < 3 * 4 * tokens * v / 10  # the whole fp32 logits: 9.2 GiB
