"""Draw a run's loss curve from its Lightning CSV log.

    python scripts/plot_loss.py outputs/make_train/csv/metrics.csv --out docs/make_train_loss.png

Plots `train/loss` and `val/loss` (nats per token) against the optimizer step; the README's picture of
`make train` is made this way.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def loss_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """`{"train/loss": [(step, loss), ...], "val/loss": [...]}` from a Lightning `metrics.csv`."""
    series: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, points in series.items():
                if row.get(key):
                    points.append((int(row["step"]), float(row[key])))
    return series


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("metrics_csv", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="make train: nano MemoryFormer on the bundled corpus (CPU)")
    args = parser.parse_args()

    from memoryformer.evaluation.figures import pyplot, save

    fig, ax = pyplot().subplots(figsize=(6.4, 3.6))
    for key, points in loss_series(args.metrics_csv).items():
        if points:
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, marker="o", markersize=3, label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
