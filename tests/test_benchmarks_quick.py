"""`benchmarks/run.py --quick` runs end to end and writes a well-formed report (no timing is asserted).

CI runs this so that the benchmark script cannot rot: every case runs at tiny sizes, the Markdown has the
machine header and one table per case, and the ratio columns agree with the times printed beside them.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_DIR / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seconds(cell: str) -> float:
    value, unit = cell.split()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def _table_after(text: str, title: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table after the line containing `title`."""
    lines = text[text.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_discover_puts_our_cases_first(run_module):
    names = run_module.discover()
    # the numbered cases first, in their order (6 = efficient attention); the rest (data loading) by name
    assert names[:4] == ["bench_memory_layer", "bench_models", "bench_throughput", "bench_attention"]
    assert names == names[:4] + sorted(names[4:])
    assert all((BENCH_DIR / f"{n}.py").exists() for n in names)


def test_a_failing_module_is_reported_not_fatal(run_module, tmp_path, monkeypatch):
    broken = types.ModuleType("bench_broken")

    def run(quick: bool) -> str:
        raise RuntimeError("no data file\nsecond line")

    broken.run = run
    fine = types.ModuleType("bench_fine")
    fine.run = lambda quick: f"## Fine\n\nquick={quick}\n"
    monkeypatch.setitem(sys.modules, "bench_broken", broken)
    monkeypatch.setitem(sys.modules, "bench_fine", fine)
    monkeypatch.setattr(run_module, "discover", lambda: ["bench_broken", "bench_fine"])
    monkeypatch.setattr(run_module, "header", lambda quick: "# Benchmarks\n")
    out = tmp_path / "bench.md"
    assert run_module.main(["--quick", "--out", str(out)]) == 1
    text = out.read_text()
    assert "## bench_broken\n\nSkipped: RuntimeError: no data file\n" in text
    assert "second line" not in text
    assert "## Fine\n\nquick=True" in text


@pytest.mark.slow
def test_quick_run_writes_every_case(run_module, tmp_path):
    out = tmp_path / "benchmarks.md"
    failures = run_module.main(["--quick", "--out", str(out), "--only", "bench_memory_layer", "bench_models",
                                "bench_throughput"])
    text = out.read_text()
    assert failures == 0, text
    for needle in ("Machine:", "torch 2.", "torch threads", "Copy bandwidth", "Load average",
                   "## 1. Memory Layer", "## 2. Whole-model decode", "## 3. Training step", "## 4. FLOPs"):
        assert needle in text
    # Case 1: one row per token count, and "ref / fused" is the ratio of the two printed times.
    fwd = _table_after(text, "### Forward (no grad)")
    assert [int(r[0]) for r in fwd] == [1, 8, 64]
    for row in fwd:
        ratio = float(row[5].rstrip("x"))
        assert ratio == pytest.approx(_seconds(row[4]) / _seconds(row[2]), rel=0.02, abs=0.01)
    assert len(_table_after(text, "### Forward + backward")) == 3
    # Case 2: three models with positive tokens/s; case 4: Table 1's rule gives 12 d / (6 K) = 16x at nano.
    decode = _table_after(text, "## 2. Whole-model decode")
    assert len(decode) == 3 and all(float(r[2]) > 0 for r in decode)
    flops = _table_after(text, "## 4. FLOPs")
    assert flops[-1][0] == "Pythia / MemoryFormer"
    assert float(flops[-1][1].rstrip("x")) == pytest.approx(12 * 128 / (6 * 16), rel=1e-3)
    assert re.search(r"\| nano \| [\d.]+ M \|", text)
    # Case 5: every paper row has a cost line, and the quick nano step ran
    costs = _table_after(text, "## 5. Cost of the paper's rows")
    for row in ("pythia_70m", "mf_tiny", "pythia_160m", "mf_small", "pythia_410m", "mf_base"):
        assert any(r[0].startswith(f"`{row}`") for r in costs), row
    assert re.search(r"Quick check: nano, 2 x 32 tokens, one step in [\d.]+ s", text)


def test_attention_benchmark_quick_mode(run_module):
    # run_module put benchmarks/ and the repository root on sys.path, as `make bench` does.
    import bench_attention

    text = bench_attention.run(quick=True)
    assert text.startswith("## 6. Efficient attention vs softmax")
    for title in ("### Forward (no grad)", "### Forward + backward"):
        rows = _table_after(text, title)
        assert [r[0] for r in rows] == ["softmax", "linformer", "cosformer", "performer"]
        for row in rows:
            for cell in row[1:3]:  # "12.3 ms (1.20x)": positive times; softmax's own speed-up is 1
                time_part = cell.split(" (")[0]
                assert _seconds(time_part) > 0
            if row[0] == "softmax":
                assert all(c.endswith("(1.00x)") for c in row[1:3])


def test_attention_crossover_interpolates_log_log():
    sys.path.insert(0, str(BENCH_DIR))
    import bench_attention

    # softmax 4x slower at 2048 and 4x faster at 512: equal at the geometric middle, 1024
    assert bench_attention.crossover([512, 2048], [1.0, 4.0], [4.0, 1.0]) == "wins above ~1024"
    assert bench_attention.crossover([512, 2048], [2.0, 4.0], [1.0, 1.0]).startswith("wins at every")
    assert bench_attention.crossover([512, 2048], [1.0, 1.0], [2.0, 4.0]).startswith("slower at every")


def test_rewrite_keeps_sections_other_scripts_wrote(run_module):
    block = "<!-- keep:train-step-compare -->\n## Before and after\n<!-- /keep:train-step-compare -->\n"
    old = "# Benchmarks\n\n## 1. old case\n\n" + block + "\n## How to read these numbers\n"
    assert run_module.kept_sections(old) == [block]
    assert run_module.kept_sections("<!-- keep:a -->\nunterminated") == []
