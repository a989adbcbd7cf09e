"""The paper's Tables 1-6 as both reports lay them out: the row model, each table's title, the paper's
printed rows (`paper_results.yaml`) and their Markdown.

`python -m memoryformer.evaluation.report` puts our training and evaluation runs beside the paper's rows;
`python -m reproduction` puts its CPU-scale runs beside them (docs/reproduction.md). Tables are named by the
paper's number, "1" to "6".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from memoryformer.config import ModelConfig
from memoryformer.evaluation.config import PAPER_TASKS

PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.yaml"
ACCURACY_TABLES = ("1", "2", "6")  # zero-shot accuracy on the six tasks
SWEEP_TABLES = ("3", "4", "5")  # validation perplexity against one swept setting of MF-tiny

#: Our task names for the paper's six columns. The paper's WSC is SuperGLUE WSC (k/104); a run that
#: evaluated lm-eval's `wsc273` instead fills the same column, labelled "(wsc273)" in the cell by the report.
COLUMN_TASKS: dict[str, tuple[str, ...]] = {
    task: (task, "wsc273") if task == "wsc" else (task,) for task in PAPER_TASKS
}

#: Each table's title: what it compares (the CPU reproduction, whose runs are all scored by validation loss),
#: then what the evaluation report shows of it at the paper's scale.
TITLES: dict[str, tuple[str, str]] = {
    "1": ("MemoryFormer against a dense transformer", "zero-shot accuracy and FLOPs per block (s = 2048)"),
    "2": ("efficient attentions on the dense model", "efficient-attention variants of Pythia-410M"),
    "3": ("tau / K at equal width", "tau / K at equal width, validation perplexity after 8000 steps"),
    "4": ("learning rate", "learning rate, validation perplexity after 8000 steps"),
    "5": (
        "expanding bits in the Memory Block",
        "expanding bits of the Memory Block, validation perplexity after 8000 steps",
    ),
    "6": (
        "a GeLU in the Memory Block",
        "MF-tiny without / with GeLU in the Memory Block, zero-shot accuracy",
    ),
}


def title(table: str, paper_scale: bool = False) -> str:
    """ "Table 3: tau / K at equal width"; with `paper_scale`, the evaluation report's title of the table."""
    return f"Table {table}: {TITLES[table][1 if paper_scale else 0]}"


@dataclass
class Row:
    """One row of a paper table: its label, whose numbers they are (`source`: "paper", "ours (...)"), its
    value per column and, for a row measured over several seeds, their sample standard deviation per column
    and their count."""

    label: str
    source: str
    values: dict[str, float | None] = field(default_factory=dict)  # a task, "avg", "val_ppl" -> value
    spread: dict[str, float] = field(default_factory=dict)  # column -> sample sd over `seeds`
    seeds: int = 1
    setting: float | None = None  # Tables 3-5: the swept setting's value (the figure's x)
    config: ModelConfig | None = None  # Tables 1, 2, 6: the architecture (layers, width, FLOPs)
    metrics: dict[str, str] = field(default_factory=dict)  # column -> the lm-eval metric behind the value
    spec: dict[str, Any] = field(default_factory=dict)  # a paper row's entry of paper_results.yaml
    status: str | None = None  # "not run" / "not evaluated": a row of ours without numbers


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    """The data file as a dict: source, seq_len, tasks, task_labels, table1, table2 and table6 (lists of
    rows), table3, table4 and table5 (title, metric, experiments, setting, columns, rows)."""
    with PAPER_RESULTS.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def paper_rows(table: str) -> list[Row]:
    """The paper's printed rows of `table`: Tables 1, 2 and 6 with the six accuracies and the printed "avg"
    and our preset's config where the row names one; Tables 3-5 with "val_ppl" and the swept setting."""
    data = paper_results()
    spec = data[f"table{table}"]
    if table in ACCURACY_TABLES:
        return [
            Row(
                r["label"],
                "paper",
                {**dict(zip(data["tasks"], r["scores"], strict=True)), "avg": r["avg"]},
                config=ModelConfig.from_name(r["model"]) if r.get("model") else None,
                spec=r,
            )
            for r in spec
        ]
    key = spec["setting"]["key"]
    return [
        Row(r["label"], "paper", {"val_ppl": r["val_ppl"]}, setting=float(r["match"][key]), spec=r)
        for r in spec["rows"]
    ]


def markdown_table(head: list[str], body: Iterable[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule and one line per row of cells."""
    return [_line(head), "|" + "---|" * len(head), *map(_line, body)]


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def paper_markdown(table: str) -> list[str]:
    """The paper's rows of `table` in brief, as Markdown lines: average accuracy and FLOPs per block
    (Tables 1, 2, 6) or validation perplexity (Tables 3-5)."""
    rows = paper_rows(table)
    if table in ACCURACY_TABLES:
        head = ["Paper row", "Avg. zero-shot acc.", "FLOPs per block (s = 2048)"]
        cells = [(r.label, r.values["avg"], r.spec.get("flops_total_g")) for r in rows]
        return markdown_table(
            head, ([label, f"{avg:.3f}", f"{f} G" if f else "-"] for label, avg, f in cells)
        )
    head = [f"Paper row ({paper_results()[f'table{table}']['title']})", "Val. PPL"]
    return markdown_table(head, [[r.label, str(r.values["val_ppl"])] for r in rows])
