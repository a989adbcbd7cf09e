"""lm-eval's own `hf` model on an exported MemoryFormer directory scores like our `memoryformer` adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import FIXTURES, save_tokenizer, tiny_model  # noqa: E402

from memoryformer.checkpoint import export_model  # noqa: E402
from memoryformer.evaluation.config import EvaluateConfig  # noqa: E402
from memoryformer.evaluation.lm_adapter import MemoryFormerLM  # noqa: E402
from memoryformer.evaluation.runner import run_evaluation  # noqa: E402

TASKS = ["piqa", "arc_easy"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    model = tiny_model(seed=3, block_size=64)
    return export_model(model, tmp / "model", tokenizer_path=str(save_tokenizer(tmp / "tok.json")))


def test_hf_and_memoryformer_models_give_the_same_loglikelihoods(export_dir):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(export_dir), trust_remote_code=True, batch_size=4, device="cpu", dtype="float32")
    ours = MemoryFormerLM(checkpoint=str(export_dir), batch_size=3)
    pairs = [
        ("Question: what is red?\nAnswer:", " a ripe tomato"),
        ("", "no context at all"),
        ("A context longer than the window of sixty-four tokens, so it must be cut from the left.", " x"),
        ("Trailing space ", "moves"),
    ]
    reqs = [Instance("loglikelihood", {}, p, i, ("t", i, 1)) for i, p in enumerate(pairs)]
    got_hf, got_ours = hf.loglikelihood(reqs, disable_tqdm=True), ours.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(got_hf, got_ours, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    text = "The quick brown fox jumps over the lazy dog. " * 4  # > 64 tokens: several rolling windows
    roll = [Instance("loglikelihood_rolling", {}, (text,), 0, ("t", 0, 1))]
    assert hf.loglikelihood_rolling(roll, disable_tqdm=True)[0] == pytest.approx(
        ours.loglikelihood_rolling(roll, disable_tqdm=True)[0], abs=1e-3
    )
    assert torch.equal(torch.tensor(hf.tok_encode("héllo")), torch.tensor(ours.tok_encode("héllo")))


@pytest.mark.slow  # two full lm-eval runs over local task files
def test_evaluate_baseline_hf_on_an_export_matches_our_adapter(export_dir, tmp_path):
    common = {"tasks": TASKS, "data_dir": str(FIXTURES), "limit": 4, "bootstrap_iters": 0, "batch_size": 4}
    ours = run_evaluation(
        EvaluateConfig.from_mapping({"checkpoint": str(export_dir), "eval": common}), tmp_path / "ours"
    )
    hf = run_evaluation(
        EvaluateConfig.from_mapping({"baseline": "hf", "model_path": str(export_dir), "eval": common}),
        tmp_path / "hf",
    )
    for task in TASKS:
        for metric in ("acc,none", "acc_norm,none"):
            assert hf["results"][task][metric] == ours["results"][task][metric], (task, metric)
