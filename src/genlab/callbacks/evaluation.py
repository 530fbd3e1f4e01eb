"""Periodic and final evaluation: ``genlab.evaluation.evaluate_model`` with the callback's
``genlab.metrics.Evaluator`` (built once; it keeps the extractors and reference statistics).

Every ``every_n_steps`` training steps and at the end of training, on rank 0, the callback
evaluates the family (FID / KID / IS / precision-recall through torch-fidelity, bits/dim,
sampling cost, optionally CLIP score), logs ``val/*`` to every logger at the current step,
appends ``{"step", "metrics", "protocol"}`` to ``<run>/evaluations.jsonl`` and keeps the last
result in ``latest`` for ``summary.json``. Missing Inception / CLIP weights give one warning
and are recorded under ``protocol.not_computed``; the run goes on. Configured by the
``metrics`` config group (``conf/metrics/*.yaml``), attached in ``conf/callbacks``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from genlab.callbacks.periodic import PeriodicCallback
from genlab.evaluation import evaluate_model
from genlab.metrics.evaluator import Evaluator

log = logging.getLogger("genlab")


class Evaluation(PeriodicCallback):
    """Args: every_n_steps (0: only at the end), at_end, and the ``Evaluator`` arguments."""

    def __init__(self, every_n_steps: int = 5000, at_end: bool = True, **evaluator):
        super().__init__(every_n_steps, at_end)
        self.evaluator = Evaluator.from_config(evaluator)
        self.latest: dict | None = None
        self.time_s = 0.0  # total time spent evaluating (excluded from training throughput)

    @rank_zero_only
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        step = trainer.global_step
        start = time.perf_counter()
        metrics, protocol = evaluate_model(self.evaluator, pl_module, trainer.datamodule)
        result = {"metrics": metrics, "protocol": protocol, "time_s": time.perf_counter() - start}
        result["step"] = step
        for logger in trainer.loggers:
            logger.log_metrics(result["metrics"], step=step)
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(
                    {"eval_protocol": result["protocol"]}, allow_val_change=True
                )
        with open(Path(trainer.default_root_dir) / "evaluations.jsonl", "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
        log.info("evaluation at step %d (%.1f s): %s", step, result["time_s"], shown)
        self.time_s += result["time_s"]
        self.latest = result
        return result

    def fire(self, trainer, pl_module):
        self.run(trainer, pl_module)
