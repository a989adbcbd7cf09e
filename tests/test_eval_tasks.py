"""Offline task wiring: our task YAMLs send lm-eval's own prompts, and lm-eval scores them end to end."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import lm_eval
import lm_eval.tasks
import pytest
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from eval_test_helpers import FIXTURES, save_tokenizer, tiny_model  # noqa: E402

from memoryformer.config import ConfigError  # noqa: E402
from memoryformer.evaluation.config import TASK_SETS, EvaluateConfig  # noqa: E402
from memoryformer.evaluation.data import EVAL_SPLITS, UPSTREAM_TASK_YAML, DataError, load_local  # noqa: E402
from memoryformer.evaluation.runner import build_task_manager, run_evaluation  # noqa: E402

PAPER = TASK_SETS["paper"]
ALL_LOCAL = list(EVAL_SPLITS)
UPSTREAM = Path(lm_eval.tasks.__file__).parent


def _rows(task: str) -> list[dict]:
    path = FIXTURES / task / f"{EVAL_SPLITS[task]}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def local_tm():
    return build_task_manager(str(FIXTURES))


# ------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("task", ALL_LOCAL)
def test_local_task_sends_the_same_requests_as_lm_evals_hub_task(task, local_tm):
    ours = local_tm.load([task])["tasks"][task]
    upstream = dict(load_yaml(UPSTREAM / UPSTREAM_TASK_YAML[task], resolve_func=True))
    # lm-eval's own YAML with only the data source swapped for the same local file.
    assert (upstream.get("test_split") or upstream.get("validation_split")) == EVAL_SPLITS[task]
    for key in ("tag", "training_split"):
        upstream.pop(key, None)
    if upstream.get("test_split"):
        upstream.pop("validation_split", None)
    upstream["custom_dataset"] = functools.partial(load_local, data_dir=str(FIXTURES))
    upstream["dataset_kwargs"] = {"task": task}
    theirs = local_tm.load([upstream])["tasks"][task]
    for t in (ours, theirs):
        t.build_all_requests(limit=None, rank=0, world_size=1)
    assert len(ours.instances) == len(theirs.instances) > 0
    assert [i.args for i in ours.instances] == [i.args for i in theirs.instances]
    assert [i.doc for i in ours.instances] == [i.doc for i in theirs.instances]
    assert sorted(ours._metric_fn_list) == sorted(theirs._metric_fn_list)


# ------------------------------------------------------------------------------------------- scoring
def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def _gold_pairs() -> set[tuple[str, str]]:
    """(context, continuation) of every gold choice, written from each task's documented prompt format."""
    gold = set()
    for r in _rows("piqa"):
        gold.add((f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]][r["label"]]))
    for r in _rows("winogrande"):
        head, tail = r["sentence"].split("_", 1)
        gold.add((head + [r["option1"], r["option2"]][int(r["answer"]) - 1], tail))
    for r in _rows("wsc273"):
        loc = r["pronoun_loc"]
        gold.add((r["text"][:loc] + r["options"][r["label"]], r["text"][loc + len(r["pronoun"]) :]))
    for r in _rows("wsc"):
        words = r["text"].split()
        words[r["span2_index"]] = f"*{r['span2_text']}*"
        passage = " ".join(words).replace(" .", ".")  # the fixtures' only detokenisation case
        ctx = (
            f'Passage: {passage}\nQuestion: In the passage above, does the pronoun "*{r["span2_text"]}*" '
            f'refer to "*{r["span1_text"]}*"?\nAnswer:'
        )
        gold.add((ctx, ["no", "yes"][r["label"]]))
    for task in ("arc_easy", "arc_challenge"):
        for r in _rows(task):
            answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
            gold.add((f"Question: {r['question']}\nAnswer:", answer))
    for r in _rows("logiqa"):
        options = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", r["options"], strict=True))
        ctx = f"Passage: {r['context']}\nQuestion: {r['question']}\nChoices:\n{options}\nAnswer:"
        gold.add((ctx, r["options"]["abcd".index(r["label"])]))
    return {(_norm(c), _norm(x)) for c, x in gold}


class ScriptedLM(LM):
    """Scores choices without a model: `oracle` gives the gold choice 0 and others -10; else all 0."""

    def __init__(self, oracle: bool) -> None:
        super().__init__()
        self.gold = _gold_pairs() if oracle else None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for ctx, cont in (r.args for r in requests):
            hit = self.gold is None or (_norm(ctx), _norm(cont)) in self.gold
            out.append((0.0 if hit else -10.0, hit))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the paper's tasks are multiple choice")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the paper's tasks are multiple choice")


def _evaluate(lm: LM, tasks: list[str], tmp_path: Path, **eval_kw) -> dict:
    cfg = EvaluateConfig(
        checkpoint="unused", eval={"tasks": tasks, "data_dir": str(FIXTURES), "bootstrap_iters": 0, **eval_kw}
    )
    cfg = EvaluateConfig.from_mapping(cfg.to_dict())
    return run_evaluation(cfg, tmp_path, lm=lm)


def test_oracle_scores_one_and_uniform_scores_chance_on_every_task(tmp_path):
    tasks = ALL_LOCAL
    oracle = _evaluate(ScriptedLM(oracle=True), tasks, tmp_path / "oracle")["results"]
    uniform = _evaluate(ScriptedLM(oracle=False), tasks, tmp_path / "uniform")["results"]
    n_choices = {
        "piqa": 2,
        "winogrande": 2,
        "wsc273": 2,
        "wsc": 2,
        "arc_easy": 4,
        "arc_challenge": 4,
        "logiqa": 4,
    }
    for task in tasks:
        assert oracle[task]["acc,none"] == 1.0, task
        # Ties go to the first choice and the fixtures put the gold answer at each index equally often.
        assert uniform[task]["acc,none"] == pytest.approx(1 / n_choices[task]), task
        if "acc_norm,none" in oracle[task]:
            assert oracle[task]["acc_norm,none"] == 1.0, task
    md = (tmp_path / "oracle" / "results.md").read_text()
    assert "| piqa | acc | 1.0000 |" in md


def test_metric_choice_acc_norm_with_fallback_is_stated(tmp_path):
    _evaluate(ScriptedLM(oracle=True), ["piqa", "winogrande"], tmp_path, metric={"default": "acc_norm"})
    md = (tmp_path / "results.md").read_text()
    assert "| piqa | acc_norm | 1.0000 |" in md
    assert "| winogrande | acc |" in md and "lm-eval reports no acc_norm for winogrande; acc used" in md


@pytest.mark.slow  # a real (random, tiny) model over 6 tasks x 4 documents on a shared CPU
def test_checkpoint_end_to_end_on_paper_tasks(tmp_path):
    from memoryformer.checkpoint import export_model

    ckpt = export_model(
        tiny_model(block_size=64),
        tmp_path / "model",
        tokenizer_path=str(save_tokenizer(tmp_path / "tok.json")),
    )
    cfg = EvaluateConfig.from_mapping(
        {
            "checkpoint": str(ckpt),
            "eval": {
                "tasks": "paper",
                "data_dir": str(FIXTURES),
                "limit": 4,
                "bootstrap_iters": 0,
                "batch_size": 8,
            },
        }
    )
    results = run_evaluation(cfg, tmp_path / "run")
    assert set(results["results"]) == set(PAPER)
    for task in PAPER:
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
        assert results["n-samples"][task]["effective"] == 4
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["results"]["piqa"]["acc,none"] == results["results"]["piqa"]["acc,none"]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["model"]["n_layer"] == 2 and info["kind"] == "memoryformer"


# ------------------------------------------------------------------------------------------- errors
def test_unknown_task_is_one_clear_sentence(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'piqaa'.*did you mean piqa"):
        _evaluate(ScriptedLM(oracle=False), ["piqaa"], tmp_path)


def test_data_dir_without_the_tasks_file_is_one_clear_sentence(tmp_path):
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    cfg = EvaluateConfig.from_mapping(
        {"checkpoint": "x", "eval": {"tasks": ["piqa"], "data_dir": str(tmp_path / "data")}}
    )
    with pytest.raises(DataError, match=r"piqa/validation\.jsonl.*download_eval_data\.py"):
        run_evaluation(cfg, tmp_path / "out", lm=ScriptedLM(oracle=False))
    cfg = EvaluateConfig.from_mapping(
        {"checkpoint": "x", "eval": {"tasks": ["piqa"], "data_dir": str(tmp_path / "nope")}}
    )
    with pytest.raises(DataError, match="does not exist"):
        run_evaluation(cfg, tmp_path / "out", lm=ScriptedLM(oracle=False))


def test_config_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="checkpoint is not set"):
        EvaluateConfig.from_mapping({})
    with pytest.raises(ConfigError, match="baseline=hf needs model_path"):
        EvaluateConfig.from_mapping({"baseline": "hf"})
    with pytest.raises(ConfigError, match="eval.metric.piqa='f1'"):
        EvaluateConfig.from_mapping({"checkpoint": "x", "eval": {"metric": {"piqa": "f1"}}})
    with pytest.raises(ConfigError, match="unknown key eval.taskz"):
        EvaluateConfig.from_mapping({"checkpoint": "x", "eval": {"taskz": ["piqa"]}})
    cfg = EvaluateConfig.from_mapping({"checkpoint": "x", "eval": {"tasks": "paper,wsc273"}})
    assert cfg.eval.tasks == [*PAPER, "wsc273"]


def test_paper_set_uses_superglue_wsc_and_wsc273_stays_available():
    # every WSC value the paper prints is k/104: SuperGLUE WSC's validation split, lm-eval's `wsc`
    assert PAPER == ["piqa", "winogrande", "wsc", "arc_easy", "arc_challenge", "logiqa"]
    assert TASK_SETS["paper_wsc273"] == [t if t != "wsc" else "wsc273" for t in PAPER]
    assert EVAL_SPLITS["wsc"] == "validation" and EVAL_SPLITS["wsc273"] == "test"
