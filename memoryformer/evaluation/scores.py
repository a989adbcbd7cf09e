"""Scores of one evaluation run, read from lm-eval's result dict: the metric chosen per task (`task_scores`)
and the Markdown of results.md (`results_markdown`): one row per task with the metric used (acc or
acc_norm), value, stderr and sample count, perplexity tasks in their own table, and the paper-layout row of
the accuracy columns with their average.
"""

from __future__ import annotations

from typing import Any

from memoryformer.evaluation.config import EvalSettings

#: Metrics lm-eval reports for rolling log-likelihood (perplexity) tasks; the first is a task's headline.
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def task_scores(results: dict[str, Any], settings: EvalSettings) -> list[dict[str, Any]]:
    """One dict per evaluated task: task, kind ("accuracy" or "perplexity"), metric (the chosen one, acc
    where lm-eval reports no acc_norm, word_perplexity for perplexity tasks), value, stderr, samples, a note
    when the choice had to fall back, and for perplexity tasks `extra` = {byte_perplexity, bits_per_byte}."""
    rows = []
    for task, res in results["results"].items():
        chosen = settings.metric_for(task)
        metric, note, kind, extra = chosen, "", "accuracy", {}
        if f"{PERPLEXITY_METRICS[0]},none" in res:
            metric, kind = PERPLEXITY_METRICS[0], "perplexity"
            extra = {m: float(res[f"{m},none"]) for m in PERPLEXITY_METRICS[1:] if f"{m},none" in res}
        elif f"{chosen},none" not in res:
            metric, note = "acc", f"lm-eval reports no {chosen} for {task}; acc used"
        stderr = res.get(f"{metric}_stderr,none")
        rows.append(
            {
                "task": task,
                "kind": kind,
                "metric": metric,
                "value": float(res[f"{metric},none"]),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "samples": (results.get("n-samples", {}).get(task) or {}).get("effective"),
                "note": note,
                "extra": extra,
            }
        )
    return rows


def results_markdown(results: dict[str, Any], settings: EvalSettings, info: dict[str, Any]) -> str:
    """The Markdown of results.md (see the module docstring)."""
    all_rows = task_scores(results, settings)
    rows = [r for r in all_rows if r["kind"] == "accuracy"]
    ppl = [r for r in all_rows if r["kind"] == "perplexity"]
    label = info.get("label", "model")
    lines = [
        f"# Zero-shot results: {label}",
        "",
        f"lm-evaluation-harness {info.get('lm_eval_version', '?')}, num_fewshot={settings.num_fewshot}, "
        f"limit={settings.limit}, dtype={settings.dtype}, batch_size={settings.batch_size}, "
        f"data={'local ' + str(settings.data_dir) if settings.data_dir else 'Hugging Face hub'}.",
    ]
    if ppl:
        lines += [
            "",
            "Held-out perplexity (rolling log-likelihood LL over whole documents, as lm-eval's wikitext): "
            "word_perplexity = exp(-LL / words), byte_perplexity = exp(-LL / UTF-8 bytes), "
            "bits_per_byte = -LL / (bytes ln 2).",
            "",
            "| Task | word_perplexity | byte_perplexity | bits_per_byte | Documents |",
            "|---|---|---|---|---|",
        ]
        for r in ppl:
            cells = [f"{r['extra'][m]:.4f}" if m in r["extra"] else "n/a" for m in PERPLEXITY_METRICS[1:]]
            lines.append(f"| {r['task']} | {r['value']:.4f} | {' | '.join(cells)} | {r['samples']} |")
    if not rows:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Metric per column: `acc` = accuracy of the highest log-likelihood choice; `acc_norm` = the same "
        "with "
        "each choice's log-likelihood divided by its length in bytes (lm-eval's definitions).",
        "",
        "| Task | Metric | Value | Stderr | Samples |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        err = f"{r['stderr']:.4f}" if r["stderr"] is not None else "n/a"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {err} | {r['samples']} |")
    avg = sum(r["value"] for r in rows) / len(rows)
    lines.append(f"| **Average** | | {avg:.4f} | | |")
    notes = [r["note"] for r in rows if r["note"]]
    if notes:
        lines += ["", *[f"- {n}." for n in notes]]
    lines += [
        "",
        "Paper layout (one row, three decimals):",
        "",
        "| " + " | ".join(f"{r['task']} ({r['metric']})" for r in rows) + " | Avg. |",
        "|" + "---|" * (len(rows) + 1),
        "| " + " | ".join(f"{r['value']:.3f}" for r in rows) + f" | {avg:.3f} |",
    ]
    return "\n".join(lines) + "\n"
