"""The end of a sweep (``python -m genlab -m ...``): one table of every job.

``SweepSummary`` is a Hydra callback (conf/hydra/default.yaml). When the sweep ends it reads
each job's run directory and writes ``<sweep dir>/sweep.json`` and ``results.csv`` (status,
error, family, model, data, parameters, training images/s, wall time and the validation
metrics), logs the same table to W&B as its own run in the sweep's group (offline unless
logged in), and prints it. Jobs that failed are recorded by the jobs themselves
(``genlab.train.main``) and the sweep goes on; at the end the callback names them and exits
non-zero, with the command that retries only the jobs that did not complete.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from genlab.runs import (
    HEADLINE,
    atomic_file,
    atomic_write_text,
    find_runs,
    load_run,
    metric_columns,
)
from genlab.utils import wandb_mode

log = logging.getLogger("genlab")

FIELDS = ["name", "status", "family", "model", "data", "parameters", "global_step",
          "wall_time_s", "train_images_per_s", "error"]  # fmt: skip


def sweep_table(sweep: str | Path) -> tuple[list[str], list[dict]]:
    """(columns, one record per job under the sweep directory, keyed by the columns)."""
    runs = [load_run(r, sweep) for r in find_runs(sweep)]
    metrics = metric_columns(runs)
    records = [{**{f: r[f] for f in FIELDS}, **{m: r["metrics"].get(m) for m in metrics}}
               for r in runs]  # fmt: skip
    return FIELDS + metrics, records


def write_table(sweep: Path, columns: list[str], records: list[dict]) -> None:
    """sweep.json and results.csv, each atomically: a kill while writing leaves the old ones."""
    atomic_write_text(sweep / "sweep.json", json.dumps({"jobs": records}, indent=2) + "\n")
    with atomic_file(sweep / "results.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def log_wandb_table(config: DictConfig, sweep: Path, columns: list[str], records: list[dict]):
    """The results table as a W&B run of its own (job_type "sweep-summary") in the sweep's
    group, when the W&B logger is configured."""
    conf = (config.get("logger") or {}).get("wandb")
    if not conf:
        return None
    import wandb

    run = wandb.init(
        project=conf.get("project"),
        entity=conf.get("entity"),
        group=sweep.name,
        job_type="sweep-summary",
        name=f"{sweep.name}-results",
        dir=str(sweep),
        mode=wandb_mode(conf.get("mode")),
        config={"sweep_dir": str(sweep), "jobs": len(records)},
    )
    table = wandb.Table(columns=columns, data=[[_cell(r[c]) for c in columns] for r in records])
    run.log({"results": table})
    run.summary["completed"] = sum(r["status"] == "completed" for r in records)
    run.summary["failed"] = sum(r["status"] == "failed" for r in records)
    run.finish()
    return run


def _cell(value):
    return value if isinstance(value, int | float | str) or value is None else str(value)


def format_table(columns: list[str], records: list[dict], width: int = 12) -> str:
    """The table as text: the job's fields and the headline metrics the jobs have."""
    keep = ["name", "status", "global_step", "train_images_per_s", *HEADLINE]
    shown = [c for c in keep if c in columns][:12]

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    short = {"global_step": "steps", "train_images_per_s": "train img/s"}
    first = max([len(fmt(r["name"])) for r in records] + [4])
    heads = [short.get(c, c.removeprefix("val/"))[:width].ljust(width) for c in shown[1:]]
    lines = ["  ".join(["name".ljust(first), *heads])]
    for record in records:
        name = fmt(record["name"])
        cells = [name.ljust(first)] + [fmt(record[c])[:width].ljust(width) for c in shown[1:]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


class SweepSummary(Callback):
    """Args: fail_on_error: exit non-zero at the end of a sweep in which some job failed."""

    def __init__(self, fail_on_error: bool = True) -> None:
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir():
            return
        columns, records = sweep_table(sweep)
        write_table(sweep, columns, records)
        try:
            log_wandb_table(config, sweep, columns, records)
        except Exception as err:  # noqa: BLE001 -- the table is on disk either way
            log.warning("W&B results table not logged: %s", err)
        log.info("sweep %s: %d jobs\n%s", sweep, len(records), format_table(columns, records))
        failed = [r for r in records if r["status"] != "completed"]
        if failed and self.fail_on_error:
            names = "; ".join(
                f"{r['name']} ({r['status']}: {(r['error'] or '?').splitlines()[0][:200]})"
                for r in failed
            )
            # Hydra turns a callback's exceptions into warnings: exit non-zero by hand
            log.error(
                "%d of %d jobs did not complete: %s. The others are recorded in %s; re-run the "
                "same command with hydra.sweep.dir=%s to finish only these.",
                len(failed), len(records), names, sweep / "sweep.json", sweep,
            )  # fmt: skip
            raise SystemExit(1)
