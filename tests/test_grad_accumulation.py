"""Gradients added up over 64 micro-batches under bf16, against a float64 sum (issue #29).

DeepSpeed adds micro-batches up in the model's dtype unless `data_types.grad_accum_dtype` says otherwise, so
its bf16 engines would round the running sum to 8 bits of mantissa at every micro-batch; the trainer YAMLs
ask for fp32 (`bf16_data_types`, copied by `strategy.deepspeed_config`). Lightning's own `bf16-mixed`
(autocast) keeps fp32 parameters, and autograd adds each micro-batch's gradient into their fp32 `.grad`.

The inputs make every micro-batch's gradient exact in bf16 (bf16 inputs times +-1 / 64), so an fp32 sum of
64 of them is exact too: what is left is the error of the accumulation alone.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from memoryformer.conf_schema import register_configs
from memoryformer.training import sizing as mp
from memoryformer.training.parallel import deepspeed_config, use_deepspeed_cpu_accelerator

ROOT = Path(__file__).resolve().parents[1]
register_configs()
MICRO_BATCHES, IN, OUT = 64, 48, 24


def _micro_batches() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs `[64, 1, 48]` and output weights `[64, 1, 24]` (all +1: the micro-batches' gradients point the
    same way, as consecutive micro-batches' do), both bf16, and the float64 sum of the gradients of
    `(x W^T * s).sum() / 64` w.r.t. W over the micro-batches, `[24, 48]`."""
    gen = torch.Generator().manual_seed(1)
    xs = (1.0 + torch.rand(MICRO_BATCHES, 1, IN, generator=gen)).bfloat16()
    ss = torch.ones(MICRO_BATCHES, 1, OUT).bfloat16()
    want = torch.einsum("mo,mi->oi", ss[:, 0].double(), xs[:, 0].double()) / MICRO_BATCHES
    return xs, ss, want


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _trainer_yaml(name: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/tmp/mf_accum_test", f"trainer={name}"])
    return OmegaConf.to_container(cfg.trainer, resolve=True)


def _one_rank_gloo(monkeypatch: pytest.MonkeyPatch, port: int):
    """deepspeed on its CPU accelerator with a one-rank gloo group (kept if an earlier test made one)."""
    use_deepspeed_cpu_accelerator()
    import deepspeed
    import torch.distributed as dist

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():  # the engine reads them
        monkeypatch.setenv(key, value)
    if not dist.is_initialized():
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def _accumulate(deepspeed, config: dict):
    """A DeepSpeed engine for a bias-free bf16 linear layer under `config`, after the backward of 64
    micro-batches (not the last step): the engine and the relative error of the gradient the optimizer would
    step, against the float64 sum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(IN, OUT, bias=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      config=config)
    xs, ss, want = _micro_batches()
    for i in range(MICRO_BATCHES):
        engine.backward((engine(xs[i]) * ss[i]).sum())
        if i < MICRO_BATCHES - 1:  # the last one's step would apply the gradient
            engine.step()
    from deepspeed.utils import safe_get_full_grad

    return engine, _relative(safe_get_full_grad(engine.module.weight), want)


# ~2-6 s per trainer on 2 CPU cores (two DeepSpeed engines each)
@pytest.mark.parametrize(
    "name", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero2_offload"]
)
def test_deepspeed_bf16_accumulates_64_micro_batches_in_fp32(name: str, monkeypatch, free_port) -> None:
    trainer = _trainer_yaml(name)
    stage = trainer["strategy"]["config"]["zero_optimization"]["stage"]
    deepspeed = _one_rank_gloo(monkeypatch, free_port)
    config = deepspeed_config(trainer["strategy"], "bf16-mixed")
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    # what Lightning adds from the Trainer (batch, accumulation, bf16); torch's AdamW on CPU
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=MICRO_BATCHES,
                  bf16={"enabled": True}, zero_force_ds_cpu_optimizer=False)
    default = {k: v for k, v in config.items() if k != "data_types"}
    bf16_engine, bf16_err = _accumulate(deepspeed, default)
    bf16_engine.destroy()
    engine, err = _accumulate(deepspeed, config)
    print(f"{name}: relative error {err:.2e} with fp32 accumulation, {bf16_err:.2e} with DeepSpeed's default")
    assert bf16_err > 2.0**-9  # bf16 adding-up: a rounding per micro-batch
    if stage == 1:
        # BF16_Optimizer adds up in fp32, then all-reduces the sum once in bf16 (communication_data_type's
        # default): one rounding, 2^-9 relative at most, not one per micro-batch
        assert err <= 2.0**-9, err
    else:  # each micro-batch is reduced (bf16: exact here) and added into an fp32 partition
        assert err <= 1e-6, err

    # the memory plan counts the fp32 buffers DeepSpeed allocated for it
    p = IN * OUT
    layout = mp.layout_from_trainer({**trainer, "precision": "bf16-mixed"}, world_size=1)
    assert layout.grad_accum_fp32 and layout.zero_stage == stage
    states = mp.model_states(mp.ParamCounts(p, p, p), layout)
    optimizer = engine.optimizer
    if stage == 1:
        fp32 = sum(t.numel() * t.element_size() for t in optimizer.fp32_groups_gradients_flat)
        allocated = fp32 + engine.module.weight.grad.numel() * 2  # and the bf16 gradients themselves
    elif stage == 2:
        allocated = sum(g.flat_partition.numel() * g.flat_partition.element_size()
                        for g in optimizer.averaged_gradients.values())
    else:
        buffer = optimizer.grad_partitions_flat_buffer
        allocated = buffer.numel() * buffer.element_size()
    assert states.gradients == allocated, (states.gradients, allocated)
    if layout.offload_optimizer:  # the host's fp32 gradient, master weights and moments: 16 bytes / param
        host_grads = sum(t.grad.numel() * 4 for t in optimizer.single_partition_of_fp32_groups)
        assert host_grads == 4 * p and states.host_offload == 16 * p
    engine.destroy()


class _Linear(L.LightningModule):
    """One bias-free linear layer; records its weight's gradient before the optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(IN, OUT, bias=False)
        self.grad: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        x, s = batch
        return (self.layer(x) * s).sum()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grad = self.layer.weight.grad.detach().clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_bf16_mixed_accumulates_64_micro_batches_in_fp32() -> None:
    xs, ss, want = _micro_batches()
    data = torch.utils.data.DataLoader(list(zip(xs[:, 0].float(), ss[:, 0].float(), strict=True)),
                                       batch_size=1)
    module = _Linear()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1,
                        accumulate_grad_batches=MICRO_BATCHES, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    # autocast computes each micro-batch's gradient in bf16; the fp32 parameter's .grad adds them up in fp32
    err = _relative(module.grad, want)
    print(f"Lightning bf16-mixed: relative error {err:.2e}")
    assert module.grad.dtype == torch.float32 and err <= 1e-6
