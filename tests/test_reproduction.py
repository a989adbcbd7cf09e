"""`make reproduce-cpu` (the `reproduction` driver): the plan, resume, table selection, outputs, and the
committed `docs/reproduction.json` (every argv composes; the fastest row retrains to its stored loss)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memoryformer.conf_schema import register_configs  # noqa: E402
from reproduction import protocol  # noqa: E402
from reproduction.__main__ import main as reproduce  # noqa: E402
from reproduction.report import Stat, compare  # noqa: E402

register_configs()
COMMITTED = ROOT / "docs" / "reproduction.json"


def test_plan_shares_runs_between_tables_and_keeps_table1_protocol() -> None:
    scale = protocol.Scale()
    plan = protocol.build_plan(protocol.TABLES, scale)
    keys = [r.key for r in plan.runs()]
    assert len(keys) == len(set(keys))
    rows = {(r.table, r.label): r for r in plan.rows}
    mf_a = rows[("1", "(a) MemoryFormer, lr 0.003 (3x, the paper's protocol)")]
    dense_a = rows[("1", "(a) dense twin, lr 0.001 (Pythia-70M's)")]
    assert [r.seed for r in mf_a.runs] == [0, 1, 2] and mf_a.runs[0].lr == 3 * dense_a.runs[0].lr
    # the MemoryFormer at 3e-3, seed 0, is one run in Tables 1, 3 (tau 8), 4 (3e-3), 5 (2 bits) and 6
    shared = mf_a.runs[0].key
    for table in "3456":
        assert any(shared in [r.key for r in row.runs] for row in plan.rows if row.table == table), table
    # twin and MemoryFormer differ only in the block type; the equal-parameter model is wider and deeper
    assert set(dense_a.runs[0].argv) - set(mf_a.runs[0].argv) >= {"model.block=pythia", "optim.lr=0.001"}
    assert {p.model for p in plan.pending} == {"mf", "dense", "dense_wide"}
    assert all(len(s) >= 3 for s in plan.sweeps.values())


def test_table_selection_is_checked() -> None:
    assert protocol.parse_tables("4,1") == ["1", "4"]
    assert protocol.parse_tables("") == list(protocol.TABLES)
    with pytest.raises(ValueError, match="TABLES=1,7 names unknown table"):
        protocol.parse_tables("1,7")


def test_compare_needs_two_standard_errors() -> None:
    a, b = Stat(4.00, 0.01, 3), Stat(4.10, 0.01, 3)
    assert compare(a, b) == "lower" and compare(b, a) == "higher"
    assert compare(Stat(4.00, 0.2, 2), Stat(4.05, 0.2, 2)) == "within"


def test_every_model_variant_of_the_plan_composes_to_its_scale() -> None:
    scale = protocol.Scale()
    # one run per model variant (the seeds and lrs of a variant differ only in two numbers)
    variants = {}
    for run in protocol.build_plan(protocol.TABLES, scale).runs():
        variants.setdefault(tuple(a for a in run.argv if a.startswith("model")), run)
    assert len(variants) >= 10
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for run in variants.values():
            cfg = compose("config", overrides=list(run.argv))
            assert cfg.trainer.max_steps == scale.steps and cfg.data.seq_len == scale.seq_len
            assert cfg.optim.lr == run.lr and cfg.seed == run.seed


@pytest.mark.slow
def test_smoke_protocol_writes_outputs_skips_finished_runs_and_selects_tables(tmp_path: Path) -> None:
    args = ["--scale", "smoke", "--in-process", "--out-dir", str(tmp_path / "runs"), "--docs-dir",
            str(tmp_path / "docs")]
    first = reproduce([*args, "--tables", "5,6"])
    trained = set(first.trained)
    assert {k for k in trained if "expand_bits" in k} and {k for k in trained if "gelu" in k}
    assert not {k for k in trained if k.startswith("dense")}  # Table 1 and 2 were not selected
    doc = json.loads((tmp_path / "docs" / "reproduction_smoke.json").read_text())
    assert {r["table"] for r in doc["rows"]} == {"5", "6"}
    for r in doc["rows"]:
        assert r["steps"] == 2 and r["tokens"] == 2 * 2 * 16 and r["val_loss"] > 0
        assert r["params"] > 0 and r["flops_per_token"] > 0 and 0 < r["buckets_used_mean"] <= 1
    md = (tmp_path / "docs" / "reproduction_smoke.md").read_text()
    assert "## Table 5" in md and "## Table 6" in md and "## Table 1" not in md
    assert (tmp_path / "docs" / "reproduction_smoke_sweeps.png").stat().st_size > 1000

    again = reproduce([*args, "--tables", "5,6"])
    assert again.trained == []  # every run was finished: nothing retrained
    # an interrupted run (no result.json) is retrained; the finished ones are not
    victim = next(iter(trained))
    (tmp_path / "runs" / "smoke" / "runs" / victim / "result.json").unlink()
    assert reproduce([*args, "--tables", "6,5"]).trained == [victim]


@pytest.mark.slow
def test_table1_smoke_resolves_best_lr_rows_with_heldout_and_figures(tmp_path: Path) -> None:
    args = ["--scale", "smoke", "--tables", "1", "--in-process", "--out-dir", str(tmp_path / "runs"),
            "--docs-dir", str(tmp_path / "docs")]
    reproduce(args)
    doc = json.loads((tmp_path / "docs" / "reproduction_smoke.json").read_text())
    labels = {r["row"] for r in doc["rows"]}
    assert any(lbl.startswith("(b) MemoryFormer (best lr") for lbl in labels)
    assert any(lbl.startswith("(c) dense, about") for lbl in labels)
    t1 = [r for r in doc["rows"] if not r["row"].startswith("lr sweep")]
    assert all(0 < r["heldout_bits_per_byte"] < 20 for r in t1)
    for name in ("table1_curves", "buckets"):
        assert (tmp_path / "docs" / f"reproduction_smoke_{name}.png").stat().st_size > 1000


def _committed_rows() -> list[dict]:
    if not COMMITTED.is_file():
        pytest.fail("docs/reproduction.json is missing: run `make reproduce-cpu` and commit its outputs.")
    return json.loads(COMMITTED.read_text())["rows"]


def test_committed_reproduction_argv_compose_and_fields_are_complete() -> None:
    fields = {"table", "row", "argv", "seed", "steps", "tokens", "val_loss", "val_ppl", "params",
              "flops_per_token", "train_seconds"}
    rows = _committed_rows()
    assert {r["table"] for r in rows} == set(protocol.TABLES)
    for r in rows:
        assert fields <= r.keys(), r["row"]
    unique = {tuple(r["argv"]): r for r in rows}  # a run shared by several tables composes once
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for r in unique.values():
            cfg = compose("config", overrides=r["argv"])
            assert cfg.trainer.max_steps == r["steps"] and cfg.seed == r["seed"]
            assert cfg.global_batch_size * cfg.data.seq_len * r["steps"] == r["tokens"]


@pytest.mark.slow
def test_fastest_committed_row_retrains_to_its_stored_loss(tmp_path: Path) -> None:
    row = min(_committed_rows(), key=lambda r: r["train_seconds"])
    out = subprocess.run(
        [sys.executable, "train.py", *row["argv"], f"hydra.run.dir={tmp_path / 'run'}", "export_final=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    losses = re.findall(r"step\s+(\d+) \| val/loss (\d+\.\d+)", out.stdout)
    assert losses and int(losses[-1][0]) == row["steps"]
    got = float(losses[-1][1])
    # seeded, but not bit-reproducible on CPU across thread counts (the driver trains with 1 thread)
    assert abs(got - row["val_loss"]) <= 0.03 * row["val_loss"], (got, row["val_loss"])
