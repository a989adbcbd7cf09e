"""scripts/gpu_check.py: its comparison, tolerance, metric and report logic on CPU; the CUDA checks
themselves only where a GPU is present (marker `gpu`, skipped otherwise)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_reference_reads_the_row_the_sign_bits_name() -> None:
    # tau = 2, K = 1: x = (+0.5, -1.0) -> bits 1 0 (MSB first) -> row 2; weight (l1_prob) by hand
    tables = torch.arange(8, dtype=torch.float64).reshape(4, 2)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    p = 1 / (1 + math.exp(-1.0)) * 1 / (1 + math.exp(-2.0))
    y = gpu_check.reference_memory_layer(x, tables, None, code_length=2)
    torch.testing.assert_close(y, torch.tensor([[1.5 * p * 4.0, 1.5 * p * 5.0]], dtype=torch.float64))


def test_compare_applies_the_tolerance_to_the_largest_reference_value() -> None:
    ref = torch.tensor([100.0, 1.0])
    assert gpu_check.compare("ok", ref + torch.tensor([0.0, 0.9e-3]), ref, rtol=1e-5)["passed"]
    bad = gpu_check.compare("bad", ref + torch.tensor([0.0, 1.1e-3]), ref, rtol=1e-5)
    assert not bad["passed"] and bad["max_abs_err"] == pytest.approx(1.1e-3, rel=1e-4)
    assert bad["ref_max_abs"] == 100.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_on_cpu_passes_the_checks_the_gpu_run_applies(dtype: torch.dtype) -> None:
    records = gpu_check.check_memory_layer("cpu", dtype, "torch", tokens=64, num_tables=4)
    assert [r["name"].rsplit("/", 1)[1] for r in records] == [
        "forward",
        "grad_tables",
        "grad_bias",
        "grad_input",
    ]
    assert all(r["passed"] for r in records), records


def test_a_wrong_layer_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # a reference that reads the input backwards (chunks and bits reversed) must be caught
    real = gpu_check.reference_memory_layer

    def backwards(x, tables, bias, code_length, *args):
        return real(x.flip(-1), tables, bias, code_length, *args)

    monkeypatch.setattr(gpu_check, "reference_memory_layer", backwards)
    records = gpu_check.check_memory_layer("cpu", torch.float32, "torch", tokens=64, num_tables=4)
    assert not records[0]["passed"]


def test_loss_fell_and_mfu() -> None:
    assert gpu_check.loss_fell([10.8] * 5 + [9.0] * 40 + [8.0] * 5)
    assert not gpu_check.loss_fell([10.8] * 5 + [10.0] * 5)  # 0.8 nats < 1.0
    assert not gpu_check.loss_fell([10.8] * 5 + [float("nan")] * 5)
    assert not gpu_check.loss_fell([10.8, 5.0])  # too few steps to judge
    # 1e8 multiply-adds per token at 1e6 tokens/s = 2e14 FLOP/s = 20% of a 1000 TFLOP/s peak
    assert gpu_check.mfu(1e8, 1e6, 1000.0) == pytest.approx(0.2)
    assert gpu_check.mfu(1e8, 1e6, None) is None
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("Some Other GPU") is None


def test_read_metrics_orders_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss,train/tokens_per_s\n1,9.5,100\n0,10.5,\n2,8.5,300\n")
    assert gpu_check.read_metrics(path) == ([10.5, 9.5, 8.5], [100.0, 300.0])


def test_fit_command_composes_and_checks(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs
    from memoryformer.training.settings import check_config

    register_configs()
    overrides = [a for a in gpu_check.fit_command(tmp_path, peak=989.0)[2:] if not a.startswith("hydra.")]
    overrides.append(f"paths.output_dir={tmp_path}")  # what Hydra's run folder would give
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    plan = check_config(cfg)
    assert (plan.max_steps, plan.micro_batch_size, plan.data.seq_len) == (50, 16, 256)
    assert cfg.trainer.strategy.config.zero_optimization.stage == 2
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.name == "mf_tiny"


def test_write_report_is_json_and_atomic(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "gpu_check.json"
    gpu_check.write_report({"passed": True, "checks": {"a": {"passed": True}}}, out)
    assert json.loads(out.read_text()) == {"passed": True, "checks": {"a": {"passed": True}}}
    assert [p.name for p in out.parent.iterdir()] == ["gpu_check.json"]  # no temporary file left


def test_without_cuda_one_sentence_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA device: ") and "\n" not in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", gpu_check.IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_memory_layer_matches_float64(impl: str, dtype: torch.dtype) -> None:
    records = gpu_check.check_memory_layer("cuda", dtype, impl)
    assert all(r["passed"] for r in records), records


@pytest.mark.gpu
@needs_cuda
def test_cuda_lookup_bandwidth_is_measured() -> None:
    record = gpu_check.lookup_bandwidth("cuda", torch.bfloat16, "auto", iters=3)
    assert record["gb_per_s"] > 0 and record["path"] == "embedding_bag"


# ----------------------------------------------------------------------------- pass criteria, fabricated
def _lookup(dtype: str, impl: str, gb: float) -> dict:
    return {"dtype": dtype, "impl": impl, "gb_per_s": gb}


def test_bandwidth_passes_at_half_the_copy_bandwidth_and_fails_below() -> None:
    fp32_fast = _lookup("float32", "auto", 5000.0)  # only the bf16 auto path is judged
    assert gpu_check.bandwidth_verdict([_lookup("bfloat16", "auto", 1500.0), fp32_fast], 3000.0)["passed"]
    low = gpu_check.bandwidth_verdict([_lookup("bfloat16", "auto", 1499.0), fp32_fast], 3000.0)
    assert not low["passed"] and low["share"] == pytest.approx(1499 / 3000)
    assert not gpu_check.bandwidth_verdict([fp32_fast], 3000.0)["passed"]  # nothing judged is a failure
    assert not gpu_check.bandwidth_verdict([_lookup("bfloat16", "auto", 1.0)], 0.0)["passed"]


def test_copy_bandwidth_measures_something_on_cpu() -> None:
    assert gpu_check.copy_bandwidth("cpu", torch.bfloat16, megabytes=4, iters=2) > 0


def test_plan_within_15_percent_passes_and_a_missing_plan_fails() -> None:
    gib = 1 << 30
    assert gpu_check.plan_verdict(int(11.5 * gib), 10 * gib)["passed"]
    assert gpu_check.plan_verdict(int(8.5 * gib), 10 * gib)["passed"]
    assert not gpu_check.plan_verdict(int(11.6 * gib), 10 * gib)["passed"]
    assert not gpu_check.plan_verdict(int(8.4 * gib), 10 * gib)["passed"]
    missing = gpu_check.plan_verdict(None, 10 * gib, error="plan module missing: x")
    assert not missing["passed"] and missing["error"].startswith("plan module missing")


def test_plan_call_reports_a_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "memoryformer.training.sizing", None)  # import raises ImportError
    with pytest.raises(gpu_check.PlanMissingError, match="^plan module missing"):
        gpu_check.plan_peak_bytes(4, 2048)


def test_plan_call_is_the_plan_without_what_the_allocator_does_not_count() -> None:
    from memoryformer.config import ModelConfig
    from memoryformer.training import sizing as mp

    plan = mp.plan_memory(ModelConfig.from_name("mf_tiny"), 2048, 4, mp.Layout(precision="bf16-mixed"))
    unseen = plan.breakdown["cuda_context"] + plan.breakdown["allocator_slack"]
    assert gpu_check.plan_peak_bytes(4, 2048) == plan.peak_bytes - unseen
    assert 2 * 2**30 < gpu_check.plan_peak_bytes(4, 2048) < plan.peak_bytes  # weights + AdamW alone: 5 GiB


def test_throughput_is_recorded_against_the_documented_estimate(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("| Row | MFU | Basis |\n|---|---|---|\n| `mf_tiny` (MF-tiny) | 9% | **estimate** |\n")
    estimate = gpu_check.documented_mfu_estimate(doc)
    assert estimate == pytest.approx(0.09)
    ok = gpu_check.throughput_verdict(1e5, 0.045, estimate)
    assert ok["passed"] and ok["mfu_over_estimate"] == pytest.approx(0.5)
    assert not gpu_check.throughput_verdict(None, None, estimate)["passed"]  # the fit logged no speed
    assert not gpu_check.throughput_verdict(1e5, 0.045, None)["passed"]  # no estimate to compare with
    assert gpu_check.documented_mfu_estimate() is not None  # the real docs/benchmarks.md has the row


def test_lookup_check_measures_at_the_micro_batch_auto_picks() -> None:
    # the micro-batch is the dry run's for experiment=mf_tiny trainer=gpu device_memory_gb=80
    from hydra import compose, initialize_config_dir

    from memoryformer.conf_schema import register_configs
    from memoryformer.nn import memory_ops
    from memoryformer.training.settings import check_config

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["paths.output_dir=/tmp/mf_gpu_check_test", "experiment=mf_tiny",
                                           "trainer=gpu", "device_memory_gb=80", "dry_run=true"])
    dry = check_config(cfg)
    planned = gpu_check.planned_lookup(80 * 10**9)
    assert planned["micro_batch"] == dry.micro_batch_size and planned["tokens"] == dry.micro_batch_size * 2048
    # MF-tiny's three Memory Layer shapes (d = 512, K = 64, tau = 8, e = 2): Q/K/V 512 -> 1536, the Memory
    # Block's 512 -> 640 and 640 -> 512 (tau + e = 10 bits: 1024 rows per table)
    shapes = [(r["num_tables"], r["rows"], r["width"]) for r in planned["layers"]]
    assert sorted(shapes) == [(64, 64 * 256, 640), (64, 64 * 256, 1536), (64, 64 * 1024, 512)]
    for r in planned["layers"]:
        assert r["planned_bytes"] == memory_ops.lookup_backward_bytes(planned["tokens"], r["num_tables"],
                                                                      r["width"], r["rows"])
    assert planned["plan_term_bytes"] == max(r["planned_bytes"] for r in planned["layers"])


def test_lookup_verdict_fails_above_the_plan_by_more_than_15_percent() -> None:
    planned = {"micro_batch": 8, "seq_len": 2048, "plan_term_bytes": 2000,
               "layers": [{"planned_bytes": 1000}, {"planned_bytes": 2000}]}
    assert gpu_check.lookup_backward_verdict(planned, [1150, 100])["passed"]
    over = gpu_check.lookup_backward_verdict(planned, [1000, 2301])
    assert not over["passed"] and over["layers"][1]["over_plan"] == pytest.approx(0.1505)
    assert not gpu_check.lookup_backward_verdict({**planned, "layers": []}, [])["passed"]
