"""Hugging Face export: the remote-code MemoryFormer loads without our package and computes our model.

The reference numbers come from our own `LanguageModel` (the package's implementation, tested elsewhere
against the paper's equations); the Hugging Face side runs in a subprocess where `import memoryformer`
is impossible, loading only the files the export wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import byte_tokenizer, save_tokenizer, tiny_config  # noqa: E402

from memoryformer.checkpoint import CheckpointError, export_model, load_model  # noqa: E402
from memoryformer.models import LanguageModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EOT_ID = 256  # <|endoftext|> in the byte tokenizer
#: Every option the Hugging Face modeling file implements, each differing from the default somewhere.
CONFIGS = {
    "released": dict(),
    "prob_nobias_e0": dict(weighting="prob", temperature=0.7, memory_bias=False, expand_bits=0),
    "linear_mlp_layernorm": dict(
        qkv="linear", ffn="mlp", norm="layernorm", intermediate_size=96, rotary_pct=0.5, layer_norm_eps=1e-6
    ),
    "tau4_e3": dict(code_length=4, num_tables=16, expand_bits=3, norm_eps=1e-6, rotary_base=500, n_layer=3),
}
SAMPLE_TEXT = "Hello, wörld! 東京 <|endoftext|> tabs\tand\nnewlines"


def random_model(seed: int = 0, **overrides) -> LanguageModel:
    """A tiny MemoryFormer whose biases and norm scales are random too (init sets them near 0 and 1)."""
    torch.manual_seed(seed)
    model = LanguageModel(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


BLOCKED_SCRIPT = r'''
import importlib.abc, json, sys


class BlockMemoryformer(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "memoryformer" or name.startswith("memoryformer."):
            raise ImportError("the memoryformer package is blocked in this test")
        return None


sys.meta_path.insert(0, BlockMemoryformer())
try:
    import memoryformer  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("memoryformer is importable; the test would prove nothing")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

job = json.load(open(sys.argv[1]))
ids = load_file(job["ids"])["ids"]
out = {}
for name, d in job["dirs"].items():
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, local_files_only=True).eval()
    assert type(model).__name__ == "MemoryFormerForCausalLM", type(model)
    with torch.no_grad():
        out["logits_" + name] = model(ids).logits
    if name == job["generate_with"]:
        prompt = ids[:1, : job["prompt_len"]]
        kw = dict(max_new_tokens=job["new_tokens"], do_sample=False)
        out["greedy_cached"] = model.generate(prompt, use_cache=True, **kw)
        out["greedy_uncached"] = model.generate(prompt, use_cache=False, **kw)
        tok = AutoTokenizer.from_pretrained(d)
        enc = tok(job["text"])["input_ids"]
        out["tok_ids"] = torch.tensor(enc)
        meta = dict(decoded=tok.decode(enc), eos=tok.eos_token, bos=tok.bos_token, pad=tok.pad_token,
                    eos_id=tok.eos_token_id)
        json.dump(meta, open(job["tok_out"], "w"))
save_file({k: v.contiguous() for k, v in out.items()}, job["out"])
'''


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every config in CONFIGS, run the blocked subprocess once; returns (models, dirs, results)."""
    tmp = tmp_path_factory.mktemp("hf")
    tok = save_tokenizer(tmp / "tok.json")
    models, dirs = {}, {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        models[name] = random_model(seed=i, **overrides)
        dirs[name] = str(export_model(models[name], tmp / name, tokenizer_path=str(tok)))
    ids = torch.randint(0, 260, (3, 40), generator=torch.Generator().manual_seed(0))
    save_file({"ids": ids}, str(tmp / "ids.safetensors"))
    job = dict(dirs=dirs, ids=str(tmp / "ids.safetensors"), generate_with="released", prompt_len=6,
               new_tokens=20, text=SAMPLE_TEXT, out=str(tmp / "out.safetensors"),
               tok_out=str(tmp / "tok_meta.json"))
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "run.py").write_text(BLOCKED_SCRIPT)
    work = tmp / "cwd"  # outside the repository, so the repo is not on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"))
    proc = subprocess.run([sys.executable, str(tmp / "run.py"), str(tmp / "job.json")], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = load_file(job["out"])
    results["tok_meta"] = json.loads(Path(job["tok_out"]).read_text())
    return models, dirs, ids, results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_logits_equal_ours_without_the_package(exported, name):
    models, _, ids, results = exported
    with torch.no_grad():
        ours = models[name](ids)[0]
    theirs = results["logits_" + name]
    diff = float((ours - theirs).abs().max())
    print(f"{name}: max |logit difference| = {diff:.2e}")
    assert diff <= 1e-5


def test_hf_greedy_generation_equals_ours_and_the_cache_changes_nothing(exported):
    models, _, ids, results = exported
    prompt = ids[:1, :6]
    ours = models["released"].generate(prompt, 20, greedy=True, eos_token_id=EOT_ID)
    assert results["greedy_cached"].tolist() == ours.tolist()
    assert results["greedy_uncached"].tolist() == results["greedy_cached"].tolist()
    assert ours.shape[1] > 6 + 1  # it really generated


def test_auto_tokenizer_round_trips_and_knows_its_special_tokens(exported):
    _, _, _, results = exported
    meta = results["tok_meta"]
    assert meta["decoded"] == SAMPLE_TEXT
    assert results["tok_ids"].tolist() == byte_tokenizer().encode(SAMPLE_TEXT).ids
    assert meta["eos"] == meta["bos"] == meta["pad"] == "<|endoftext|>" and meta["eos_id"] == EOT_ID


def test_export_dir_is_hugging_face_layout_without_pickles(exported):
    _, dirs, _, _ = exported
    d = Path(dirs["released"])
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "configuration_memoryformer.py", "generation_config.json", "model.safetensors",
        "modeling_memoryformer.py", "tokenizer.json", "tokenizer_config.json",
    ]
    for p in d.iterdir():  # pickle streams start with 0x80 (protocol >= 2); torch.save files are zips
        assert p.read_bytes()[:2] not in (b"PK",) and p.read_bytes()[:1] != b"\x80", p.name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "memoryformer" and cfg["architectures"] == ["MemoryFormerForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_memoryformer.MemoryFormerForCausalLM"
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == EOT_ID


def test_round_trip_through_our_loader_is_exact(exported):
    models, dirs, _, _ = exported
    for name, d in dirs.items():
        loaded, tok = load_model(d)
        assert tok == str(Path(d) / "tokenizer.json")
        assert loaded.config.to_dict() == {**models[name].config.to_dict(), "memory_impl": "auto"}
        want, got = models[name].state_dict(), loaded.state_dict()
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (name, key)


# ------------------------------------------------------------ in-process, with the package's copy of the file
def test_left_padded_batches_and_cached_generation_match_unpadded_rows(exported):
    from memoryformer.hf.modeling_memoryformer import MemoryFormerForCausalLM

    models, dirs, _, _ = exported
    hf = MemoryFormerForCausalLM.from_pretrained(dirs["released"]).eval()
    short, long = [5, 17, 99, 3], [8, 1, 200, 42, 7, 6]
    batch = torch.tensor([[EOT_ID, EOT_ID, *short], long])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        padded = hf(batch, attention_mask=mask).logits
        alone = models["released"](torch.tensor([short]))[0]
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=0, atol=1e-5)
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for row, prompt in ((0, short), (1, long)):
        ours = models["released"].generate(torch.tensor([prompt]), 8, greedy=True)
        assert out[row, 6:].tolist() == ours[0, len(prompt) :].tolist()


def test_pythia_exports_as_plain_gpt_neox(tmp_path):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = LanguageModel(tiny_config(block="pythia")).eval()
    out = export_model(model, tmp_path / "p", tokenizer_path=str(save_tokenizer(tmp_path / "t.json")))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt_neox" and "auto_map" not in cfg
    assert not any(p.suffix == ".py" for p in out.iterdir())
    hf = GPTNeoXForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 260, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=0, atol=1e-5)
    loaded, _ = load_model(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_strict_export_refuses_a_setting_the_hf_file_does_not_implement(tmp_path, monkeypatch):
    from memoryformer.hf import config_map

    with pytest.raises(CheckpointError, match=r"model\.parallel_residual=False is not implemented by"):
        export_model(LanguageModel(tiny_config(parallel_residual=False)), tmp_path / "a", strict=True)
    # A field missing from HF_FIELDS (as a newly added ModelConfig field would be) must sit at its default.
    monkeypatch.delitem(config_map.HF_FIELDS, "qkv")
    export_model(LanguageModel(tiny_config()), tmp_path / "b", strict=True)  # qkv at its default: fine
    with pytest.raises(CheckpointError, match=r"model\.qkv='linear' is not implemented.*default 'memory'"):
        export_model(LanguageModel(tiny_config(qkv="linear")), tmp_path / "c", strict=True)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(memory_block_activation="gelu"),
        dict(attention="cosformer"),
        dict(block="pythia", attention="performer"),
    ],
)
def test_a_model_hf_cannot_run_exports_in_our_own_format_and_loads_back(tmp_path, overrides):
    # Training ends with an export: a Table 2 or Table 6 model must still export (and evaluate), not crash.
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(**overrides)).eval()
    with pytest.warns(RuntimeWarning, match="own format, not as a Hugging Face model"):
        out = export_model(model, tmp_path / "x")
    assert "model" in json.loads((out / "config.json").read_text())
    loaded, _ = load_model(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------ python -m memoryformer.export
def _lightning_ckpt(model: LanguageModel, path: Path, tokenizer: Path) -> Path:
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": model.config.to_dict(), "tokenizer_path": str(tokenizer)},
        },
        path,
    )
    return path


def test_export_cli_from_a_lightning_ckpt_keeps_weights_and_tokenizer(tmp_path, capsys):
    from memoryformer.export import main

    model = random_model(seed=7)
    ckpt = _lightning_ckpt(model, tmp_path / "last.ckpt", save_tokenizer(tmp_path / "tok.json"))
    main([f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}"])
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    loaded, _ = load_model(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_export_cli_bad_arguments_are_one_sentence(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, message in (
        ([f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path / 'o'}"], "does not exist"),
        (["checkpoint=x"], "out= is required"),
        (["ckpt=x", "out=y"], "is not one of checkpoint="),
    ):
        proc = subprocess.run([sys.executable, "-m", "memoryformer.export", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1


@pytest.mark.slow  # a real ZeRO-2 checkpoint written by DeepSpeed in a subprocess
def test_export_from_a_real_deepspeed_checkpoint_directory(tmp_path, free_port):
    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_checkpoint import DS_SAVE_SCRIPT

    from memoryformer.export import export

    script = tmp_path / "save.py"
    script.write_text(DS_SAVE_SCRIPT)
    ds = tmp_path / "epoch=0-step=1.ckpt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(ds)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = torch.load(ds / "expected.pt")
    (ds / "expected.pt").unlink()
    out = export(str(ds), str(tmp_path / "hf"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "memoryformer"
    loaded, _ = load_model(out)
    assert set(loaded.state_dict()) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_self_contained_hf_config_copies_the_package_choices():
    # configuration_memoryformer.py may import only transformers, so it carries copies of these tuples.
    from memoryformer import config
    from memoryformer.hf import configuration_memoryformer as hf

    assert hf.NORMS == config.NORM_TYPES
    assert hf.QKV == config.QKV_TYPES
    assert hf.FFNS == config.FFN_TYPES
    assert hf.WEIGHTINGS == config.WEIGHTINGS
