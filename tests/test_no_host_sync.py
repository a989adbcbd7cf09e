"""The model's training step reads no tensor value on the host: on a GPU each such read (`.item()`,
`bool(t)`, `if t:`, `int(t)`, `.tolist()`) waits for every queued kernel. On CPU we make those reads raise
and run forward + backward of every block and attention kind."""

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
