"""`make train`'s evaluation stage: the held-out task, its data export, and evaluate.py's `baseline=hf` path.

References are computed here, independently of the code under test: the validation documents are decoded
from the training corpus's own `val.bin` with its tokenizer; perplexities are `exp(-LL / count)` with LL the
float64 log-likelihood of rolling windows (lm-eval's wikitext definition) evaluated with the model directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import EOT, FIXTURES, byte_tokenizer, tiny_model  # noqa: E402

from memoryformer.data.indexed import MMapIndexedDataset  # noqa: E402
from memoryformer.data.sample import build_sample_corpus, export_heldout  # noqa: E402
from memoryformer.evaluation.config import EvalSettings, EvaluateConfig  # noqa: E402
from memoryformer.evaluation.lm_adapter import MemoryFormerLM  # noqa: E402
from memoryformer.evaluation.runner import run_evaluation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = os.path.join(os.environ.get("MEMORYFORMER_CACHE", "~/.cache/memoryformer"), "data")  # conf/data


@pytest.fixture(scope="module")
def corpus():
    return build_sample_corpus(CACHE)  # the defaults of conf/data/sample.yaml; cached after the first build


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_data")
    export_heldout(out)
    return out


def _exported(data_dir: Path) -> list[str]:
    lines = (data_dir / "sample_heldout" / "validation.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_export_writes_exactly_the_validation_documents(corpus, heldout_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(corpus.tokenizer)
    eos = tok.token_to_id(EOT)
    val = MMapIndexedDataset(corpus.val_prefix)
    trained_on = []
    for i in range(len(val)):
        ids = val[i].tolist()
        assert ids[-1] == eos  # each document ends with <|endoftext|>, which is not part of its text
        trained_on.append(tok.decode(ids[:-1], skip_special_tokens=False))
    assert _exported(heldout_dir) == trained_on
    assert len(trained_on) == 12  # 242 stdlib files in 4 MB (Python 3.11), every 20th held out

    limited = export_heldout(heldout_dir / "limited", max_docs=3)
    assert [json.loads(x)["text"] for x in Path(limited).read_text().splitlines()] == trained_on[:3]


def _rolling_loglikelihood(model: torch.nn.Module, ids: list[int], window: int, eot: int) -> float:
    """float64 sum of log p(token) over `ids`, predicted in chunks of `window` tokens, each chunk seeing the
    `window` inputs that end just before its last token (`eot` stands before the first token)."""
    seq = [eot, *ids]  # ids[j] sits at seq[j + 1] and is predicted from seq[: j + 1]
    total = 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        lo = max(0, end - window)
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[lo:end]]))
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        for j in range(start, end):
            total += float(logp[j - lo, seq[j + 1]])
    return total


def test_heldout_task_perplexity_equals_exp_of_direct_rolling_loglikelihood(
    corpus, heldout_dir: Path, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(corpus.tokenizer)
    model = tiny_model(seed=3, vocab_size=4096, block_size=64)
    lm = MemoryFormerLM(model=model, tokenizer=tok, batch_size=8)
    cfg = EvaluateConfig(
        checkpoint="unused",
        eval=EvalSettings(tasks=["sample"], data_dir=str(heldout_dir), limit=2, bootstrap_iters=0),
    )
    assert cfg.eval.tasks == ["sample_heldout"]
    results = run_evaluation(cfg, tmp_path, lm=lm)  # lm_eval.simple_evaluate with our adapter
    got = results["results"]["sample_heldout"]

    docs = _exported(heldout_dir)[:2]  # eval.limit=2: lm-eval scores the first two documents
    eot = tok.token_to_id(EOT)
    ll = sum(_rolling_loglikelihood(model, tok.encode(d).ids, 64, eot) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-ll / words), rel=1e-4)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-ll / nbytes), rel=1e-4)
    assert got["bits_per_byte,none"] == pytest.approx(-ll / nbytes / math.log(2), rel=1e-4)
    # a random model is near uniform over 4096 ids: about ln(4096) nats per token
    ntok = sum(len(tok.encode(d).ids) for d in docs)
    assert abs(-ll / ntok - math.log(4096)) < 0.5

    md = (tmp_path / "results.md").read_text()
    assert f"| sample_heldout | {got['word_perplexity,none']:.4f} | {got['byte_perplexity,none']:.4f} |" in md
    assert "Paper layout" not in md  # no accuracy task ran


def test_missing_heldout_file_names_the_export_command(tmp_path: Path) -> None:
    from memoryformer.config import ConfigError
    from memoryformer.evaluation.data import DataError

    cfg = EvaluateConfig(checkpoint="unused", eval=EvalSettings(tasks=["sample"], data_dir=str(tmp_path)))
    with pytest.raises((DataError, ConfigError), match="--export-eval"):
        run_evaluation(cfg, tmp_path / "out", lm=object())


@pytest.mark.slow
def test_evaluate_py_hf_baseline_on_a_local_gpt_neox_directory(tmp_path: Path) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    model_dir = tmp_path / "tiny-neox"
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=260,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        eos_token_id=256,
        bos_token_id=256,
    )
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer(), eos_token=EOT, bos_token=EOT)
    tok.save_pretrained(model_dir)

    run_dir = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "baseline=hf",
            f"model_path={model_dir}",
            f"eval.data_dir={FIXTURES}",
            "eval.tasks=[piqa]",
            "eval.limit=4",
            "eval.bootstrap_iters=0",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())["results"]["piqa"]
    assert 0.0 <= res["acc,none"] <= 1.0
    assert json.loads((run_dir / "results.json").read_text())["n-samples"]["piqa"]["effective"] == 4
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["kind"] == "hf" and info["model"]["n_layer"] == 2 and info["model"]["block"] == "pythia"
    assert f"| piqa | acc | {res['acc,none']:.4f} |" in (run_dir / "results.md").read_text()


def _make_train_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_train", ROOT / "scripts" / "make_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_train_replaces_its_own_run_dir_and_refuses_any_other(tmp_path: Path) -> None:
    mt = _make_train_script()
    run = tmp_path / "make_train"
    mt.fresh_run_dir(run)
    (run / "model").mkdir()
    mt.fresh_run_dir(run)  # a second `make train`: the old run is replaced, not an error
    assert sorted(p.name for p in run.iterdir()) == [mt.MARKER]
    other = tmp_path / "precious"
    (other / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="was not made by `make train`"):
        mt.fresh_run_dir(other)
    assert (other / "checkpoints").is_dir()


def test_make_train_summary_reads_the_logged_losses_and_lm_eval_results(tmp_path: Path) -> None:
    mt = _make_train_script()
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,0,,8.5\n0,10,7.0,\n0,50,,5.25\n0,100,,4.0\n"
    )
    (tmp_path / "eval").mkdir()
    res = {"word_perplexity,none": 900.0, "byte_perplexity,none": 2.5, "bits_per_byte,none": 1.32}
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"results": {"sample_heldout": res}}))
    summary = mt.summarize(tmp_path, 120.0, 20.0)
    assert (summary["val_loss_first"], summary["val_loss_last"]) == (8.5, 4.0)
    assert summary["val_loss_steps"] == [0, 50, 100]
    assert summary["heldout"] == {"word_perplexity": 900.0, "byte_perplexity": 2.5, "bits_per_byte": 1.32}
    text = mt.render(summary)
    assert "8.500 (step 0) -> 4.000 (step 100)" in text and "bits/byte 1.3200" in text
