"""Writes what `make reproduce-cpu` measured: docs/reproduction.json, docs/reproduction.md and the figures.

Each table's section holds the paper's rows, the trend the paper claims, our rows (mean and spread over
seeds) and a verdict computed from the numbers: a difference counts only when it exceeds twice its standard
error over seeds; otherwise it is "within the seed spread". Titles, the paper's rows and Tables 3-5's figure
are those of the evaluation report (`memoryformer.evaluation.tables`, `memoryformer.evaluation.figures`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memoryformer.atomic_io import atomic_write_text
from memoryformer.evaluation import figures as table_figures
from memoryformer.evaluation import tables
from memoryformer.evaluation.figures import pyplot, save
from reproduction.protocol import BLOCK, EMBEDDING, Row, Scale

CLAIMS = {
    "1": "MF-tiny beats Pythia-70M (zero-shot avg 0.404 vs 0.375) with 16x fewer block FLOPs without "
    "attention, trained at 3x Pythia's lr.",
    "2": "Linformer, cosFormer and Performer lose accuracy against softmax attention (avg 0.398 / 0.405 / "
    "0.418 vs 0.435 on Pythia-410M).",
    "3": "Perplexity falls as tau grows at equal width (19.01 / 18.82 / 18.67 for tau = 4 / 8 / 10).",
    "4": "lr 3e-3 is best (19.86 / 19.07 / 18.82 / 18.84 for 1e-3 / 2e-3 / 3e-3 / 4e-3).",
    "5": "Each expanding bit lowers perplexity (19.89 / 19.26 / 18.82 / 18.54 for 0-3 bits).",
    "6": "A GeLU between the Memory Block's layers adds nothing (avg 0.404 without, 0.402 with).",
}


@dataclass
class Stat:
    """Mean, sample standard deviation and count of a row's final validation losses."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(
            statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)
        )

    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n else math.inf


def compare(a: Stat, b: Stat) -> str:
    """'lower' when a's mean loss is below b's by more than 2 standard errors, 'higher' when above, else
    'within' (the seed spread)."""
    se = math.sqrt(a.se() ** 2 + b.se() ** 2)
    diff = a.mean - b.mean
    if se == 0.0:  # one seed each: any difference counts, the text says there is one seed
        return "lower" if diff < 0 else "higher" if diff > 0 else "within"
    return "lower" if diff < -2 * se else "higher" if diff > 2 * se else "within"


def row_stat(row: Row, results: dict[str, dict]) -> Stat:
    return Stat.of([results[r.key]["val_loss"] for r in row.runs])


# --------------------------------------------------------------------------- verdicts
def _by_label(rows: list[Row], prefix: str) -> Row | None:
    return next((r for r in rows if r.label.startswith(prefix)), None)


def _pair(name_a: str, a: Stat, name_b: str, b: Stat) -> str:
    word = {"lower": "lower than", "higher": "higher than", "within": "within the seed spread of"}[
        compare(a, b)
    ]
    return f"{name_a} {a.mean:.4f} is {word} {name_b} {b.mean:.4f} (difference {a.mean - b.mean:+.4f})"


def verdicts(table: str, rows: list[Row], results: dict[str, dict]) -> list[str]:
    """Sentences saying whether the paper's trend holds in these rows, computed from the losses."""
    s = {r.label: row_stat(r, results) for r in rows}
    out: list[str] = []
    if table == "1":
        for tag, what in (
            ("(a)", "paper's lr protocol"),
            ("(b)", "each at its best lr"),
            ("(d)", "each at its best lr and block lr scale"),
            ("(e)", "each at its best lr, block lr scale and embedding lr scale"),
            ("(d) width 256:", "width 256, each at its best lr (block scale from width 128)"),
            (
                "(e) width 256:",
                "width 256, each at its best lr (block and embedding lr scales from width 128)",
            ),
        ):
            mf, dense = _by_label(rows, f"{tag} MemoryFormer"), _by_label(rows, f"{tag} dense")
            if mf and dense:
                c = compare(s[mf.label], s[dense.label])
                held = {
                    "lower": "holds",
                    "within": "is not resolved (within the seed spread)",
                    "higher": "does not hold",
                }[c]
                out.append(
                    f"{what}: MemoryFormer beats its dense twin: {held}; "
                    + _pair("MemoryFormer", s[mf.label], "dense", s[dense.label])
                    + "."
                )
        mf, wide = _by_label(rows, "(b) MemoryFormer"), _by_label(rows, "(c)")
        if mf and wide:
            out.append(
                "equal parameters (not a paper claim): "
                + _pair("MemoryFormer", s[mf.label], "the dense model of its size", s[wide.label])
                + "."
            )
        for tag, what in (
            ("(d)", "best lr and block lr scale"),
            ("(e)", "best lr, block and embedding lr scales"),
        ):
            gaps = [_gap(rows, s, t) for t in (tag, f"{tag} width 256:")]
            if all(gaps):
                out.append(width_trend(*gaps, what))  # type: ignore[arg-type]
    elif table == "2":
        soft = _by_label(rows, "softmax")
        for r in rows:
            if r is soft or soft is None:
                continue
            c = compare(s[r.label], s[soft.label])
            held = {"higher": "holds", "within": "is not resolved", "lower": "does not hold"}[c]
            out.append(
                f"{r.label} loses against softmax: {held}; "
                + _pair(r.label, s[r.label], "softmax", s[soft.label])
                + "."
            )
    elif table in ("3", "5"):
        what = "a larger tau" if table == "3" else "one more expanding bit"
        for lo, hi in zip(rows, rows[1:], strict=False):
            c = compare(s[hi.label], s[lo.label])
            held = {"lower": "holds", "within": "is not resolved", "higher": "does not hold"}[c]
            out.append(
                f"{what} lowers the loss ({lo.label} -> {hi.label}): {held}; "
                + _pair(hi.label, s[hi.label], lo.label, s[lo.label])
                + "."
            )
    elif table == "4":
        best = min(rows, key=lambda r: s[r.label].mean)
        out.append(f"lowest mean loss at {best.label} (the paper: lr 3e-3).")
        ref = _by_label(rows, "lr 0.003")
        for r in rows:
            if ref and r is not ref:
                out.append(_pair(r.label, s[r.label], ref.label, s[ref.label]) + ".")
    elif table == "6" and len(rows) == 2:
        c = compare(s[rows[1].label], s[rows[0].label])
        held = {
            "higher": "holds (GeLU is worse)",
            "within": "holds (no difference beyond the seed spread)",
            "lower": "does not hold (GeLU helps)",
        }[c]
        out.append(
            f"GeLU adds nothing: {held}; "
            + _pair(rows[1].label, s[rows[1].label], rows[0].label, s[rows[0].label])
            + "."
        )
    return out


def _gap(rows: list[Row], s: dict[str, Stat], tag: str) -> tuple[float, float] | None:
    """(MemoryFormer - dense twin mean loss, its standard error) of the rows labelled `tag`, if both ran."""
    mf, dense = _by_label(rows, f"{tag} MemoryFormer"), _by_label(rows, f"{tag} dense")
    if not (mf and dense):
        return None
    a, b = s[mf.label], s[dense.label]
    return a.mean - b.mean, math.sqrt(a.se() ** 2 + b.se() ** 2)


def width_trend(narrow: tuple[float, float], wide: tuple[float, float], what: str = "best pair") -> str:
    """Whether the MemoryFormer - dense gap (mean, se) at each one's `what` grows, shrinks or flips from width
    128 to 256: a change counts when it exceeds 2 standard errors of the difference, a flip when both do."""
    (g1, se1), (g2, se2) = narrow, wide
    se = math.sqrt(se1**2 + se2**2)
    if g1 * g2 < 0 and abs(g1) > 2 * se1 and abs(g2) > 2 * se2:
        trend = "flips sign"
    elif abs(g2 - g1) <= 2 * se:
        trend = "stays the same within the seed spread"
    else:
        trend = "grows" if abs(g2) > abs(g1) else "shrinks"
    return (
        f"with width: the MemoryFormer - dense gap at each one's {what} is {g1:+.4f} ± {se1:.4f} (se) at "
        f"width 128 and {g2:+.4f} ± {se2:.4f} at width 256: it {trend}."
    )


# --------------------------------------------------------------------------- JSON
def json_rows(rows: list[Row], sweeps: dict[str, list], results: dict[str, dict]) -> list[dict[str, Any]]:
    """One entry per (table row, seed), then Table 1's lr sweep runs (row label `lr sweep: ...`), then any
    other finished run (row label `unfinished row`: a seed of a row that still lacks runs), so that the
    next invocation reuses every run trained so far."""
    keep = (
        "argv",
        "seed",
        "steps",
        "tokens",
        "val_loss",
        "val_ppl",
        "params",
        "flops_per_token",
        "train_seconds",
        "lr",
    )
    out = []
    for row in rows:
        for run in row.runs:
            res = results[run.key]
            entry = {"table": row.table, "row": row.label, "run": run.key, **{k: res[k] for k in keep}}
            if "heldout" in res:
                entry["heldout_bits_per_byte"] = res["heldout"]["bits_per_byte"]
            if "hash" in res:
                entry["hash_weight_mean"] = res["hash"]["weight_mean"]
                entry["buckets_used_mean"] = res["hash"]["used_mean"]
                entry["buckets_used_min"] = res["hash"]["used_min"]
            out.append(entry)
    for model, runs in sweeps.items():
        for run in runs:
            res = results[run.key]
            out.append(
                {
                    "table": "1",
                    "row": f"lr sweep: {model} lr {run.lr:g}{_settings(run)}",
                    "run": run.key,
                    **{k: res[k] for k in keep},
                }
            )
    listed = {entry["run"] for entry in out}
    for key, res in results.items():
        if key not in listed:
            out.append({"table": "1", "row": "unfinished row", "run": key, **{k: res[k] for k in keep}})
    return out


def _settings(run: Any) -> str:
    """`, block_lr_scale 0.3` etc.: the run's optimizer overrides beyond the lr (empty for none)."""
    return "".join(f", {k.split('.')[-1]} {v}" for k, v in run.variant if k.startswith("optim."))


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import torch

    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_json(path: Path, scale: Scale, rows: list[Row], sweeps: dict, results: dict, meta: dict) -> None:
    doc = {
        "command": meta["command"],
        "scale": scale.describe(),
        "machine": machine(),
        "wall_minutes_last_invocation": meta["wall_minutes"],
        "train_minutes_all_runs": meta["train_minutes"],
        "rows": json_rows(rows, sweeps, results),
    }
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


# --------------------------------------------------------------------------- Markdown
def _row_cells(row: Row, results: dict[str, dict], extra: list[str]) -> list[str]:
    st = row_stat(row, results)
    first = results[row.runs[0].key]
    cells = [
        row.label,
        str(st.n),
        f"{st.mean:.4f} ± {st.std:.4f}",
        f"{math.exp(st.mean):.2f}",
        f"{first['params'] / 1e6:.2f}M",
        f"{first['flops_per_token'] / 1e6:.2f}",
    ]
    for key in extra:
        vals = [results[r.key][key] for r in row.runs if key in results[r.key]]
        if key == "heldout":
            cells.append(f"{statistics.fmean(v['bits_per_byte'] for v in vals):.4f}" if vals else "-")
        elif key == "hash":
            cells.append(
                f"{statistics.fmean(v['weight_mean'] for v in vals):.3f} / "
                f"{statistics.fmean(v['used_mean'] for v in vals):.1%}"
                if vals
                else "-"
            )
    cells.append(f"{statistics.fmean(results[r.key]['train_seconds'] for r in row.runs):.0f}")
    return cells


def _unfinished(labels: list[str]) -> list[str]:
    """The paragraph naming the rows a stopped invocation left without all their runs (none: nothing)."""
    if not labels:
        return []
    return [
        f"**Not finished:** {len(labels)} rows or searches still lack runs (the tables show the seeds that "
        "finished); `make reproduce-cpu` trains the rest, reusing every run published here: "
        + "; ".join(labels) + ".",
        "",
    ]


def markdown(
    scale: Scale,
    rows: list[Row],
    sweeps: dict,
    results: dict,
    meta: dict,
    figures: dict[str, list[str]],
    notes: str,
) -> str:
    """The whole docs/reproduction.md."""
    out = [
        "# CPU-scale reproduction of the paper's six tables",
        "",
        f"Produced by `{meta['command']}` on this machine ({machine()['cpu']}, {machine()['cores']} cores, "
        f"torch {machine()['torch']}): {len(results)} runs, {meta['train_minutes']:.0f} min of training in "
        f"all (two runs side by side, one thread each; the last invocation took {meta['wall_minutes']} min "
        "wall, finished runs being reused). Every number below comes from "
        "`docs/reproduction.json`, which the same command wrote; each of its rows carries the exact "
        "`train.py` arguments that retrain it (`python train.py <argv>`).",
        "",
        *_unfinished(meta.get("unfinished", [])),
        "## Scale",
        "",
        f"Every run: {scale.steps} optimizer steps of {scale.batch} sequences x {scale.seq_len} tokens "
        f"({scale.tokens:,} tokens, about {scale.tokens / 1.10e6:.2f} epochs of the bundled corpus's 1.10M "
        f"training tokens), validation every {scale.val_every} steps on {scale.val_samples} held-out "
        "sequences, AdamW with the paper's betas / weight decay / clipping, cosine decay over the run, "
        f"{scale.warmup_ratio:.0%} warmup. Final validation loss = the last validation (step {scale.steps}).",
        "MemoryFormer: `model=nano` (2 blocks, width 128, 4 heads, K = 16 tables of tau = 8 bits, 2 "
        "expanding bits, vocabulary 4096). Dense twin: the same with `model.block=pythia` (Linear QKV, "
        f"4x GELU MLP). Equal-parameter dense: width {scale.wide_n_embd}, {scale.wide_n_layer} blocks, "
        f"{scale.wide_n_head} heads. Seeds: {len(scale.seeds_table1)} for Table 1's rows, "
        f"{len(scale.seeds_ablation)} for Tables 2-6 (the seed changes the initialisation; the data order is "
        "fixed). FLOPs per token count forward + backward, one multiply-add = one FLOP (the paper's unit), "
        "embeddings excluded, LM head included.",
        "",
    ]
    if notes:
        out += [notes.strip(), ""]
    for table in sorted({r.table for r in rows}):
        trs = [r for r in rows if r.table == table]
        out += table_section(table, trs, sweeps if table == "1" else {}, results, figures.get(table, []))
    return "\n".join(out) + "\n"


def table_section(table: str, rows: list[Row], sweeps: dict, results: dict, figures: list[str]) -> list[str]:
    """One table's Markdown: the paper's rows and claim, ours, Table 1's lr sweeps, verdicts, figures."""
    extra = (["heldout"] if table == "1" else []) + ([] if table == "2" else ["hash"])
    head = ["Our row", "seeds", "final val loss (mean ± sd)", "val PPL", "params", "MFLOPs/token"]
    head += [{"heldout": "held-out bits/byte", "hash": "hash weight / buckets used"}[k] for k in extra]
    head.append("seconds per run")
    out = [
        f"## {tables.title(table)}",
        "",
        "**The paper:** " + CLAIMS[table],
        "",
        *tables.paper_markdown(table),
        "",
        "**Here:**",
        "",
        *tables.markdown_table(head, [_row_cells(r, results, extra) for r in rows if r.runs[0].budget == 1]),
    ]
    if sweeps:
        out += [
            "",
            "Learning-rate sweeps (seed 0) that chose the (b), (c), (d) and (e) rows (`-grid`: lr x block "
            "lr scale at width 128; `_w2`: width 256 at the width-128 best block scale; `-embedding`: "
            "embedding lr scale at the best pair, for (e)):",
            "",
        ]
        head = ["sweep", "lr", "block lr scale", "embedding lr scale", "final val loss"]
        out += tables.markdown_table(
            head,
            (
                [
                    model,
                    f"{r.lr:g}",
                    f"{r.setting(BLOCK):g}",
                    f"{r.setting(EMBEDDING):g}",
                    f"{results[r.key]['val_loss']:.4f}",
                ]
                for model, runs in sweeps.items()
                for r in sorted(runs, key=lambda r: (r.setting(BLOCK), r.setting(EMBEDDING), r.lr))
            ),
        )
    out += ["", "**Verdict** (a difference counts when it exceeds 2 standard errors over seeds):", ""]
    out += [f"- {v}" for v in verdicts(table, rows, results)]
    budget_figures = [f for f in figures if f.endswith("_budgets.png")]
    for fig in [f for f in figures if f not in budget_figures]:
        out += ["", f"![{Path(fig).stem.replace('_', ' ')}]({fig})"]
    if table == "1" and any(r.runs[0].budget > 1 for r in rows):
        out += budget_section(rows, sweeps, results, budget_figures)
    return out + [""]


# --------------------------------------------------------------------------- Table 1 (e) by token budget
@dataclass
class BudgetPoint:
    """One Table 1 (e) row: a model at a width and a token budget (each at its own best settings)."""

    width: int
    memoryformer: bool
    budget: int
    row: Row
    stat: Stat
    tokens: int
    training_flops: float  # FLOPs per token x training tokens (forward + backward, multiply-add = 1)
    heldout: float | None  # held-out bits/byte of the row's `scored_runs` (their mean)

    @property
    def model(self) -> str:
        return "MemoryFormer" if self.memoryformer else "dense twin"


def scored_runs(row: Row, results: dict[str, dict]) -> list[Any]:
    """The runs of a Table 1 row that get held-out bits/byte (each costs minutes of lm-eval): every seed at
    budget 1, else the one with the lowest validation loss."""
    if row.runs[0].budget == 1:
        return row.runs
    return [min(row.runs, key=lambda r: results[r.key]["val_loss"])]


def budget_points(rows: list[Row], results: dict[str, dict]) -> list[BudgetPoint]:
    """The (e) rows (each model at its best lr, block and embedding lr scales) at every token budget,
    ordered by width, model and budget."""
    out = []
    for row in rows:
        if not row.label.startswith("(e)"):
            continue
        first = results[row.runs[0].key]
        scored = [results[r.key] for r in scored_runs(row, results)]
        held = [res["heldout"]["bits_per_byte"] for res in scored if "heldout" in res]
        width = int(dict(_override_pairs(first["argv"])).get("model.n_embd", 128))  # model=nano: 128
        out.append(
            BudgetPoint(
                width,
                row.runs[0].memoryformer,
                row.runs[0].budget,
                row,
                row_stat(row, results),
                first["tokens"],
                first["flops_per_token"] * first["tokens"],
                statistics.fmean(held) if held else None,
            )
        )
    return sorted(out, key=lambda p: (p.width, p.memoryformer, p.budget))


def _override_pairs(argv: list[str]) -> list[tuple[str, str]]:
    return [tuple(a.split("=", 1)) for a in argv if "=" in a]  # type: ignore[misc]


def _pairs(points: list[BudgetPoint]) -> dict[tuple[int, int], tuple[BudgetPoint, BudgetPoint]]:
    """{(width, budget): (MemoryFormer point, dense point)} where both ran."""
    by = {(p.width, p.budget, p.memoryformer): p for p in points}
    return {(w, b): (by[(w, b, True)], by[(w, b, False)]) for w, b, mf in by if mf and (w, b, False) in by}


def budget_verdicts(points: list[BudgetPoint], sweeps: dict[str, list], results: dict) -> list[str]:
    """Per width: the MemoryFormer - dense gap at each budget with who is ahead (2 standard errors), where
    the order changes, and how the gap moves from the smallest to the largest budget; then every budget
    search whose best lr sits at an end of the lrs it tried."""
    out = []
    pairs = _pairs(points)
    word = {"lower": "MemoryFormer ahead", "higher": "dense twin ahead", "within": "within the seed spread"}
    for width in sorted({w for w, _ in pairs}):
        budgets = sorted(b for w, b in pairs if w == width)
        parts, order = [], []
        for b in budgets:
            mf, dense = pairs[(width, b)]
            gap, se = mf.stat.mean - dense.stat.mean, math.sqrt(mf.stat.se() ** 2 + dense.stat.se() ** 2)
            n = min(mf.stat.n, dense.stat.n)
            if n == 1:  # a side without a spread: reported, never counted as resolved
                seeds = f"{mf.stat.n} MemoryFormer / {dense.stat.n} dense seed(s)"
                parts.append(f"{b}x {gap:+.4f} ({seeds}, a side without spread: not resolved)")
                continue
            c = compare(mf.stat, dense.stat)
            parts.append(f"{b}x {gap:+.4f} ± {se:.4f}, {n} seeds ({word[c]})")
            order.append((b, c))
        resolved = [(b, c) for b, c in order if c != "within"]
        flips = [(a, b) for (a, ca), (b, cb) in zip(resolved, resolved[1:], strict=False) if ca != cb]
        if flips:
            change = "; the order changes " + ", ".join(f"between {a}x and {b}x" for a, b in flips)
        else:
            change = "; the order does not change" + (
                f" (every resolved budget has the {word[resolved[0][1]].split(' ahead')[0]} ahead)"
                if resolved
                else " (no budget resolves it)"
            )
        spread = [b for b, _ in order]
        if len(spread) < 2:
            out.append(f"width {width}, MemoryFormer - dense gap by training tokens: {'; '.join(parts)}.")
            continue
        lo, hi = pairs[(width, spread[0])], pairs[(width, spread[-1])]
        g_lo, g_hi = lo[0].stat.mean - lo[1].stat.mean, hi[0].stat.mean - hi[1].stat.mean
        se = math.sqrt(sum(p.stat.se() ** 2 for p in (*lo, *hi)))
        moved = "within 2 standard errors" if abs(g_hi - g_lo) <= 2 * se else "beyond 2 standard errors"
        out.append(
            f"width {width}, MemoryFormer - dense gap (se) by training tokens: {'; '.join(parts)}{change}. "
            f"From {spread[0]}x to {spread[-1]}x the gap moves by {g_hi - g_lo:+.4f} ± {se:.4f}, {moved}."
        )
    for name, runs in sweeps.items():
        if "-x" not in name or len({r.lr for r in runs}) < 2:
            continue
        best = min(runs, key=lambda r: results[r.key]["val_loss"])
        lrs = sorted({r.lr for r in runs})
        if best.lr in (lrs[0], lrs[-1]):
            end = "lowest" if best.lr == lrs[0] else "highest"
            out.append(
                f"the {name} search did not bracket its optimum: its best lr {best.lr:g} is the {end} of "
                f"{', '.join(f'{x:g}' for x in lrs)} (the growth limit was reached)."
            )
    return out


def _setting(row: Row) -> str:
    """`lr 0.03, 0.03 / 3` (lr, block / embedding lr scale), `unsearched` when not chosen by a search."""
    run = row.runs[0]
    text = f"{run.lr:g}, {run.setting(BLOCK):g} / {run.setting(EMBEDDING):g}"
    return text + (" (unsearched)" if "unsearched" in row.label else "")


def budget_section(rows: list[Row], sweeps: dict, results: dict, figures: list[str]) -> list[str]:
    """Table 1 (e) against training tokens: the table, the verdicts and the figure."""
    points = budget_points(rows, results)
    pairs = _pairs(points)
    most, top = max((p.budget, p.tokens) for p in points)
    out = [
        "### Table 1 (e) against training tokens",
        "",
        "Each model at its own (e) block and embedding lr scales, trained for 1x, 4x and 16x the steps (the "
        "lr schedule's horizon and warmup follow the budget). At 4x and 16x the lr is searched again at "
        "x1/3, x1 and x3 of the 1x optimum (seed 0), grown by x3 past an end that wins, and the best is "
        "trained at every seed listed; where a row says *unsearched*, it is trained at the previous "
        "budget's best lr. Held-out bits/byte: the row's run with the lowest validation loss (1x rows: the "
        f"mean over seeds, as above). The corpus has 1.10M training tokens, so {most}x ({top / 1e6:.1f}M "
        f"tokens) is about {top / 1.10e6:.1f} epochs: every model sees each training sequence that often.",
        "",
    ]
    head = ["width", "model", "tokens", "epochs", "lr, block / embedding lr scale", "seeds"]
    head += ["final val loss (mean ± sd)", "MF - dense (± se)", "training TFLOPs", "held-out bits/byte"]
    body = []
    for p in points:
        gap = ""
        if p.memoryformer and (p.width, p.budget) in pairs:
            mf, dense = pairs[(p.width, p.budget)]
            se = math.sqrt(mf.stat.se() ** 2 + dense.stat.se() ** 2)
            gap = f"{mf.stat.mean - dense.stat.mean:+.4f} ± {se:.4f}"
        body.append(
            [
                str(p.width),
                p.model,
                f"{p.tokens / 1e6:.2f}M ({p.budget}x)",
                f"{p.tokens / 1.10e6:.2f}",
                _setting(p.row),
                str(p.stat.n),
                f"{p.stat.mean:.4f} ± {p.stat.std:.4f}",
                gap,
                f"{p.training_flops / 1e12:.2f}",
                "-" if p.heldout is None else f"{p.heldout:.4f}",
            ]
        )
    out += [*tables.markdown_table(head, body), "", "**Verdict by token budget:**", ""]
    out += [f"- {v}" for v in budget_verdicts(points, sweeps, results)]
    for fig in figures:
        out += ["", f"![{Path(fig).stem.replace('_', ' ')}]({fig})"]
    return out


def plot_budgets(rows: list[Row], results: dict, path: Path) -> None:
    """Final validation loss of the (e) rows against training tokens and against training FLOPs, one line
    per model and width (mean over seeds, error bars = sample sd; a point with one seed has none)."""
    plt = pyplot()
    points = budget_points(rows, results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, (x_of, xlabel) in zip(
        axes[0],
        (
            (lambda p: p.tokens, "training tokens"),
            (lambda p: p.training_flops, "training FLOPs (forward + backward, multiply-add = 1)"),
        ),
        strict=True,
    ):
        for width, mf in sorted({(p.width, p.memoryformer) for p in points}):
            line = [p for p in points if (p.width, p.memoryformer) == (width, mf)]
            ax.errorbar(
                [x_of(p) for p in line],
                [p.stat.mean for p in line],
                yerr=[p.stat.std for p in line],
                marker="o" if mf else "s",
                linestyle="-" if width == min(q.width for q in points) else "--",
                capsize=3,
                label=f"{line[0].model}, width {width}",
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # the labels of 2e5..9e5 would overlap
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final val loss (nats/token)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Table 1 (e) by training tokens, each model at its own best lrs", fontsize=9)
    save(fig, path)


# --------------------------------------------------------------------------- figures
def plot_table1(rows: list[Row], results: dict, path: Path) -> None:
    """Validation loss against training tokens for Table 1's rows (mean over seeds, band = min..max)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in [r for r in rows if r.runs[0].budget == 1]:  # the budgets have their own figure
        curves = [results[r.key]["val_curve"] for r in row.runs]
        steps = [s for s, _ in curves[0]]
        tokens = [s * results[row.runs[0].key]["tokens"] / results[row.runs[0].key]["steps"] for s in steps]
        per_step = list(zip(*[[v for _, v in c] for c in curves], strict=False))
        mean = [statistics.fmean(v) for v in per_step]
        ax.plot(tokens, mean, marker="o", label=row.label)
        ax.fill_between(tokens, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Table 1 at CPU scale: validation loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_sweeps(rows: list[Row], results: dict, path: Path) -> None:
    """Tables 3-5's figure (`memoryformer.evaluation.figures.plot_sweeps`) of our rows: validation
    perplexity, mean ± sd over seeds, against the swept setting; the paper's on an axis of its own, as our
    runs are at CPU scale."""
    ours: dict[str, list[tables.Row]] = {}
    for row in [r for r in rows if r.table in tables.SWEEP_TABLES]:
        ppl = Stat.of([math.exp(results[run.key]["val_loss"]) for run in row.runs])
        ours.setdefault(row.table, []).append(
            tables.Row(row.label, "ours", {"val_ppl": ppl.mean}, {"val_ppl": ppl.std}, ppl.n, row.setting)
        )
    table_figures.plot_sweeps(ours, path, ours_label="ours (CPU scale)", twin=True)


def plot_lr_grid(sweeps: dict[str, list], results: dict, path: Path) -> None:
    """Table 1 (d): final validation loss (seed 0) against lr, one line per block lr scale, for the
    MemoryFormer and its dense twin at width 128 (`<model>-grid` sweeps) and at width 256 (`<model>_w2`)."""
    plt = pyplot()
    panels = [
        (name, title)
        for name, title in (
            ("mf-grid", "MemoryFormer, width 128"),
            ("dense-grid", "dense twin, width 128"),
            ("mf_w2", "MemoryFormer, width 256"),
            ("dense_w2", "dense twin, width 256"),
        )
        if sweeps.get(name)
    ]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.6 * max(len(panels), 1), 3.6), squeeze=False)
    losses = [results[r.key]["val_loss"] for name, _ in panels for r in sweeps[name]]
    for ax, (name, title) in zip(axes[0], panels, strict=False):
        runs = [r for r in sweeps[name] if r.setting(EMBEDDING) == 1.0]
        for b in sorted({r.setting(BLOCK) for r in runs}):
            pts = sorted((r.lr, results[r.key]["val_loss"]) for r in runs if r.setting(BLOCK) == b)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"block scale {b:g}")
        best = min(runs, key=lambda r: results[r.key]["val_loss"])
        ax.plot([best.lr], [results[best.key]["val_loss"]], "k*", markersize=12, label="best")
        ax.set_xscale("log")
        ax.set_xlabel("optim.lr (embeddings, norms)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(min(losses) - 0.05, min(max(losses), min(losses) + 1.5) + 0.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final val loss, seed 0 (nats/token)")
    fig.suptitle("Table 1 (d): loss against lr and block lr scale (blocks train at lr x scale)", fontsize=9)
    save(fig, path)


def plot_buckets(hash_result: dict, path: Path, label: str) -> None:
    """Bucket hit counts of the first and last table of each first-block Memory Layer (the paper's Fig. 4)."""
    plt = pyplot()
    hists = hash_result["histograms"]
    names = [n for n in hists if not n.endswith(("k_proj", "v_proj"))]  # Q, K and V share one hash
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 2.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        last = hash_result["layers"][name]["tables"]
        for j, counts in enumerate(hists[name]):
            ax = axes[i][j]
            ax.bar(range(len(counts)), counts, width=1.0)
            used = sum(c > 0 for c in counts) / len(counts)
            ax.set_title(
                f"{name} table {1 if j == 0 else last}: {used:.0%} of {len(counts)} buckets hit", fontsize=8
            )
            ax.tick_params(labelsize=7)
    fig.suptitle(f"Bucket hits on {hash_result['tokens']} held-out tokens: {label}", fontsize=9)
    save(fig, path, dpi=100)
