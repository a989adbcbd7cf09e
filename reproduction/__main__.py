"""`make reproduce-cpu`: the paper's six tables, scaled down to a 2-core CPU, measured honestly.

    python -m reproduction                    # every table (about an hour on 2 cores)
    python -m reproduction --tables 1,4       # a subset (make reproduce-cpu TABLES=1,4)
    python -m reproduction --scale smoke      # a 2-step protocol on a tiny model (the driver's own test)

Runs live under --out-dir (default outputs/reproduction/); a rerun skips every finished run and retrains
interrupted ones, and a run published in --docs-dir's reproduction.json with the same argv is not trained
again (its stored numbers are reused). The results go to --docs-dir: reproduction.json, reproduction.md and
the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from reproduction import protocol, report
from reproduction.runner import (
    ROOT,
    Runner,
    export_heldout_docs,
    heldout_scores,
    in_process_executor,
    published_results,
    subprocess_executor,
)

NOTES = Path(__file__).with_name("notes.md")


def main(argv: list[str] | None = None) -> Runner:
    """Train what the selected tables need, then write the JSON, the Markdown and the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", default="", help="comma-separated subset of 1-6 (default: all)")
    parser.add_argument("--scale", default="cpu", choices=sorted(protocol.SCALES))
    parser.add_argument("--workers", type=int, default=2, help="runs trained side by side (1 thread each)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "outputs" / "reproduction")
    parser.add_argument("--docs-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--in-process", action="store_true", help="train in this process (tests)")
    parser.add_argument("--no-heldout", action="store_true", help="skip Table 1's lm-eval bits/byte")
    parser.add_argument(
        "--retrain", action="store_true", help="ignore the published results: train every run not on disk"
    )
    parser.add_argument(
        "--publish-finished",
        action="store_true",
        help="train nothing: write the pages from the runs finished so far (an invocation that was stopped), "
        "naming the rows still missing runs",
    )
    args = parser.parse_args(argv)
    try:
        tables = protocol.parse_tables(args.tables)
    except ValueError as err:
        sys.exit(f"error: {err}")
    scale = protocol.SCALES[args.scale]
    out_dir = args.out_dir / args.scale
    start = time.perf_counter()

    prefix = "reproduction" if args.scale == "cpu" else f"reproduction_{args.scale}"
    plan = protocol.build_plan(tables, scale)
    executor = in_process_executor() if args.in_process else subprocess_executor(threads=1)
    published = {} if args.retrain else published_results(args.docs_dir / f"{prefix}.json")
    workers = 1 if args.in_process else args.workers
    runner = Runner(out_dir, scale, executor, workers, published=published, train=not args.publish_finished)
    rows = runner.execute_plan(plan)
    results = runner.results
    # what is published: every finished run of a sweep (a stopped invocation leaves some unfinished)
    sweeps = {m: [r for r in runs if r.key in results] for m, runs in plan.sweeps.items()}
    sweeps = {m: runs for m, runs in sweeps.items() if runs}

    if "1" in tables and not args.no_heldout:
        t1_runs = {r.key: r for row in rows if row.table == "1" for r in report.scored_runs(row, results)}
        todo = {k: r for k, r in t1_runs.items() if "heldout" not in results[k]}  # published rows have it
        for run in list(todo.values()):  # a published sweep point that became a row run: no model to score
            if results[run.key].get("published"):
                if args.publish_finished:
                    del todo[run.key]
                else:
                    runner.train_again(run)
        if todo:
            data_dir = export_heldout_docs(out_dir, runner.run_dir(next(iter(todo.values()))))
        for key, run in todo.items():
            results[key]["heldout"] = heldout_scores(runner.run_dir(run), data_dir, args.in_process)
        print(f"reproduction: held-out bits/byte of {len(todo)} Table 1 runs through lm-eval", flush=True)

    args.docs_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[str]] = {}
    if "1" in tables:
        t1 = [r for r in rows if r.table == "1"]
        figures["1"] = [f"{prefix}_table1_curves.png", f"{prefix}_lr_grid.png", f"{prefix}_buckets.png"]
        # runs taken from the published JSON have no curve or histograms: keep the committed figure then
        if any(r.runs[0].budget > 1 for r in t1):
            figures["1"].append(f"{prefix}_budgets.png")
            report.plot_budgets(t1, results, args.docs_dir / f"{prefix}_budgets.png")
        if all("val_curve" in results[r.key] for row in t1 for r in row.runs if r.budget == 1):
            report.plot_table1(t1, results, args.docs_dir / f"{prefix}_table1_curves.png")
        report.plot_lr_grid(sweeps, results, args.docs_dir / f"{prefix}_lr_grid.png")
        mf = next(r for r in t1 if r.label.startswith("(a) MemoryFormer"))
        if "histograms" in results[mf.runs[0].key].get("hash", {}):
            report.plot_buckets(
                results[mf.runs[0].key]["hash"],
                args.docs_dir / f"{prefix}_buckets.png",
                f"{mf.label}, seed {mf.runs[0].seed}",
            )
    if {"3", "4", "5"} & set(tables):
        report.plot_sweeps(rows, results, args.docs_dir / f"{prefix}_sweeps.png")
        last = max({"3", "4", "5"} & set(tables))  # one figure for the three tables, after the last
        figures[last] = [f"{prefix}_sweeps.png"]

    command = "make reproduce-cpu" + (f" TABLES={','.join(tables)}" if args.tables else "")
    if args.scale != "cpu":
        command = f"python -m reproduction --scale {args.scale}" + (
            f" --tables {args.tables}" if args.tables else ""
        )
    meta = {
        "command": command,
        "wall_minutes": round((time.perf_counter() - start) / 60, 1),
        "train_minutes": sum(r["train_seconds"] for r in results.values()) / 60,
        "unfinished": runner.unfinished,
    }
    report.write_json(
        args.docs_dir / f"{prefix}.json", scale, rows, sweeps if "1" in tables else {}, results, meta
    )
    notes = NOTES.read_text() if NOTES.is_file() and args.scale == "cpu" else ""
    md = report.markdown(scale, rows, sweeps if "1" in tables else {}, results, meta, figures, notes)
    (args.docs_dir / f"{prefix}.md").write_text(md)
    print(
        f"reproduction: wrote {args.docs_dir / (prefix + '.md')} and .json "
        f"({meta['wall_minutes']} min, {len(runner.trained)} runs trained now)",
        flush=True,
    )
    return runner


if __name__ == "__main__":
    main()
