"""The evaluation report (`python -m memoryformer.evaluation.report`) and the CPU reproduction
(`python -m reproduction`) lay out the paper's tables from one source: the paper's rows printed by both follow
`paper_results.yaml`, and both draw Tables 3-5 through one figure with our rows at the paper's settings.

The expected numbers are read from the data file here (edited, so that no other copy of them could pass)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memoryformer.evaluation import figures, tables  # noqa: E402
from memoryformer.evaluation.report import render  # noqa: E402
from reproduction import protocol  # noqa: E402
from reproduction import report as reproduction_report  # noqa: E402

ACCURACY, SWEEPS = ("1", "2", "6"), ("3", "4", "5")


def _reproduction_rows(table_numbers: str) -> tuple[list[protocol.Row], dict[str, dict]]:
    """The smoke plan's fixed rows of `table_numbers` and a made-up result for each of their runs."""
    rows = protocol.build_plan(list(table_numbers), protocol.SMOKE).rows
    results = {}
    for i, run in enumerate(r for row in rows for r in row.runs):
        results[run.key] = {
            "val_loss": 4.0 + 0.01 * i,
            "params": 1e6,
            "flops_per_token": 2e6,
            "train_seconds": 1.0,
            "hash": {"weight_mean": 0.5, "used_mean": 0.5, "used_min": 0.1},
        }
    return rows, results


def _line(md: str, table: str, start: str) -> str:
    """The line of `table`'s section in `md` that starts with `start`."""
    section = md.split(f"## Table {table}:")[1].split("## Table")[0]
    return next(line for line in section.splitlines() if line.startswith(start))


@pytest.fixture
def edited_paper(tmp_path, monkeypatch) -> dict:
    """paper_results.yaml with every printed accuracy halved and every perplexity raised by 100."""
    data = yaml.safe_load(tables.PAPER_RESULTS.read_text(encoding="utf-8"))
    for t in ACCURACY:
        for row in data[f"table{t}"]:
            row["scores"] = [round(s / 2, 4) for s in row["scores"]]
            row["avg"] = round(row["avg"] / 2, 4)
    for t in SWEEPS:
        for row in data[f"table{t}"]["rows"]:
            row["val_ppl"] = round(row["val_ppl"] + 100, 2)
    path = tmp_path / "paper_results.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    monkeypatch.setattr(tables, "PAPER_RESULTS", path)
    tables.paper_results.cache_clear()
    yield data
    tables.paper_results.cache_clear()


def test_both_reports_print_the_paper_rows_of_the_data_file(edited_paper):
    evaluation = render([])
    rows, results = _reproduction_rows("123456")
    for t in ACCURACY + SWEEPS:
        ours = [r for r in rows if r.table == t]
        reproduction = "\n".join(reproduction_report.table_section(t, ours, {}, results, []))
        assert reproduction.startswith(f"## {tables.title(t)}\n")
        assert f"## {tables.title(t, paper_scale=True)}\n" in evaluation
        spec = edited_paper[f"table{t}"]
        for row in spec if t in ACCURACY else spec["rows"]:
            if t in ACCURACY:
                scores = " | ".join(f"{s:.3f}" for s in row["scores"])
                paper = _line(evaluation, t, f"| {row['label']} | paper |")
                assert paper.endswith(f"| {scores} | {row['avg']:.3f} |")
                flops = f"{row['flops_total_g']} G" if row.get("flops_total_g") else "-"
                assert f"\n| {row['label']} | {row['avg']:.3f} | {flops} |\n" in reproduction
            else:
                paper = _line(evaluation, t, f"| {row['label']} |")
                assert f"| {row['val_ppl']:.2f} | not run | — | — |" in paper
                assert f"\n| {row['label']} | {row['val_ppl']} |\n" in reproduction


def test_both_reports_draw_tables_3_to_5_through_one_figure_at_the_papers_settings(tmp_path, monkeypatch):
    drawn: list[tuple[str, dict[str, list[tables.Row]]]] = []
    monkeypatch.setattr(
        figures, "plot_sweeps", lambda ours, path, **kw: drawn.append((Path(path).name, ours))
    )
    run = tmp_path / "runs" / "multirun" / "table4_lr" / "t" / "1"
    (run / "checkpoints").mkdir(parents=True)
    config = {"name": "table4_lr", "model": {"name": "mf_tiny"}, "optim": {"lr": 2e-3}}
    (run / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("step,val/loss,val/ppl,val/at_step\n7999,2.97,19.5,8000\n")
    render([tmp_path / "runs"], tmp_path / "report")
    rows, results = _reproduction_rows("345")
    reproduction_report.plot_sweeps(rows, results, tmp_path / "sweeps.png")

    by_file = dict(drawn)
    assert set(by_file) == {"table3.png", "table4.png", "table5.png", "sweeps.png"}
    for t in SWEEPS:
        settings = {r.setting for r in tables.paper_rows(t)}
        ours = by_file["sweeps.png"][t]
        assert {r.setting for r in ours} <= settings  # every row of the CPU protocol at a paper setting
        assert all(r.seeds == 2 and r.spread["val_ppl"] > 0 for r in ours)
    (evaluated,) = by_file["table4.png"]["4"]
    assert math.isclose(evaluated.setting, 2e-3) and evaluated.values["val_ppl"] == 19.5
    assert by_file["table3.png"] == {"3": []}  # no run of ours: only the paper's line
