"""The paper's perplexity tables (Tables 3, 4, 5): our runs' validation perplexity beside the paper's.

Each table's rows, printed numbers and run-to-row rule come from `paper_results.yaml`: a training run fills a
row when its `name` is one of the row's `experiments` (else the table's) and every `match` key of the row
equals the value in its saved `checkpoints/config.yaml`. A row with no such run reads "not run".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memoryformer.evaluation.paper import paper_results
from memoryformer.evaluation.runs import TrainRun, config_value, same_value

ABLATION_TABLES = ("table3", "table4", "table5")
NOT_RUN = "not run"


@dataclass
class AblationRow:
    """One paper row of a perplexity table and the runs of ours that match it."""

    spec: dict[str, Any]
    runs: list[TrainRun] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The row's setting as the paper prints it (e.g. "3e-3")."""
        return str(self.spec["label"])


def row_matches(spec: dict[str, Any], table: dict[str, Any], config: dict[str, Any]) -> bool:
    """True when a run's saved `config` belongs to this paper row (experiment name + matched values)."""
    experiments = spec.get("experiments") or table.get("experiments") or []
    if str(config.get("name", "")) not in experiments:
        return False
    return all(same_value(config_value(config, k), v) for k, v in (spec.get("match") or {}).items())


def ablation_rows(table: str, runs: list[TrainRun]) -> list[AblationRow]:
    """The paper's rows of `table` ("table3" | "table4" | "table5"), each with its matching runs."""
    spec = paper_results()[table]
    rows = [AblationRow(r) for r in spec["rows"]]
    for row in rows:
        row.runs = [run for run in runs if row_matches(row.spec, spec, run.config)]
    return rows


def _run_name(run: TrainRun) -> str:
    # outputs/<name>/<time> or multirun/<name>/<time>/<job>: the last parts identify the run
    return "/".join(run.path.resolve().parts[-3:])


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
    spec = paper_results()[table]
    extra = spec.get("columns") or {}
    head = [spec["setting"]["label"], *extra.values(), "Paper Val. PPL", "Ours Val. PPL", "Step", "Run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        paper = [row.label, *(str(row.spec.get(k, "—")) for k in extra), f"{row.spec['val_ppl']:.2f}"]
        ours = [(*_ours(r), _run_name(r)) for r in row.runs] or [(NOT_RUN, "—", "—")]
        for cells in ours:
            lines.append("| " + " | ".join([*paper, *cells]) + " |")
    return "\n".join(lines)


def plot_ablation(table: str, rows: list[AblationRow], path: Path) -> Path:
    """Val. PPL against the swept setting: the paper's line and our runs' points (none for rows not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = paper_results()[table]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r.spec["val_ppl"] for r in rows], "o--", label="paper")
    ours = [(x, run.val_ppl) for x, r in zip(xs, rows, strict=True) for run in r.runs]
    ours = [(x, y) for x, y in ours if y is not None]
    if ours:
        ax.plot([x for x, _ in ours], [y for _, y in ours], "s", label="ours")
    ax.set_xticks(xs)
    ax.set_xticklabels([r.label + ("" if r.runs else f"\n({NOT_RUN})") for r in rows], fontsize=8)
    ax.set_xlabel(spec["setting"]["label"])
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{table.replace('table', 'Table ')}: {spec['title']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
