"""Checkpoint loading: exported dirs, Lightning .ckpt files and DeepSpeed dirs give the same model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import save_tokenizer, tiny_model  # noqa: E402

from memoryformer import checkpoint as ck  # noqa: E402
from memoryformer.checkpoint import CheckpointError, export_model, load_model  # noqa: E402

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def _lightning_ckpt(model, path: Path, **hparams) -> Path:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "epoch": 0,
            "global_step": 10,
            "hyper_parameters": {"model": model.config.to_dict(), **hparams},
        },
        path,
    )
    return path


def test_export_and_load_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=1)
    tok = save_tokenizer(tmp_path / "tok.json")
    out = export_model(model, tmp_path / "export", tokenizer_path=str(tok))
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "memoryformer" and meta["num_hidden_layers"] == 2
    loaded, tok_path = load_model(out)
    assert tok_path == str(out / "tokenizer.json")
    assert not loaded.training
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_the_earlier_export_format_still_loads(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(seed=5)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_tokenizer(legacy / "tokenizer.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(legacy / "model.safetensors"))
    meta = {"model": model.config.to_dict(), "tokenizer": "tokenizer.json"}
    (legacy / "config.json").write_text(json.dumps(meta))
    loaded, tok_path = load_model(legacy)
    assert tok_path == str(legacy / "tokenizer.json")
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_lightning_ckpt_loads_the_same_weights(tmp_path):
    model = tiny_model(seed=2)
    path = _lightning_ckpt(model, tmp_path / "last.ckpt", tokenizer_path="/somewhere/tok.json")
    loaded, tok_path = load_model(path)
    assert tok_path == "/somewhere/tok.json"
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_deepspeed_dir_is_consolidated_through_lightning(tmp_path, monkeypatch):
    model = tiny_model(seed=3)
    ds = tmp_path / "epoch=0-step=10.ckpt"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    # Consolidation itself is DeepSpeed's; we check what we do with its output (Lightning's layout).
    consolidated = {
        "state_dict": {f"model.{k}": v.float() for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": model.config.to_dict()},
    }
    fake = lambda d, trust=False: consolidated if d == ds else None  # noqa: E731
    monkeypatch.setattr(ck, "_consolidate_deepspeed", fake)
    loaded, _ = load_model(ds)
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_deepspeed_dir_without_deepspeed_says_how_to_install(tmp_path, monkeypatch):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "latest").write_text("global_step1")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(CheckpointError, match=r"pip install memoryformer\[deepspeed\]"):
        load_model(ds)


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist; pass checkpoint=PATH"):
        load_model(tmp_path / "nope")


def test_config_that_does_not_match_the_weights_is_one_clear_sentence(tmp_path):
    out = export_model(tiny_model(), tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    meta["vocab_size"] = 300
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"do not match its model config.*lm_head\.weight \(260, 64\) vs \(300, 64\)"
    ):
        load_model(out)
    meta["vocab_size"] = 260
    meta["num_hidden_layers"] = 3
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"weight\(s\) missing, e\.g\. blocks\.2\."):
        load_model(out)


def test_lightning_ckpt_without_model_config_is_one_clear_sentence(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model.wte.weight": torch.zeros(2, 2)}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointError, match=r"no hyper_parameters\['model'\]"):
        load_model(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint"):
        load_model(path)


def test_adapter_loads_a_lightning_ckpt_with_its_tokenizer(tmp_path):
    from memoryformer.evaluation.lm_adapter import MemoryFormerLM

    model = tiny_model(seed=4)
    tok = save_tokenizer(tmp_path / "tok.json")
    path = _lightning_ckpt(model, tmp_path / "m.ckpt", tokenizer_path=str(tok))
    lm = MemoryFormerLM.create_from_arg_string(f"checkpoint={path}", {"batch_size": 2, "device": "cpu"})
    torch.testing.assert_close(_logits(lm.model), _logits(model), rtol=0, atol=0)


DS_SAVE_SCRIPT = """
import sys, torch, deepspeed
from torch import nn
from memoryformer.models import build_model

out = sys.argv[1]
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)


class Wrapper(nn.Module):
    # Lightning's DeepSpeedStrategy wraps the LightningModule (whose plain model is `self.model`) in a
    # module whose child is `_forward_module`; parameter names are `_forward_module.model.<key>`.
    def __init__(self):
        super().__init__()
        self._forward_module = nn.Module()
        self._forward_module.model = build_model("nano", n_layer=1, block_size=32, vocab_size=256)


wrapper = Wrapper()
model = wrapper._forward_module.model
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2}}
# a torch optimizer, as Lightning passes one: DeepSpeed's own CPU Adam would compile a C++ op first
optimizer = torch.optim.AdamW(wrapper.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=wrapper, optimizer=optimizer, config=config)
x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
_, loss = model(x, x)
engine.backward(loss)
engine.step()
# what Lightning's DeepSpeedStrategy.save_checkpoint passes: the checkpoint dict minus state_dict/optimizer
client_state = {"epoch": 0, "global_step": 1, "hyper_parameters": {"model": model.config.to_dict()}}
engine.save_checkpoint(out, client_state=client_state, tag="checkpoint")
torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out + "/expected.pt")
"""


@pytest.mark.slow
def test_real_deepspeed_zero2_checkpoint_loads_with_the_trained_weights(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    import os
    import subprocess

    script = tmp_path / "save.py"
    script.write_text(DS_SAVE_SCRIPT)
    out = tmp_path / "epoch=0-step=1.ckpt"  # Lightning names the DeepSpeed checkpoint directory like a file
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.load(out / "expected.pt")
    (out / "expected.pt").unlink()
    loaded, tok = load_model(out)
    assert tok is None
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
