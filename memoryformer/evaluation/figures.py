"""Figures of the paper's tables: matplotlib for files, and Tables 3-5's sweep figure (validation perplexity
against the swept setting, the paper's beside ours) that the evaluation report and the CPU reproduction draw
alike."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from memoryformer.evaluation.tables import Row, paper_results, paper_rows, title


def pyplot() -> Any:
    """`matplotlib.pyplot` drawing to files only (the Agg backend: no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay `fig` out, write it to `path` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def plot_sweeps(ours: dict[str, list[Row]], path: Path, ours_label: str = "ours", twin: bool = False) -> Path:
    """One panel per table of `ours` ("3", "4", "5" -> our rows): validation perplexity against the swept
    setting, the paper's printed rows dashed and ours at their `setting` (error bars: the sample sd over
    seeds, where a row has several); a paper setting that no row of ours fills reads "not run" under its
    tick. `twin` puts the paper's numbers on an axis of their own, for runs at another scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ours), figsize=(4.2 * len(ours), 3.6), squeeze=False)
    for ax, (table, rows) in zip(axes[0], ours.items(), strict=True):
        paper = paper_rows(table)
        shown = sorted((r for r in rows if r.values.get("val_ppl") is not None), key=lambda r: r.setting)
        one_per_setting = len({r.setting for r in shown}) == len(shown)
        ax.errorbar(
            [r.setting for r in shown],
            [r.values["val_ppl"] for r in shown],
            yerr=[r.spread.get("val_ppl", 0.0) for r in shown],
            marker="o",
            linestyle="-" if one_per_setting else "none",  # several runs at one setting: points only
            capsize=3,
            label=ours_label,
        )
        paper_ax = ax.twinx() if twin else ax
        xs = [r.setting for r in paper]
        paper_ax.plot(xs, [r.values["val_ppl"] for r in paper], "k--", marker="s", alpha=0.5, label="paper")
        setting = paper_results()[f"table{table}"]["setting"]
        if setting["key"] == "optim.lr":
            ax.set_xscale("log")
        filled = [any(math.isclose(x, r.setting) for r in rows) for x in xs]
        ax.set_xticks(
            xs, [f"{x:g}" + ("" if hit else "\n(not run)") for x, hit in zip(xs, filled, strict=True)]
        )
        ax.minorticks_off()
        # the paper's K = 512 // τ holds at its width only; a narrower model (the CPU scale) has fewer tables
        ax.set_xlabel("τ (K = width // τ)" if setting["key"] == "model.code_length" else setting["label"])
        ax.set_ylabel("val PPL (ours)" if twin else "validation perplexity")
        if twin:
            paper_ax.set_ylabel("val PPL (paper, MF-tiny, 8000 steps)", fontsize=8)
        handles = [h for a in dict.fromkeys((ax, paper_ax)) for h in a.get_legend_handles_labels()[0]]
        ax.legend(handles=handles, fontsize=7)
        ax.set_title(title(table), fontsize=9)
        ax.grid(alpha=0.3)
    return save(fig, path)
