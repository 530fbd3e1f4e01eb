"""Periodic and final evaluation: ``genlab.evaluation.evaluate_model`` with the callback's
``genlab.metrics.Evaluator`` (built once; it keeps the extractors and reference statistics).

Every ``every_n_steps`` training steps and at the end of training the callback evaluates the
family (FID / KID / IS / precision-recall through torch-fidelity, bits/dim,
sampling cost, optionally CLIP score), logs ``val/*`` to every logger at the current step,
records ``{"step", "metrics", "protocol"}`` in ``<run>/evaluations.jsonl`` and keeps the last
result in ``latest`` for ``summary.json``. The file holds each step once, whatever a kill did
to the run: a row replaces any at its step or later (those steps are being trained again after
a resume from an earlier checkpoint), the file is rewritten atomically, and an evaluation that
a kill or a stop signal interrupted is run again when the run resumes at its step
(``on_train_start``, and ``finish`` after ``fit`` for the final one). Missing Inception / CLIP
weights give one warning and are recorded under ``protocol.not_computed``; the run goes on.
Configured by the ``metrics`` config group (``conf/metrics/*.yaml``), attached in
``conf/callbacks``. Under DDP every rank samples its block of the samples and its share of
the bits/dim batches, rank 0 computes the metrics from the gathered features
(``genlab.metrics.ranks``) and alone logs and writes them; the numbers are those of one
process.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from genlab.callbacks.periodic import PeriodicCallback
from genlab.evaluation import evaluate_model
from genlab.metrics.evaluator import Evaluator
from genlab.metrics.ranks import Ranks
from genlab.runs import atomic_write_text

log = logging.getLogger("genlab")


class Evaluation(PeriodicCallback):
    """Args: every_n_steps (0: only at the end), at_end, and the ``Evaluator`` arguments."""

    def __init__(self, every_n_steps: int = 5000, at_end: bool = True, **evaluator):
        super().__init__(every_n_steps, at_end)
        self.evaluator = Evaluator.from_config(evaluator)
        self.latest: dict | None = None
        self.time_s = 0.0  # total time spent evaluating (excluded from training throughput)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Every rank calls it (each samples its share); rank 0 logs and records."""
        step = trainer.global_step
        start = time.perf_counter()
        ranks = Ranks.current(pl_module.device)
        metrics, protocol = evaluate_model(
            self.evaluator, pl_module, trainer.datamodule, ranks=ranks
        )
        result = {"metrics": metrics, "protocol": protocol, "time_s": time.perf_counter() - start}
        result["step"] = step
        self.time_s += result["time_s"]
        self.latest = result
        if trainer.is_global_zero:
            self._record(trainer, result)
        return result

    def _record(self, trainer: L.Trainer, result: dict) -> None:
        step = result["step"]
        for logger in trainer.loggers:
            logger.log_metrics(result["metrics"], step=step)
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(
                    {"eval_protocol": result["protocol"]}, allow_val_change=True
                )
        kept = [row for row in self.recorded(trainer) if row["step"] < step]
        lines = [json.dumps(row, default=str) + "\n" for row in [*kept, result]]
        atomic_write_text(self._path(trainer), "".join(lines))
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
        log.info("evaluation at step %d (%.1f s): %s", step, result["time_s"], shown)

    def fire(self, trainer, pl_module):
        self.run(trainer, pl_module)

    @staticmethod
    def _path(trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / "evaluations.jsonl"

    def recorded(self, trainer: L.Trainer) -> list[dict]:
        """The rows of evaluations.jsonl (a line cut short by a kill is skipped)."""
        path, rows = self._path(trainer), []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def on_train_start(self, trainer, pl_module):
        # resumed at a step whose evaluation a kill or a signal interrupted: run it now
        step, every = trainer.global_step, self.every_n_steps
        if step > 0 and every > 0 and step % every == 0:
            if all(row["step"] != step for row in self.recorded(trainer)):
                self._fire_once(trainer, pl_module)

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After ``fit``: the final evaluation, when the fit loop did not run it (a run killed
        during its final evaluation resumes at its last step, where the loop has nothing left
        to do); one recorded at that step before the kill is taken as it is."""
        step = trainer.global_step
        if not self.at_end or step == 0 or (self.latest or {}).get("step") == step:
            return
        row = next((r for r in self.recorded(trainer) if r["step"] == step), None)
        if row is not None:
            self.latest = row
        else:
            self._fire_once(trainer, pl_module)
