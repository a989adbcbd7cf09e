"""The paper's perplexity tables (Tables 3, 4, 5): our runs' validation perplexity beside the paper's.

Each table's rows, printed numbers and run-to-row rule come from `paper_results.yaml`: a training run fills a
row when its `name` is one of the row's `experiments` (else the table's) and every `match` key of the row
equals the value in its saved `checkpoints/config.yaml`. A row with no such run reads "not run".
"""

from __future__ import annotations

from pathlib import Path

from memoryformer.evaluation import figures
from memoryformer.evaluation.runs import TrainRun, config_value
from memoryformer.evaluation.tables import Row, markdown_table, paper_results, paper_rows

NOT_RUN = "not run"

#: A paper row of a perplexity table and the training runs of ours that fill it.
AblationRow = tuple[Row, list[TrainRun]]


def ablation_rows(table: str, runs: list[TrainRun]) -> list[AblationRow]:
    """The paper's rows of `table` ("3" | "4" | "5"), each with its matching runs."""
    experiments = paper_results()[f"table{table}"].get("experiments")
    return [(row, [run for run in runs if run.fills(row.spec, experiments)]) for row in paper_rows(table)]


def _ours(run: TrainRun) -> tuple[str, str]:
    if run.val_ppl is None:
        return "no validation yet", "—"
    max_steps = config_value(run.config, "trainer.max_steps")
    step = "—" if run.val_step is None else str(run.val_step)
    if run.val_step is not None and max_steps and run.val_step < int(max_steps):
        step += f" of {max_steps}"
    return f"{run.val_ppl:.2f}", step


def ablation_markdown(table: str, rows: list[AblationRow]) -> str:
    """Markdown: the paper's setting and printed columns, its Val. PPL, then ours, its step and run folder."""
    spec = paper_results()[f"table{table}"]
    extra = spec.get("columns") or {}
    head = [spec["setting"]["label"], *extra.values(), "Paper Val. PPL", "Ours Val. PPL", "Step", "Run"]
    body = []
    for paper, runs in rows:
        cells = [paper.label, *(str(paper.spec.get(k, "—")) for k in extra), f"{paper.values['val_ppl']:.2f}"]
        ours = [(*_ours(r), r.short_path) for r in runs] or [(NOT_RUN, "—", "—")]
        body += [[*cells, *run_cells] for run_cells in ours]
    return "\n".join(markdown_table(head, body))


def plot_ablation(table: str, rows: list[AblationRow], path: Path) -> Path:
    """Val. PPL against the swept setting: the paper's line and one point per run of ours."""
    ours = [
        Row(paper.label, f"ours ({run.short_path})", {"val_ppl": run.val_ppl}, setting=paper.setting)
        for paper, runs in rows
        for run in runs
    ]
    return figures.plot_sweeps({table: ours}, path)
