"""The model's training step reads no tensor value on the host: on a GPU each such read (`.item()`,
`bool(t)`, `if t:`, `int(t)`, `.tolist()`) waits for every queued kernel. On CPU we make those reads raise
and run forward + backward of every block and attention kind; and a whole run through `train(cfg)` with the
default callbacks, progress bar on, reads only at the logging cadence."""

import pytest
import torch

from memoryformer.models import build_model
from memoryformer.models.attention_cores import ATTENTION_CORES

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@pytest.fixture
def no_host_reads(monkeypatch):
    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} in the training step: a device-to-host sync on a GPU")
        return read

    yield lambda: [monkeypatch.setattr(torch.Tensor, name, refuse(name)) for name in READS]


@pytest.mark.parametrize("overrides", [dict(block="memoryformer"), dict(block="pythia")]
                         + [dict(attention=name) for name in ATTENTION_CORES if name != "softmax"])
def test_training_step_never_reads_a_tensor_on_the_host(overrides, no_host_reads):
    torch.manual_seed(0)
    model = build_model("nano", n_layer=1, vocab_size=97, block_size=32, **overrides).train()
    idx = torch.randint(0, 97, (2, 16))
    targets = idx.clone()
    targets[0, :3] = -100
    model.begin_training_step(0)
    no_host_reads()
    _, loss = model(idx, targets)
    loss.backward()
    assert model.wte.weight.grad is not None and model.lm_head.weight.grad is not None


# ----------------------------------------------------------------------------- a whole run, bar on
class _BatchWindow:
    """Which training micro-batch is running: `key` is (optimizer step, micro-batch of that step) from the
    first callback's `on_train_batch_start` to the last callback's `on_train_batch_end`, else None."""

    def __init__(self) -> None:
        self.key = None
        self.micro = 0
        self.last_step = -1

    def callbacks(self):
        import lightning as L

        window = self

        class Start(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                step = trainer.global_step
                window.micro = window.micro + 1 if step == window.last_step else 0
                window.last_step = step
                window.key = (step, window.micro)

        class End(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                window.key = None

        return Start(), End()


def test_default_progress_bar_reads_metrics_at_the_logging_cadence_only(tmp_path, monkeypatch):
    # 6 optimizer steps of 4 micro-batches, logging every 3 steps, the default callbacks (Rich's bar on):
    # a host read may happen only in a micro-batch where something is due at that cadence, never in the
    # others (on a GPU each read waits for all queued kernels)
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs
    from memoryformer.training import run as run_module

    register_configs()
    root = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=nano_cpu", "model.n_layer=1", "data.seq_len=32", "data.val_samples=8",
            "global_batch_size=4", "micro_batch_size=1", "trainer.max_steps=6", "trainer.log_every_n_steps=3",
            "val_every_n_steps=null", "validate_at_start=false", "bucket_stats_every_n_steps=0",
            "ckpt_every_n_steps=null", "trainer.enable_progress_bar=true",
            "trainer.enable_model_summary=false", "print_config=false", "export_final=false",
            f"paths.output_dir={tmp_path}", f"paths.runs_root={tmp_path}"])
    assert "progress_bar" in cfg.callbacks and cfg.callbacks.progress_bar is not None
    window = _BatchWindow()
    build = run_module.build_callbacks
    monkeypatch.setattr(run_module, "build_callbacks",
                        lambda plan: [window.callbacks()[0], *build(plan), window.callbacks()[1]])
    reads: dict[tuple[int, int], list[str]] = {}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def record(self, *args, _name=name, _real=real, **kwargs):
            if window.key is not None:
                reads.setdefault(window.key, []).append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, record)
    run_module.train(cfg)
    # due: the bar's first numbers (step 0, micro-batch 0); then the micro-batches that complete optimizer
    # steps 3 and 6 (steps 2 and 5, micro-batch 3), where Lightning logs, the module checks the queued
    # losses and gradient norms, and the bar and LossPrinter read the step count's new multiple of 3
    due = {(0, 0), (2, 3), (5, 3)}
    assert set(reads) <= due, {k: v for k, v in reads.items() if k not in due}
    assert (0, 0) in reads and reads.get((2, 3)), reads  # the bar still reads its numbers
