"""What a paper row costs: tokens from the experiment configs, FLOPs, and device-hours from measurements,
published numbers and estimates.

External numbers: Pythia trained on 299,892,736,000 tokens (143,000 steps x 1024 x 2048, EleutherAI's
model cards) in 510 / 1,030 / 2,540 A100-40GB hours (70M / 160M / 410M, the Pythia paper's appendix);
the released MemoryFormer configs train 106,418 steps (docs/paper-notes.md §4); a MemoryFormer
block gathers 3Kd + K(tau+2)K + Kd = 5.25 K d table entries per token at tau = 8 (docs/paper-notes.md
§5); A100
datasheet: 312 TFLOP/s dense fp16/bf16, 1,555 GB/s. The FLOPs per token are checked against the textbook
count for a GPT-NeoX block, written out here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from memoryformer.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # compute_budget.py is a benchmark module, not in the package
import compute_budget as cb  # noqa: E402


def test_pythia_rows_train_on_pythias_published_token_count():
    for exp in ("pythia_70m", "pythia_160m", "pythia_410m"):
        row = cb.row_budget(exp)
        assert row.tokens == 299_892_736_000
        assert (row.steps, row.global_batch_size, row.seq_len) == (143_000, 1024, 2048)


def test_memoryformer_rows_train_the_released_configs_steps():
    for exp, model in (("mf_tiny", "mf_tiny"), ("mf_small", "mf_small"),
                       ("mf_base", "mf_base")):
        row = cb.row_budget(exp)
        assert row.model == model
        assert row.tokens == 106_418 * 1024 * 2048  # ~223.2B tokens, docs/paper-notes.md §4
        assert abs(row.tokens / 1e9 - 223.2) < 0.05


@pytest.mark.parametrize("exp,layers,d", [("pythia_70m", 6, 512), ("pythia_160m", 12, 768),
                                           ("pythia_410m", 24, 1024)])
def test_dense_flops_per_token_match_the_textbook_count(exp, layers, d):
    # per token forward: L x (QKV 3d^2 + out d^2 + MLP 8d^2 + attention 2 s d) + LM head d x V; backward 2x.
    s, vocab = 2048, 50304
    forward = layers * (12 * d * d + 2 * s * d) + d * vocab
    assert cb.row_budget(exp).flops_per_token == pytest.approx(3 * forward, rel=1e-12)


def test_memoryformer_costs_fewer_flops_per_token_than_its_pythia_row():
    for mf, py in (("mf_tiny", "pythia_70m"), ("mf_small", "pythia_160m"), ("mf_base", "pythia_410m")):
        assert cb.row_budget(mf).flops_per_token < cb.row_budget(py).flops_per_token


def test_unknown_experiment_is_one_sentence():
    with pytest.raises(ConfigError, match="experiment=gpt5 does not exist"):
        cb.row_budget("gpt5")


def test_device_hours_and_mfu_arithmetic():
    assert cb.device_hours(3.6e9, 1e6) == pytest.approx(1.0)
    # 1e8 multiply-adds per token at 1e6 tokens/s = 2e14 FLOP/s = 20% of a 1000 TFLOP/s peak
    assert cb.mfu(1e8, 1e6, 1000.0) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        cb.device_hours(1e9, 0)


def _m(**kw) -> cb.Measurement:
    base = dict(model="pythia_70m", device="GPU X", tokens_per_s=1e6, dtype="bf16", seq_len=2048,
                micro_batch=16)
    return cb.Measurement(**{**base, **kw})


def test_measurements_round_trip_and_replace_by_key(tmp_path):
    path = tmp_path / "tp.json"
    assert cb.load_measurements(path) == []
    cb.save_measurement(_m(), path)
    cb.save_measurement(_m(model="mf_tiny", tokens_per_s=5e5), path)
    cb.save_measurement(_m(tokens_per_s=2e6), path)  # same key: replaces the first
    got = cb.load_measurements(path)
    assert len(got) == 2
    assert {m.model: m.tokens_per_s for m in got} == {"pythia_70m": 2e6, "mf_tiny": 5e5}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ('{"model": "x"}', "must hold a JSON list"),
    ('[{"model": "x", "colour": 1}]', "unknown keys ['colour']"),
    ('[{"model": "x"}]', "incomplete"),
    ('[{"model": "x", "device": "d", "tokens_per_s": -1, "dtype": "bf16", "seq_len": 1, "micro_batch": 1}]',
     "must be > 0"),
])
def test_a_bad_measurement_file_is_refused_with_its_name(tmp_path, content, needle):
    path = tmp_path / "tp.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        cb.load_measurements(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def _table_lines(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_cost_table_turns_a_measurement_into_hours_days_and_mfu():
    table = cb.format_cost_table([_m(peak_tflops=989.0), _m(model="mf_tiny", seq_len=512)],
                                 experiments=("pythia_70m", "mf_tiny"))
    measured = [c for c in _table_lines(table) if c[8].startswith("**measured**")]
    assert len(measured) == 1  # the mf_tiny measurement at s = 512 does not stand for the s = 2048 row
    row, tokens, _, device, tps, hours, days, util, _ = measured[0]
    assert row == "`pythia_70m` (Pythia-70M)" and tokens == "299.9B" and device == "GPU X, bf16"
    expected_hours = 299_892_736_000 / 1e6 / 3600  # 83,304 device-hours
    assert (tps, hours, days) == ("1,000,000", f"{expected_hours:,.0f}", f"{expected_hours / 32 / 24:,.1f}")
    assert util == f"{2 * cb.row_budget('pythia_70m').flops_per_token * 1e6 / 989e12:.0%}"


def test_pythia_rows_cost_the_published_a100_hours():
    lines = {(c[0], c[8].split(":")[0]): c for c in _table_lines(cb.format_cost_table([]))}
    for exp, label, hours, days in (("pythia_70m", "Pythia-70M", "510", "0.7"),
                                    ("pythia_160m", "Pythia-160M", "1,030", "1.3"),
                                    ("pythia_410m", "Pythia-410M", "2,540", "3.3")):
        cells = lines[(f"`{exp}` ({label})", "**published**")]
        assert cells[3] == "NVIDIA A100-SXM4-40GB, fp16" and cells[5] == hours and cells[6] == days
    # Pythia-70M: 299.9B tokens in 510 h is 163,340 tokens/s per GPU; our FLOPs make that 18% of 312 TFLOP/s
    assert cb.published_tokens_per_s("pythia_70m") == pytest.approx(299_892_736_000 / (510 * 3600))
    tokens_per_s = cb.published_tokens_per_s("pythia_70m")
    mfu_70m = cb.mfu(cb.row_budget("pythia_70m").flops_per_token, tokens_per_s, 312)
    assert mfu_70m == pytest.approx(0.18, abs=0.005)


@pytest.mark.parametrize("exp,layers,k,d", [("mf_tiny", 6, 64, 512), ("mf_small", 12, 96, 768),
                                             ("mf_base", 24, 128, 1024)])
def test_lookup_reads_are_the_papers_exact_gather_count(exp, layers, k, d):
    row = cb.row_budget(exp)
    assert row.lookup_reads_per_token == layers * 5.25 * k * d  # docs/paper-notes.md §5, tau = 8
    assert row.flops_per_token == pytest.approx(row.dense_flops_per_token + 3 * row.lookup_reads_per_token)
    # what is left dense in a MemoryFormer block is attention (2 s d per token) and the LM head (d x V)
    assert row.dense_flops_per_token == pytest.approx(3 * (layers * 2 * 2048 * d + d * 50304))


def test_pythia_rows_read_no_tables():
    row = cb.row_budget("pythia_70m")
    assert row.lookup_reads_per_token == 0 and row.dense_flops_per_token == row.flops_per_token


def test_mf_tiny_estimate_by_hand():
    # dense: 3 x (6 x 2 x 2048 x 512 + 512 x 50304) multiply-adds at Pythia-70M's published MFU, 312 TFLOP/s;
    # memory: 3 passes x 6 x 5.25 x 64 x 512 entries x 2 bytes + 28 bytes x 466,777,856 params / 2,097,152
    dense_flops = 2 * 3 * (6 * 2 * 2048 * 512 + 512 * 50304)
    tokens_per_s_70m = 299_892_736_000 / (510 * 3600)
    flops_70m = 2 * 3 * (6 * (2 * 2048 * 512 + 12 * 512 * 512) + 512 * 50304)
    mfu_70m = flops_70m * tokens_per_s_70m / 312e12
    traffic = 3 * 6 * 5.25 * 64 * 512 * 2 + 28 * 466_777_856 / (1024 * 2048)
    expected = 1 / (dense_flops / (mfu_70m * 312e12) + traffic / 1.555e12)
    row = cb.row_budget("mf_tiny")
    assert row.params == 466_777_856
    assert cb.estimate_tokens_per_s(row, cb.A100_40GB, mfu_70m) == pytest.approx(expected, rel=1e-9)
    (line,) = [c for c in cb.cost_lines([], ("mf_tiny",)) if c.basis == "estimate"]
    assert line.tokens_per_s == pytest.approx(expected, rel=1e-9)
    assert line.device_hours == pytest.approx(106_418 * 1024 * 2048 / expected / 3600)


def test_estimate_shape():
    row = cb.row_budget("mf_base")
    fast = cb.estimate_tokens_per_s(row, cb.A100_40GB, 0.3)
    # twice the bandwidth or fp32 -> bf16 tables must help; a better MFU helps less: tables dominate MF-base
    assert cb.estimate_tokens_per_s(row, cb.DeviceSpec("x", 312, 3.11), 0.3) > 1.7 * fast
    assert cb.estimate_tokens_per_s(row, cb.A100_40GB, 0.3, table_bytes=4) < 0.6 * fast
    assert cb.estimate_tokens_per_s(row, cb.A100_40GB, 0.6) < 1.2 * fast
    with pytest.raises(ValueError, match="dense_mfu"):
        cb.estimate_tokens_per_s(row, cb.A100_40GB, 0.0)


def test_a_measurement_on_an_a100_replaces_the_estimate():
    m = _m(model="mf_tiny", device="NVIDIA A100-SXM4-80GB", tokens_per_s=90_000.0)
    bases = [line.basis for line in cb.cost_lines([m], ("mf_tiny",))]
    assert bases == ["measured"]
    assert [line.basis for line in cb.cost_lines([], ("mf_tiny",))] == ["estimate"]


def test_cpu_measurements_only_on_request():
    m = _m(device="CPU: Some CPU (2 threads)", dtype="fp32")
    assert [line.basis for line in cb.cost_lines([m], ("pythia_70m",))] == ["published"]
    assert [line.basis for line in cb.cost_lines([m], ("pythia_70m",), include_cpu=True)] == [
        "measured", "published"]


def test_method_check_predicts_from_the_reference_measurement():
    cpu = "CPU: test"
    ms = [_m(device=cpu, tokens_per_s=300.0, micro_batch=1),
          _m(model="mf_tiny", device=cpu, tokens_per_s=350.0, micro_batch=1)]
    estimate, measured = cb.method_check(ms, cpu, memory_bytes_per_s=15e9)
    dense_rate = 2 * cb.row_budget("pythia_70m").flops_per_token * 300.0
    mf = cb.row_budget("mf_tiny")
    traffic = 3 * mf.lookup_reads_per_token * 4 + 28 * mf.params / 2048
    assert estimate == pytest.approx(1 / (2 * mf.dense_flops_per_token / dense_rate + traffic / 15e9))
    assert measured == 350.0
    assert cb.method_check(ms[:1], cpu, 15e9) is None


def test_record_cli_divides_a_runs_tokens_per_s_by_its_devices(tmp_path, capsys):
    path = tmp_path / "tp.json"
    rc = cb.main(["--measurements", str(path), "record", "--experiment", "mf_tiny", "--device", "GPU Y",
                  "--tokens-per-s", "800000", "--devices", "8", "--micro-batch", "16"])
    assert rc == 0
    (m,) = cb.load_measurements(path)
    assert (m.model, m.tokens_per_s, m.devices, m.seq_len, m.source) == (
        "mf_tiny", 100000.0, 8, 2048, "training run")
    assert "GPU Y" in capsys.readouterr().out
    rc = cb.main(["--measurements", str(path), "record", "--experiment", "nope", "--device", "d",
                  "--tokens-per-s", "1", "--micro-batch", "1"])
    assert rc == 2 and "experiment=nope does not exist" in capsys.readouterr().err


def test_the_shipped_measurements_file_is_valid():
    measurements = cb.load_measurements(cb.MEASUREMENTS)
    assert measurements, "docs/throughput.json should carry the measurements the README table shows"
    for m in measurements:
        assert m.measured_on and m.device
    json.loads(cb.MEASUREMENTS.read_text())


# ------------------------------------------------------------------------------ the measuring harness
@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_throughput",
                                                  ROOT / "benchmarks" / "bench_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_throughput"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_harness_measures_and_records_a_row(bench, tmp_path, capsys):
    path = tmp_path / "tp.json"
    rc = bench.main(["--experiments", "smoke", "--seq-len", "32", "--steps", "1", "--warmup", "1",
                     "--record", str(path)])
    assert rc == 0
    (m,) = cb.load_measurements(path)
    assert (m.model, m.seq_len, m.micro_batch, m.dtype, m.source) == (
        "nano", 32, 1, "fp32", "bench_throughput")
    assert m.tokens_per_s > 0 and m.device.startswith("CPU: ")
    assert "smoke" in capsys.readouterr().out


def test_harness_refuses_a_model_that_cannot_fit_before_building_it(bench, monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda device: 10**9)  # 1 GB free
    r = bench.measure_experiment("mf_tiny", bench.torch.device("cpu"), "fp32", None, 1, 0)
    assert r.tokens_per_s is None
    assert "0.47B parameters need ~7 GB" in r.reason  # 466,777,856 x 16 bytes


def test_datasheet_peak_lookup(bench):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert bench.peak_tflops("Some CPU", "bf16") is None
