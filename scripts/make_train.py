"""`make train`: train the nano MemoryFormer on the bundled corpus, then evaluate it through lm-eval.

    python scripts/make_train.py                                # what `make train` runs
    python scripts/make_train.py trainer.max_steps=50           # train.py overrides (make TRAIN_ARGS=...)
    python scripts/make_train.py --run-dir outputs/my_try       # another run folder

Steps, each a real user command (printed before it runs):
1. `train.py experiment=nano_cpu hydra.run.dir=RUN` (RUN = outputs/make_train; a previous make-train run
   there is replaced, so running `make train` twice works; the final model lands in RUN/model);
2. `python -m memoryformer.data.sample --export-eval RUN/eval_data`: the corpus's validation documents;
3. `evaluate.py checkpoint=RUN/model eval.tasks=sample eval.data_dir=RUN/eval_data hydra.run.dir=RUN/eval`:
   held-out perplexity through lm-evaluation-harness (results.json / results.md in RUN/eval).
Then a summary (validation loss first -> last, held-out perplexity, timings, paths) is printed and written
to RUN/make_train.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".make_train"  # a folder holding it was made by this script and may be replaced by it


def _run(cmd: list[str]) -> float:
    """Run `cmd` in the repository root (output streams through); exit on failure; returns seconds."""
    print("+ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc != 0:
        sys.exit(f"error: `{' '.join(cmd[1:])}` failed with exit status {rc}; see its output above.")
    return time.perf_counter() - start


def fresh_run_dir(run_dir: Path) -> None:
    """Empty `run_dir` for a new run; refuse a folder this script did not make (it may hold other work)."""
    if run_dir.exists():
        if not (run_dir / MARKER).is_file():
            sys.exit(
                f"error: {run_dir} exists and was not made by `make train`; remove it or pass --run-dir DIR."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("made by scripts/make_train.py; replaced by the next `make train`\n")


def val_losses(metrics_csv: Path) -> list[tuple[int, float]]:
    """`(step, val/loss)` rows of a Lightning CSVLogger file, in logging order."""
    rows = csv.DictReader(metrics_csv.read_text().splitlines())
    return [(int(r["step"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]


def heldout_scores(results_json: Path, task: str = "sample_heldout") -> dict[str, float]:
    """word_perplexity, byte_perplexity and bits_per_byte of `task` from an evaluate.py results.json."""
    res = json.loads(results_json.read_text())["results"][task]
    return {m: float(res[f"{m},none"]) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def summarize(run_dir: Path, train_s: float, eval_s: float) -> dict[str, Any]:
    """The run's summary dict (also written to RUN/make_train.json)."""
    losses = val_losses(run_dir / "csv" / "metrics.csv")
    eval_dir = run_dir / "eval"
    return {
        "val_loss_first": losses[0][1] if losses else math.nan,
        "val_loss_last": losses[-1][1] if losses else math.nan,
        "val_loss_steps": [s for s, _ in losses],
        "heldout": heldout_scores(eval_dir / "results.json"),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "run_dir": str(run_dir),
        "model_dir": str(run_dir / "model"),
        "results_md": str(eval_dir / "results.md"),
        "results_json": str(eval_dir / "results.json"),
    }


def render(summary: dict[str, Any]) -> str:
    """Plain-text summary printed at the end of `make train`."""
    h = summary["heldout"]
    steps = summary["val_loss_steps"]
    return "\n".join(
        [
            "",
            "=== make train: summary ===",
            f"validation loss (nats/token): {summary['val_loss_first']:.3f} (step {steps[0]}) -> "
            f"{summary['val_loss_last']:.3f} (step {steps[-1]})"
            if steps
            else "validation loss: not logged",
            f"held-out (lm-eval task sample_heldout): bits/byte {h['bits_per_byte']:.4f}, "
            f"byte perplexity {h['byte_perplexity']:.4f}, word perplexity {h['word_perplexity']:.4g}",
            f"time: training {summary['train_seconds']:.0f} s, evaluation {summary['eval_seconds']:.0f} s",
            f"model:   {summary['model_dir']}",
            f"results: {summary['results_md']}",
            f"run:     {summary['run_dir']} (replaced by the next `make train`)",
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, export the held-out documents, evaluate, print and return the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("outputs/make_train"), help="run folder")
    parser.add_argument("--experiment", default="nano_cpu", help="train.py experiment= (default nano_cpu)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. trainer.max_steps=50")
    args = parser.parse_args(argv)
    run_dir = args.run_dir if args.run_dir.is_absolute() else ROOT / args.run_dir
    py = sys.executable

    fresh_run_dir(run_dir)
    train_s = _run(
        [py, "train.py", f"experiment={args.experiment}", f"hydra.run.dir={run_dir}", *args.overrides]
    )
    from omegaconf import OmegaConf

    from memoryformer.data.sample import export_heldout

    cfg = OmegaConf.load(run_dir / "checkpoints" / "config.yaml")
    if cfg.data.source != "sample" or not (run_dir / "model").is_dir():
        sys.exit(
            f"error: {run_dir} has no exported model trained on the sample corpus; `make train` needs "
            "data=sample and export_final=true."
        )
    data_dir = run_dir / "eval_data"
    max_bytes, val_every = int(cfg.data.sample_max_bytes), int(cfg.data.sample_val_every)
    flags = f"--max-bytes {max_bytes} --val-every {val_every}"
    print(f"+ -m memoryformer.data.sample --export-eval {data_dir} {flags}", flush=True)
    export_heldout(data_dir, max_bytes, val_every)
    eval_s = _run(
        [
            py,
            "evaluate.py",
            f"checkpoint={run_dir / 'model'}",
            "eval.tasks=sample",
            f"eval.data_dir={data_dir}",
            f"hydra.run.dir={run_dir / 'eval'}",
        ]
    )
    summary = summarize(run_dir, train_s, eval_s)
    (run_dir / "make_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(render(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
