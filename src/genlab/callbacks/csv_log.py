"""The run's ``metrics.csv``, kept across resumes.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a new process opens the run
directory, so a run resumed into its own directory lost every row before the resume point.
``ResumableCSVLogger`` keeps them: the rows already on disk are read back before Lightning's
writer starts, written again at once (nothing is lost if the resumed process dies early), and
at the first save of the resumed process the old rows at or after its first logged step are
dropped (they were logged after the checkpoint it resumed from, and are logged again), so the
file holds every step once.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


class _KeepingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        path = Path(log_dir) / self.NAME_METRICS_FILE
        old = list(csv.DictReader(path.open(newline=""))) if path.is_file() else []
        super().__init__(log_dir)  # removes the file
        self._old = old
        self._pending = bool(old)
        if old:
            self.metrics_keys = sorted({k for row in old for k in row})
            self._write(old)

    def _write(self, rows: list[dict]) -> None:
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        if self._pending and self.metrics:
            first = min(int(m["step"]) for m in self.metrics)
            kept = [r for r in self._old if (_step(r) is None or _step(r) < first)]
            self._write(kept)
            self._pending, self._old = False, []
        super().save()


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume into the same directory."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment
