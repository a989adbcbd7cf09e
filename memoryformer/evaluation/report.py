"""Render evaluation runs as the paper's Table 1 and Table 2, beside the paper's own numbers.

    python -m memoryformer.evaluation.report outputs/eval/RUN_A outputs/eval/RUN_B ... --out report/

Each RUN_DIR is an evaluate.py output (results.json + run_info.json). Table 1 lists, for each of the six
paper models, the paper's row and then every run whose architecture matches it (layers, hidden size and
block type); other runs follow. Layers, hidden size and FLOPs per block (s = 2048) come from the analytic
counter `memoryformer.flops` applied to the model config; the paper's printed FLOPs are stored in
`paper_results.yaml` and shown where they differ. Writes `report.md`, `table1.png` (grouped bars per task)
and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from memoryformer.config import ModelConfig
from memoryformer.evaluation.config import EvalSettings
from memoryformer.evaluation.paper import COLUMN_TASKS, paper_results
from memoryformer.evaluation.runner import task_scores

GIGA = 1e9


@dataclass
class Row:
    """One table row: a model, where its numbers come from, and its scores per paper column."""

    label: str
    source: str
    config: ModelConfig | None
    scores: dict[str, float | None] = field(default_factory=dict)  # paper column -> value
    metrics: dict[str, str] = field(default_factory=dict)  # paper column -> "acc" / "acc_norm (wsc273)"
    paper_flops: tuple[float, float] | None = None  # (w/o attention, total) as printed in the paper
    printed_average: float | None = None  # the paper's own Avg. column (its rounding of the mean)

    @property
    def average(self) -> float | None:
        """Mean over the six columns (the paper's printed value for its rows), None if a column is missing."""
        if self.printed_average is not None:
            return self.printed_average
        vals = [self.scores.get(c) for c in COLUMN_TASKS]
        return None if any(v is None for v in vals) else sum(vals) / len(vals)


def counter_flops(config: ModelConfig, seq_len: int = 2048) -> tuple[float, float]:
    """(FLOPs w/o attention, total) of one block in G, by the paper's rule, from `memoryformer.flops`."""
    from memoryformer.flops import model_cost

    block = model_cost(config, seq_len).block
    return block.without_attention_paper / GIGA, block.total_paper / GIGA


def paper_rows(table: str = "table1") -> list[Row]:
    """The paper's rows of `table`, with our preset's config where the row is one of our models."""
    data = paper_results()
    rows = []
    for r in data[table]:
        cfg = ModelConfig.from_name(r["model"]) if r.get("model") else None
        printed = (r.get("flops_wo_attn_g"), r["flops_total_g"])
        rows.append(
            Row(
                label=r["label"],
                source="paper",
                config=cfg,
                scores=dict(zip(data["tasks"], r["scores"], strict=True)),
                metrics=dict.fromkeys(data["tasks"], "paper"),
                paper_flops=printed,
                printed_average=r["avg"],
            )
        )
    return rows


def run_row(run_dir: str | Path) -> Row:
    """A row from one evaluate.py output directory (results.json + run_info.json)."""
    d = Path(run_dir)
    try:
        results = json.loads((d / "results.json").read_text())
        info = json.loads((d / "run_info.json").read_text())
    except FileNotFoundError as err:
        raise SystemExit(
            f"error: {d} is not an evaluate.py run directory ({Path(err.filename).name} is missing)."
        ) from err
    settings = EvalSettings(**{k: v for k, v in info["settings"]["eval"].items()})
    by_task = {r["task"]: r for r in task_scores(results, settings)}
    row = Row(
        label=info.get("label", d.name),
        source=f"ours ({d.name})",
        config=ModelConfig.from_dict(info["model"]) if info.get("model") else None,
    )
    for column, candidates in COLUMN_TASKS.items():
        hit = next((by_task[t] for t in candidates if t in by_task), None)
        if hit is not None:
            row.scores[column] = hit["value"]
            row.metrics[column] = hit["metric"] + ("" if hit["task"] == column else f" ({hit['task']})")
    return row


def _same_arch(a: ModelConfig | None, b: ModelConfig | None) -> bool:
    if a is None or b is None:
        return False
    keys = ("block", "n_layer", "n_embd") + (("num_tables", "code_length") if a.is_memoryformer else ())
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _fmt_flops(row: Row, index: int) -> str:
    if row.config is None:
        printed = row.paper_flops[index] if row.paper_flops else None
        return f"{printed} G (paper)" if printed is not None else "n/a"
    ours = round(counter_flops(row.config)[index], 1)
    printed = row.paper_flops[index] if row.paper_flops else None
    if printed is not None and round(float(printed), 1) != ours:
        return f"{ours:.1f} G (paper prints {printed} G)"
    return f"{ours:.1f} G"


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def table_markdown(rows: list[Row], table: str = "table1") -> str:
    """Markdown in the paper's layout: model, source, layers, hidden, FLOPs, six tasks, average."""
    labels = paper_results()["task_labels"]
    cols = [labels[c] for c in COLUMN_TASKS]
    flops_cols = ["FLOPs w/o Attn.", "Total FLOPs"] if table == "table1" else ["FLOPs"]
    head = ["Model", "Source", "Layers", "Hidden", *flops_cols, *cols, "Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        layers = str(r.config.n_layer) if r.config else "—"
        hidden = str(r.config.n_embd) if r.config else "—"
        flops = [_fmt_flops(r, 0), _fmt_flops(r, 1)] if table == "table1" else [_fmt_flops(r, 1)]
        scores = [_fmt(r.scores.get(c)) for c in COLUMN_TASKS]
        lines.append(
            "| " + " | ".join([r.label, r.source, layers, hidden, *flops, *scores, _fmt(r.average)]) + " |"
        )
    return "\n".join(lines)


def build_tables(run_dirs: list[str | Path]) -> tuple[list[Row], list[Row]]:
    """(Table 1 rows, Table 2 rows): paper rows, each followed by matching runs; unmatched runs last."""
    runs = [run_row(d) for d in run_dirs]
    tables = []
    for table in ("table1", "table2"):
        rows, used = [], set()
        for p in paper_rows(table):
            rows.append(p)
            for i, r in enumerate(runs):
                if _same_arch(p.config, r.config):
                    rows.append(r)
                    used.add(i)
        if table == "table1":
            rows += [r for i, r in enumerate(runs) if i not in used]
        tables.append(rows)
    return tables[0], tables[1]


def metric_notes(rows: list[Row]) -> list[str]:
    """One line per run saying which lm-eval metric (and task) fills each column."""
    notes = []
    for r in rows:
        if r.source != "paper":
            parts = ", ".join(f"{c}: {m}" for c, m in r.metrics.items())
            notes.append(f"- {r.label} {r.source}: {parts}")
    return notes


def plot(rows: list[Row], path: Path) -> Path:
    """Grouped bar chart: one group per task (and the average), one bar per row that has scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = paper_results()["task_labels"]
    columns = [*COLUMN_TASKS, "avg"]
    shown = [r for r in rows if any(v is not None for v in r.scores.values())]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(columns) * max(1, len(shown)) / 3), 4.5))
    width = 0.8 / max(1, len(shown))
    for i, r in enumerate(shown):
        vals = [r.scores.get(c) if c != "avg" else r.average for c in columns]
        xs = [j + i * width for j in range(len(columns))]
        ax.bar(
            xs,
            [v if v is not None else 0 for v in vals],
            width,
            label=f"{r.label} [{r.source}]",
            hatch="//" if r.source == "paper" else None,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))])
    ax.set_xticklabels([labels.get(c, "Avg.") for c in columns])
    ax.set_ylabel("zero-shot accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Zero-shot accuracy: ours vs the paper (Table 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Markdown of Tables 1 and 2 for `run_dirs`; with `out_dir`, also writes report.md and table1.png."""
    t1, t2 = build_tables(run_dirs)
    src = paper_results()["source"]
    md = [
        "## Table 1: zero-shot accuracy and FLOPs per block (s = 2048)",
        "",
        table_markdown(t1, "table1"),
        "",
        "FLOPs come from the analytic counter (`python -m memoryformer.flops`, one multiply-add = one FLOP, "
        "the paper's 6Ksd rule for MemoryFormer blocks). The paper's MF-small row prints 1.0 G / 7.4 G, "
        "which its own rule does not give (0.906 G / 7.348 G); the cell shows both.",
        "",
        "## Table 2: efficient-attention variants of Pythia-410M",
        "",
        table_markdown(t2, "table2"),
        "",
        "Linformer, cosFormer and Performer FLOPs are the paper's (their settings are not given).",
        "",
        f"Paper numbers: {src}. The paper does not say whether a column is acc or acc_norm; its WSC "
        "column is SuperGLUE WSC (104 examples).",
    ]
    notes = metric_notes(t1)
    if notes:
        md += ["", "Metrics used by our runs (lm-eval metric per column):", "", *notes]
    text = "\n".join(md) + "\n"
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        plot(t1, out / "table1.png")
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m memoryformer.evaluation.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("run_dirs", nargs="*", help="evaluate.py output directories")
    parser.add_argument("--out", default="eval_report", help="where report.md and table1.png go")
    args = parser.parse_args(argv)
    print(render(args.run_dirs, args.out))
    print(f"written: {Path(args.out) / 'report.md'}, {Path(args.out) / 'table1.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
