"""`CSVLogger`: Lightning's CSV logger, except that a resumed run keeps the rows its folder already holds.

Lightning's writer deletes `metrics.csv` when its folder is not empty, so a run that resumes in its own
folder (a requeued SLURM job, a torchrun group restarted after a dead rank) would lose the history of every
step before the resume. This one keeps the file and, at its first write, drops only the rows of steps the
resumed run logs again (those an interrupted run logged after its last checkpoint, which are redone).
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's `ExperimentWriter` that appends to an existing `metrics.csv` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        self._pending_trim = True
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep what is there (Lightning's removes `metrics.csv`); read its columns so new rows line up."""
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)

    def save(self) -> None:
        """Write the recorded rows; the first write first drops stored rows at or after its first step."""
        if self.metrics and self._pending_trim:
            self._pending_trim = False
            self._drop_rows_from(min(int(m["step"]) for m in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step") not in (None, "") and int(r["step"]) < step]
        tmp = f"{self.metrics_file_path}.tmp{os.getpid()}"
        with self._fs.open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose `metrics.csv` survives a resume in the same folder."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The `KeepingExperimentWriter` of this run's `log_dir`."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
