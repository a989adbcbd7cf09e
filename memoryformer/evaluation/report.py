"""The paper's six tables from finished runs, our numbers beside the paper's: Markdown and one PNG per table.

    python -m memoryformer.evaluation.report RUN_OR_FOLDER ... --out report/

Each path is a training run (train.py's folder: `checkpoints/config.yaml`, `csv/metrics.csv`), an evaluate.py
run (`results.json`, `run_info.json`), or any folder above them (`outputs/`, `multirun/table4_lr/`); see
`memoryformer.evaluation.runs`. Tables 1, 2 and 6 report zero-shot accuracy from evaluation runs; Tables 3,
4 and 5 the last validation perplexity of training runs (`memoryformer.evaluation.ablations`). The paper's
rows, the row model and the titles are those of `memoryformer.evaluation.tables`, which the CPU reproduction
(`python -m reproduction`) lays out too.

Run -> row: a run belongs to a paper row when its training `name` (every experiment file sets it; the
multirun jobs of `experiment=table4_lr` are all named table4_lr) is one of the row's `experiments` in
`paper_results.yaml` and its saved config has the row's `match` values (e.g. optim.lr=2e-3). An evaluation
run is tied to its training run through the checkpoint it evaluated. An evaluation run whose training run is
not at hand (a Pythia baseline through `baseline=hf`, a copied checkpoint) falls back to the architecture:
block type, layers, width (and K, tau) of the row's preset. Rows with no run read "not run", never 0.
Our WSC cells say "(wsc273)" when the run evaluated lm-eval's wsc273 instead of the paper's SuperGLUE WSC.
Layers, hidden size and FLOPs per block (s = 2048) of Tables 1 and 2 come from `memoryformer.flops`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memoryformer.config import ConfigError, ModelConfig
from memoryformer.evaluation.ablations import ablation_markdown, ablation_rows, plot_ablation
from memoryformer.evaluation.config import EvalSettings
from memoryformer.evaluation.figures import pyplot, save
from memoryformer.evaluation.runs import EvalRun, Runs, TrainRun, find_runs, matches
from memoryformer.evaluation.scores import task_scores
from memoryformer.evaluation.tables import (
    ACCURACY_TABLES,
    COLUMN_TASKS,
    TITLES,
    Row,
    markdown_table,
    paper_results,
    paper_rows,
    title,
)

GIGA = 1e9
FLOPS_KEYS = ("flops_wo_attn_g", "flops_total_g")  # a paper row's printed FLOPs: w/o attention, total


def uses_wsc273(row: Row) -> bool:
    """True when the row's WSC cell holds lm-eval's wsc273, not the paper's SuperGLUE WSC."""
    return "(wsc273)" in row.metrics.get("wsc", "")


def average(row: Row) -> float | None:
    """The paper's printed Avg. for its rows, else the mean over the six columns (None if one is missing)."""
    if "avg" in row.values:
        return row.values["avg"]
    vals = [row.values.get(c) for c in COLUMN_TASKS]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def counter_flops(config: ModelConfig, seq_len: int = 2048) -> tuple[float, float]:
    """(FLOPs w/o attention, total) of one block in G, by the paper's rule, from `memoryformer.flops`."""
    from memoryformer.flops import model_cost

    block = model_cost(config, seq_len).block
    return block.without_attention_paper / GIGA, block.total_paper / GIGA


def _model_config(raw: dict | None) -> ModelConfig | None:
    # A run from a branch with model keys we do not know yet is still reported, by its training name.
    try:
        return ModelConfig.from_dict(raw) if raw else None
    except (ConfigError, TypeError):
        return None


def eval_row(run: EvalRun) -> Row:
    """A row from one evaluate.py run: its label, its scores per paper column and the metric behind each."""
    info = run.info
    settings = EvalSettings(**{k: v for k, v in info["settings"]["eval"].items()})
    by_task = {r["task"]: r for r in task_scores(run.results, settings)}
    source = f"ours ({run.path.name})"
    if run.train is not None:
        source = f"ours ({run.train.short_path}, eval {run.path.name})"
    row = Row(label=info.get("label", run.path.name), source=source, config=_model_config(info.get("model")))
    for column, candidates in COLUMN_TASKS.items():
        hit = next((by_task[t] for t in candidates if t in by_task), None)
        if hit is not None:
            row.values[column] = hit["value"]
            row.metrics[column] = hit["metric"] + ("" if hit["task"] == column else f" ({hit['task']})")
    return row


def _same_arch(a: ModelConfig | None, b: ModelConfig | None) -> bool:
    if a is None or b is None:
        return False
    keys = ("block", "n_layer", "n_embd") + (("num_tables", "code_length") if a.is_memoryformer else ())
    # "attention" (softmax / linformer / ...): a Table 2 variant is not the Pythia-410M row
    same_attention = getattr(a, "attention", "softmax") == getattr(b, "attention", "softmax")
    return same_attention and all(getattr(a, k) == getattr(b, k) for k in keys)


def _arch_matches(paper: Row, run: EvalRun, row: Row) -> bool:
    """Fallback for an evaluation run without its training run: same architecture and `match` model keys."""
    return _same_arch(paper.config, row.config) and matches(
        paper.spec, {"model": run.info.get("model") or {}}, prefix="model."
    )


def _fmt_flops(row: Row, index: int) -> str:
    printed = row.spec.get(FLOPS_KEYS[index])
    if row.config is None:
        return f"{printed} G (paper)" if printed is not None else "n/a"
    ours = round(counter_flops(row.config)[index], 1)
    if printed is not None and round(float(printed), 1) != ours:
        return f"{ours:.1f} G (paper prints {printed} G)"
    return f"{ours:.1f} G"


def _fmt(v: float | None, tag: str = "") -> str:
    return "—" if v is None else f"{v:.3f}{tag}"


def _score_cells(r: Row) -> list[str]:
    if r.status:
        return [r.status] * (len(COLUMN_TASKS) + 1)
    wsc273 = uses_wsc273(r)
    cells = [_fmt(r.values.get(c), " (wsc273)" if c == "wsc" and wsc273 else "") for c in COLUMN_TASKS]
    return [*cells, _fmt(average(r), " (incl. wsc273)" if wsc273 else "")]


def table_markdown(rows: list[Row], table: str = "1") -> str:
    """Markdown in the paper's layout: model, source, layers, hidden, FLOPs, six tasks, average."""
    labels = paper_results()["task_labels"]
    flops_cols = {"1": ["FLOPs w/o Attn.", "Total FLOPs"], "2": ["FLOPs"]}.get(table, [])
    head = ["Model", "Source", "Layers", "Hidden", *flops_cols, *(labels[c] for c in COLUMN_TASKS), "Avg."]
    body = []
    for r in rows:
        arch = [str(r.config.n_layer), str(r.config.n_embd)] if r.config and not r.status else ["—", "—"]
        flops = {"1": [0, 1], "2": [1]}.get(table, [])
        flops = [_fmt_flops(r, i) for i in flops] if not r.status else ["—"] * len(flops)
        body.append([r.label, r.source, *arch, *flops, *_score_cells(r)])
    return "\n".join(markdown_table(head, body))


def accuracy_rows(table: str, runs: Runs) -> tuple[list[Row], list[Row]]:
    """(rows of `table`, evaluation rows placed nowhere): each paper row, then ours or a "not run" row.

    Our rows: evaluation runs whose training run matches the paper row (module docstring), evaluation runs
    without a training run by architecture, and matching training runs not yet evaluated ("not evaluated").
    """
    evals = [(run, eval_row(run)) for run in runs.evals]
    rows, used = [], set()
    for paper in paper_rows(table):
        rows.append(paper)
        ours = []
        for i, (run, row) in enumerate(evals):
            linked = run.train is not None and run.train.fills(paper.spec)
            if linked or (run.train is None and _arch_matches(paper, run, row)):
                ours.append(row)
                used.add(i)
        evaluated = {run.train.path for run, _ in evals if run.train is not None}
        for t in runs.train:
            if t.path not in evaluated and t.fills(paper.spec):
                ours.append(_placeholder(paper, t, "not evaluated"))
        rows += ours or [_placeholder(paper, None, "not run")]
    return rows, [row for i, (_, row) in enumerate(evals) if i not in used]


def _placeholder(paper: Row, run: TrainRun | None, status: str) -> Row:
    source = "ours" if run is None else f"ours ({run.short_path})"
    return Row(label=paper.label, source=source, config=paper.config, status=status)


def metric_notes(rows: list[Row]) -> list[str]:
    """One line per run saying which lm-eval metric (and task) fills each column."""
    notes = []
    for r in rows:
        if r.source != "paper" and not r.status:
            parts = ", ".join(f"{c}: {m}" for c, m in r.metrics.items())
            notes.append(f"- {r.label} {r.source}: {parts}")
    return notes


def plot(rows: list[Row], path: Path, title: str = "Zero-shot accuracy: ours vs the paper (Table 1)") -> Path:
    """Grouped bar chart: one group per task (and the average), one bar per row that has scores.

    Missing values get no bar (never a bar at 0); rows not run are left out and named under the chart.
    """
    plt = pyplot()
    labels = paper_results()["task_labels"]
    columns = [*COLUMN_TASKS, "avg"]
    shown = [r for r in rows if not r.status and any(v is not None for v in r.values.values())]
    not_run = [f"{r.label}: {r.status}" for r in rows if r.status]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(columns) * max(1, len(shown)) / 3), 4.5))
    width = 0.8 / max(1, len(shown))
    for i, r in enumerate(shown):
        vals = [r.values.get(c) if c != "avg" else average(r) for c in columns]
        xs = [j + i * width for j in range(len(columns))]
        kept = [(x, v) for x, v in zip(xs, vals, strict=True) if v is not None]
        wsc = " (WSC = wsc273)" if uses_wsc273(r) else ""
        ax.bar(
            [x for x, _ in kept],
            [v for _, v in kept],
            width,
            label=f"{r.label} [{r.source}]{wsc}",
            hatch="//" if r.source == "paper" else None,
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(columns))])
    ax.set_xticklabels([labels.get(c, "Avg.") for c in columns])
    ax.set_ylabel("zero-shot accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    if not_run:
        fig.text(0.01, 0.01, "ours: " + "; ".join(not_run), fontsize=6)
    return save(fig, path, dpi=120)


NOTES = {
    "1": "FLOPs come from the analytic counter (`memoryformer.flops`, printed by `make flops`; one "
    "multiply-add = one FLOP, the paper's 6Ksd rule for MemoryFormer blocks). The paper's MF-small row "
    "prints 1.0 G / 7.4 G, which its own rule does not give (0.906 G / 7.348 G); the cell shows both.",
    "2": "Linformer, cosFormer and Performer FLOPs are the paper's (their settings are not given). "
    "Our rows come from the runs named linformer_410m, cosformer_410m and performer_410m.",
    "3": "d is the hashed width K·τ; Memory Layer outputs and the residual stream stay 512 wide "
    "(model.hashed_width), which the d = 510 row's 53.5 MB needs. FLOPs and Memory Size are the paper's "
    "(one Memory Layer Q at s = 2048); `benchmarks/paper_flops.py` reproduces them from our modules.",
    "4": "1e-3 is Pythia-70M's learning rate; MemoryFormer uses 3x (paper section 3).",
    "5": "Memory Size is both Memory Block layers in fp16, as printed; `benchmarks/paper_flops.py` "
    "reproduces it from our modules.",
    "6": "Trained with the full recipe (as Table 1's MF-tiny), not the 8000-step ablation; an mf_tiny "
    "run fills the first row too.",
}


def render(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Markdown of Tables 1-6 for the runs at or below `run_dirs`; with `out_dir`, also writes report.md and
    table1.png ... table6.png."""
    runs = find_runs(run_dirs) if run_dirs else Runs()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    md: list[str] = []
    notes_rows: list[Row] = []
    for table in TITLES:
        md += [f"## {title(table, paper_scale=True)}", ""]
        if table in ACCURACY_TABLES:
            rows, unplaced = accuracy_rows(table, runs)
            if table == "1":
                rows += unplaced
            notes_rows += [r for r in rows if r not in notes_rows]
            md.append(table_markdown(rows, table))
            if out is not None:
                plot(rows, out / f"table{table}.png", f"{title(table, paper_scale=True)}: ours vs the paper")
        else:
            ablation = ablation_rows(table, runs.train)
            md.append(ablation_markdown(table, ablation))
            if out is not None:
                plot_ablation(table, ablation, out / f"table{table}.png")
        md += ["", NOTES[table], ""]
    src = paper_results()["source"]
    md += [
        f"Paper numbers: {src}. The paper does not say whether a column is acc or acc_norm. Its WSC column "
        "is SuperGLUE WSC (104 examples, `eval.tasks=paper`); a cell marked (wsc273) holds lm-eval's wsc273 "
        '(273 schemas, `eval.tasks=paper_wsc273`), which is not the paper\'s WSC. "not run": no run of '
        'ours fills the row; "not evaluated": trained, but no evaluate.py run of its checkpoint was given.',
    ]
    notes = metric_notes(notes_rows)
    if notes:
        md += ["", "Metrics used by our runs (lm-eval metric per column):", "", *notes]
    text = "\n".join(md) + "\n"
    if out is not None:
        (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m memoryformer.evaluation.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "run_dirs", nargs="*", help="training or evaluate.py runs, or folders above them (outputs/)"
    )
    parser.add_argument("--out", default="eval_report", help="where report.md and table1..6.png go")
    args = parser.parse_args(argv)
    print(render(args.run_dirs, args.out))
    print(f"written: {Path(args.out) / 'report.md'}, {Path(args.out)}/table{{1..6}}.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
