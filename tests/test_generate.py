"""generate.py and the sampler: streaming, greedy output of a model that learned a pattern, seeded
sampling, top-p, incremental decoding of multi-byte characters, and clean failures on bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import byte_tokenizer, save_tokenizer, tiny_model  # noqa: E402

from memoryformer.checkpoint import export_model  # noqa: E402
from memoryformer.config import ConfigError  # noqa: E402
from memoryformer.generation import GenerateConfig, IncrementalDecoder, run_generation  # noqa: E402
from memoryformer.models.language_model import _nucleus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PATTERN = "0123456789"


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny MemoryFormer trained until it continues the cycle 0123456789 (exported with its tokenizer)."""
    tmp = tmp_path_factory.mktemp("gen")
    tok = byte_tokenizer()
    stream = torch.tensor(tok.encode(PATTERN * 40).ids)
    model = tiny_model(seed=0, block_size=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(stream) - 33, (16,), generator=gen)
        batch = torch.stack([stream[s : s + 33] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, loss.item()
    return export_model(model.eval(), tmp / "model", tokenizer_path=str(save_tokenizer(tmp / "tok.json")))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_generate_py_prints_the_prompt_and_the_learned_continuation(trained_dir):
    proc = _run(f"checkpoint={trained_dir}", "prompt=3456", "greedy=true", "max_new_tokens=12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "3456" + "789012345678" + "\n"


def test_seeded_sampling_is_reproducible(trained_dir):
    def sample(seed: int) -> str:
        out = io.StringIO()
        cfg = GenerateConfig(checkpoint=str(trained_dir), prompt="12", temperature=3.0, top_k=50, top_p=0.95,
                             seed=seed, num_samples=2, max_new_tokens=16)
        run_generation(cfg, out)
        return out.getvalue()

    first = sample(5)
    assert first == sample(5)
    assert first.count("--- sample ") == 2 and first.count("\n12") == 2
    assert sample(6) != first  # temperature 3 flattens the learned distribution: seeds matter


def test_incremental_decoder_holds_back_split_characters():
    tok = byte_tokenizer()
    text = "aé東!"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: é is 2 tokens, 東 is 3
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(t) for t in ids]
    assert pieces == ["a", "", "é", "", "", "東", "!"]
    assert dec.flush() == ""
    dec = IncrementalDecoder(tok)
    assert dec.push(ids[1]) == ""  # output that ends mid-character comes out, marked, at the end
    assert dec.flush() == "\ufffd"


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: (_nucleus(logits, p) > float("-inf"))[0].tolist()  # noqa: E731
    assert kept(0.75) == [True, True, False, False]  # 0.5 < 0.75 <= 0.5 + 0.3
    assert kept(0.4) == [True, False, False, False]  # the most likely token always stays
    assert kept(0.96) == [True, True, True, True]
    shuffled = logits[:, [2, 0, 3, 1]]  # the same distribution in another order
    assert (_nucleus(shuffled, 0.75) > float("-inf"))[0].tolist() == [False, True, False, True]


BAD = [
    (["checkpoint=/nonexistent/model", "prompt=x"], "does not exist"),
    (["checkpoint=TRAINED", "prompt="], "the prompt is empty"),
    (["checkpoint=TRAINED", "prompt=" + "x" * 65], "the prompt is 65 tokens but the model's context is 64"),
    (["checkpoint=TRAINED", "prompt=x", "temperature=-1"], "temperature=-1"),
    (["checkpoint=TRAINED", "prompt=x", "top_p=0"], "top_p=0"),
    (["checkpoint=TRAINED", "prompt=x", "top_p=1.5"], "top_p=1.5 must lie in (0, 1]"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m[:20] for _, m in BAD])
def test_bad_input_is_one_sentence_and_exit_2(trained_dir, args, message, capsys, monkeypatch):
    import runpy

    argv = [a.replace("TRAINED", str(trained_dir)) for a in args]
    monkeypatch.setattr(sys, "argv", ["generate.py", *argv])
    with pytest.raises(SystemExit) as exit_info:  # run as a script, in this process (a subprocess is slow)
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_misspelt_option_is_one_sentence_and_exit_2(capsys, monkeypatch):
    # a Hydra composition error, raised before the task runs: reports_user_errors, not Hydra's report
    import runpy

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # what the wrapper sets; restored after the test
    monkeypatch.setattr(sys, "argv", ["generate.py", "checkpoint=x", "prompt=y", "topp=0.9"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: Could not override 'topp'") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("prompt", "fix"), [("def main(", "prompt=\"'def main('\""), ("it's [1", 'prompt="\\"it\'s [1\\""')]
)
def test_unparsable_prompt_says_to_quote_it(prompt, fix, capsys, monkeypatch):
    # Hydra's grammar cannot read `(` or an open `[` in a bare value: the sentence shows the quoted form.
    import runpy

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["generate.py", "checkpoint=x", f"prompt={prompt}"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "generate.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == f"error: Hydra cannot parse the value of prompt={prompt}; quote it, e.g. {fix}.\n"


def test_bad_input_in_a_real_process_has_no_traceback():
    proc = _run("checkpoint=/nonexistent/model", "prompt=hello")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: checkpoint /nonexistent/model does not exist")


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="num_samples=0"):
        GenerateConfig(checkpoint="x", prompt="y", num_samples=0).validate()
    with pytest.raises(ConfigError, match=r"unknown option topp; known options are: checkpoint, device"):
        GenerateConfig.from_mapping({"checkpoint": "x", "prompt": "y", "topp": 0.9})
