"""Every bad input to `train.py` ends in one sentence naming the key or file and the fix, never a hang or a
traceback, and leaves the files it was given untouched and no plan behind.

The cases compose `experiment=smoke` with their overrides and run `train(cfg)` in this process (an alarm
fails a run that hangs, as training on an empty .jsonl once did); the sentence is what `train.py` prints
(`memoryformer.errors.sentence_for`). One case, a run folder Hydra cannot create, runs `train.py` in a
process: it checks the exit-code wrapper itself (status 2, `error: <sentence>`, no traceback).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from memoryformer.conf_schema import register_configs
from memoryformer.config import ModelConfig
from memoryformer.data.indexed import MMapIndexedDatasetBuilder
from memoryformer.errors import sentence_for

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "tests" / "fixtures" / "data" / "tokenizer.json"
TIMEOUT_S = 150  # the slowest case fails in ~20 s on a busy 2-core machine; a hang would run for ever
register_configs()
NANO_VOCAB = ModelConfig.from_name("nano").vocab_size  # the smoke experiment's model


def _indexed(prefix: Path, docs: list[np.ndarray]) -> Path:
    with MMapIndexedDatasetBuilder(str(prefix), np.uint16) as builder:
        for doc in docs:
            builder.add_document(doc)
    return prefix


def _files_source(path: Path) -> list[str]:
    return ["data.source=files", f"data.files=[{path}]", f"data.tokenizer={TOK}"]


def _indexed_source(prefix: Path, tmp: Path, *extra: str) -> list[str]:
    return ["data.source=indexed", f"data.paths=[{prefix}]", f"data.cache_dir={tmp / 'cache'}", *extra]


def case_empty_jsonl(tmp: Path):
    path = tmp / "empty.jsonl"
    path.write_text("")
    return _files_source(path), [str(path), "empty"], [path]


def case_jsonl_shorter_than_a_batch(tmp: Path):
    path = tmp / "short.jsonl"
    path.write_text('{"text": "hello world"}\n')
    return _files_source(path), [str(path), "fewer than one micro-batch of 4"], [path]


def case_data_file_is_a_folder(tmp: Path):
    path = tmp / "shards.jsonl"
    path.mkdir()
    return _files_source(path), [str(path), "folder"], []


def case_unreadable_data_file(tmp: Path):
    path = tmp / "secret.jsonl"
    path.write_text('{"text": "hello world"}\n' * 50)
    path.chmod(0)
    return _files_source(path), [str(path), "cannot be read"], []


def case_missing_data_file(tmp: Path):
    prefix = tmp / "nothere"
    return _indexed_source(prefix, tmp), [str(prefix), ".idx"], []


def case_indexed_shorter_than_a_sample(tmp: Path):
    prefix = _indexed(tmp / "tiny", [np.arange(10), np.arange(10)])
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    overrides = _indexed_source(prefix, tmp, "data.val_fraction=0.5")
    return overrides, [str(prefix), "10 tokens", "33"], files  # smoke: seq_len 32 -> samples of 33


def case_validation_shorter_than_a_batch(tmp: Path):
    rng = np.random.default_rng(0)
    prefix = _indexed(tmp / "fewval", [rng.integers(0, 300, 40) for _ in range(20)])
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    # 1 of 20 documents held out: 40 tokens = 1 sample of 33, fewer than a batch of 4
    overrides = _indexed_source(prefix, tmp, "data.val_fraction=0.05")
    return overrides, [str(prefix), "1 sample(s)", "validation batch of 4"], files


def case_token_id_beyond_vocab(tmp: Path):
    # past the first 64 documents (which setup samples when there is no tokenizer) every id is too big
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 300, 40) for _ in range(64)] + [np.full(40, 5000) for _ in range(136)]
    prefix = _indexed(tmp / "badid", docs)
    files = [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    overrides = _indexed_source(prefix, tmp, "data.val_fraction=0.1")  # 20 held-out docs: 24 val samples
    return overrides, [f"{prefix}.bin", "5000", f"model.vocab_size={NANO_VOCAB}"], files


def case_unknown_model_key(tmp: Path):
    return ["model.n_embdd=3"], ["model.n_embdd"], []


def case_unknown_root_key(tmp: Path):
    return ["foo=1"], ["'foo'"], []


def case_unknown_model_preset(tmp: Path):
    return ["model=nonexistent"], ["model=nonexistent", "mf_tiny"], []


def case_unknown_experiment(tmp: Path):
    return ["experiment=nonexistent"], ["experiment=nonexistent", "nano_cpu"], []


def case_run_dir_not_writable(tmp: Path):
    blocker = tmp / "a_file"
    blocker.write_text("keep me")
    return [f"hydra.run.dir={blocker / 'run'}"], [str(blocker / "run"), "hydra.run.dir"], [blocker]


def case_output_dir_not_writable(tmp: Path):
    blocker = tmp / "a_file"
    blocker.write_text("keep me")
    return [f"paths.output_dir={blocker / 'out'}"], [str(blocker / "out"), "paths.output_dir"], [blocker]


def case_micro_batch_zero(tmp: Path):
    return ["micro_batch_size=0"], ["micro_batch_size=0", "micro_batch_size=1 or more"], []


def case_global_batch_not_divisible(tmp: Path):
    # smoke: 4 sequences per step on one device
    return ["micro_batch_size=3"], ["global_batch_size=4", "micro_batch_size", "divides 4"], []


def case_stated_accumulation_disagrees(tmp: Path):
    overrides = ["micro_batch_size=2", "trainer.accumulate_grad_batches=1"]
    return overrides, ["trainer.accumulate_grad_batches=1", "= 2", "micro_batch_size=4"], []


def case_plan_larger_than_the_device(tmp: Path):
    from memoryformer.training.sizing import Layout, plan_memory

    # smoke's model (conf/experiment/smoke.yaml) at 64 sequences of 64 tokens: the logits dominate
    smoke = ModelConfig.from_name("nano", n_layer=1, block_size=64)
    layout = Layout(device="cpu")
    whole = plan_memory(smoke, 64, 64, layout, accumulate=1).peak_bytes
    half = plan_memory(smoke, 64, 32, layout, accumulate=2).peak_bytes
    device_gb = (whole + half) / 2 / 1e9  # micro-batch 32 fits, 64 does not
    overrides = ["data.seq_len=64", "global_batch_size=64", f"device_memory_gb={device_gb:.9f}"]
    return overrides, ["micro_batch_size=64", "micro_batch_size=32 (the largest that fits)",
                       "activation_checkpointing=true"], []


def case_negative_device_memory(tmp: Path):
    return ["device_memory_gb=-1"], ["device_memory_gb=-1", "device_memory_gb=80"], []


def case_fp16_on_cpu(tmp: Path):
    return ["trainer.precision=16-mixed"], ["trainer.precision=16-mixed", "bf16-mixed"], []


AS_ROOT = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod 000 file anyway"
)
CASES = [
    pytest.param(case_empty_jsonl, id="empty-jsonl"),
    pytest.param(case_jsonl_shorter_than_a_batch, id="jsonl-shorter-than-a-batch"),
    pytest.param(case_data_file_is_a_folder, id="data-file-is-a-folder"),
    pytest.param(case_unreadable_data_file, marks=AS_ROOT, id="unreadable-data-file"),
    pytest.param(case_missing_data_file, id="missing-data-file"),
    pytest.param(case_indexed_shorter_than_a_sample, id="indexed-shorter-than-a-sample"),
    pytest.param(case_validation_shorter_than_a_batch, id="validation-shorter-than-a-batch"),
    pytest.param(case_token_id_beyond_vocab, id="token-id-beyond-vocab"),
    pytest.param(case_unknown_model_key, id="unknown-model-key"),
    pytest.param(case_unknown_root_key, id="unknown-root-key"),
    pytest.param(case_unknown_model_preset, id="unknown-model-preset"),
    pytest.param(case_unknown_experiment, id="unknown-experiment"),
    pytest.param(case_output_dir_not_writable, id="output-dir-not-writable"),
    pytest.param(case_micro_batch_zero, id="micro-batch-zero"),
    pytest.param(case_global_batch_not_divisible, id="global-batch-not-divisible"),
    pytest.param(case_stated_accumulation_disagrees, id="stated-accumulation-disagrees"),
    pytest.param(case_plan_larger_than_the_device, id="plan-larger-than-the-device"),
    pytest.param(case_negative_device_memory, id="negative-device-memory"),
    pytest.param(case_fp16_on_cpu, id="fp16-on-cpu"),
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _fails_if_longer_than(seconds: int) -> Iterator[None]:
    def hung(signum, frame):
        raise TimeoutError(f"the run did not fail within {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _refusal(overrides: list[str], tmp_path: Path) -> str:
    """The sentence `train.py experiment=smoke <overrides>` reports; fails if the run is not refused."""
    from memoryformer.training.run import train

    own_dir = any(o.startswith("paths.output_dir=") for o in overrides)
    where = [] if own_dir else [f"paths.output_dir={tmp_path}/run"]
    with _fails_if_longer_than(TIMEOUT_S):
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=["experiment=smoke", "logger=none", *where, *overrides])
            train(cfg)
        except Exception as err:  # noqa: BLE001 - whatever it is, it must be a user error with a sentence
            sentence = sentence_for(err)
            assert sentence is not None, f"not a user error but {type(err).__name__}: {err}"
            return sentence
    raise AssertionError(f"train.py {' '.join(overrides)} was not refused")


@pytest.mark.parametrize("make_case", CASES)
def test_bad_input_fails_with_one_sentence(make_case: Callable, tmp_path: Path) -> None:
    overrides, expected, kept = make_case(tmp_path)
    before = {p: _digest(p) for p in kept}
    message = _refusal(overrides, tmp_path)
    assert "\n" not in message and "Traceback" not in message, message
    for needle in expected:  # the key or file, and the fix
        assert needle in message, (needle, message)
    for path, digest in before.items():
        assert path.is_file() and _digest(path) == digest, f"{path} changed or vanished"
    if make_case is not case_token_id_beyond_vocab:
        # refused before training: no plan. (A bad id past the first 64 documents is found while reading,
        # after the run started; its plan.json, written once the data opened, stays as the run's record.)
        assert not list(tmp_path.rglob("plan.json")), "a refused run wrote its plan"


def test_train_py_reports_a_refusal_as_one_line_and_exit_status_2(tmp_path: Path) -> None:
    """The process level, through `reports_user_errors`: Hydra cannot create the run folder (a file is in
    its way), which happens before the task runs."""
    overrides, expected, kept = case_run_dir_not_writable(tmp_path)
    before = {p: _digest(p) for p in kept}
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # Hydra's default reporting
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    env.update(TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=smoke", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert all(needle in errors[0] for needle in expected), errors[0]
    assert all(_digest(p) == d for p, d in before.items())


def test_worker_wrapped_error_is_reported_as_its_own_sentence() -> None:
    from torch._utils import ExceptionWrapper

    from memoryformer.data.indexed import DataError
    from memoryformer.errors import one_line, sentence_for

    sentence = "x.bin document 7 holds token id 5000, but model.vocab_size=4096; re-tokenize."
    try:
        raise DataError(sentence)
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as caught:
        wrapped.reraise()  # what the main process sees when a DataLoader worker raised
    assert "Traceback" in str(caught.value)
    assert one_line(caught.value) == sentence
    assert sentence_for(RuntimeError("a bug")) is None  # not ours: the traceback stays


def test_unknown_group_option_lists_the_choices() -> None:
    from hydra.errors import MissingConfigException

    from memoryformer.errors import hydra_error_sentence

    message = "In 'config': Could not find 'model/nanoo'"
    err = MissingConfigException(message, "model/nanoo", ["nano", "pythia_70m"])
    assert hydra_error_sentence(err) == (
        "model=nanoo is not an option of the config group 'model'; choose one of: nano, pythia_70m."
    )


def test_every_sample_is_checked_against_the_vocabulary(tmp_path: Path) -> None:
    from memoryformer.data.gpt_neox import GPTSampleDataset, PreshuffledDataset
    from memoryformer.data.indexed import DataError, MMapIndexedDataset

    docs = [np.full(9, 7)] * 3 + [np.array([1, 2, 3, 4096, 5, 6, 7, 8, 9])]  # 4096 = first id too big
    ds = MMapIndexedDataset(str(_indexed(tmp_path / "ids", docs)))
    samples = GPTSampleDataset(ds, 8, 4, seed=1, cache_dir=str(tmp_path), vocab_size=NANO_VOCAB)
    expected = r"ids\.bin document 3 holds token id 4096, but model\.vocab_size=4096"
    with pytest.raises(DataError, match=expected):
        [samples[i] for i in range(len(samples))]
    unchecked = GPTSampleDataset(ds, 8, 4, seed=1, cache_dir=str(tmp_path))  # no limit: reads as before
    assert max(int(unchecked[i].max()) for i in range(len(unchecked))) == 4096
    preshuffled = PreshuffledDataset(ds, 8, vocab_size=NANO_VOCAB + 1)
    assert [int(preshuffled[i].max()) for i in range(4)] == [7, 7, 7, 4096]  # 4096 < 4097 passes
    with pytest.raises(DataError, match="document 3 holds token id 4096"):
        PreshuffledDataset(ds, 8, vocab_size=NANO_VOCAB)[3]


def test_unreadable_file_is_one_sentence_even_when_run_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # root reads chmod 000 files, so the subprocess case above is skipped there; this one fakes the denial
    from memoryformer.data import streaming
    from memoryformer.data.indexed import DataError

    path = tmp_path / "secret.jsonl"
    path.write_text('{"text": "hello"}\n')

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(streaming, "open", denied, raising=False)
    with pytest.raises(DataError, match=rf"data\.files entry {path} cannot be read \(Permission denied\)"):
        streaming.expand_globs([str(path)])


def test_one_data_error_for_training_and_evaluation_data() -> None:
    from memoryformer import errors
    from memoryformer.data import DataError as data_pkg_error
    from memoryformer.data.indexed import DataError as indexed_error
    from memoryformer.evaluation.data import DataError as eval_error

    assert data_pkg_error is indexed_error is eval_error is errors.DataError
    assert errors.DataError in errors.USER_ERRORS
