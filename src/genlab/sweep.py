"""The end of a sweep (``python -m genlab -m ...``): one table of every job.

``SweepSummary`` is a Hydra callback (conf/hydra/default.yaml). When the sweep ends it reads
each job's run directory and writes ``<sweep dir>/sweep.json`` and ``results.csv`` (status,
error, family, model, data, parameters, training images/s, wall time and the validation
metrics), logs the same table to W&B as its own run in the sweep's group (offline unless
logged in), and prints it. Jobs that failed are recorded by the jobs themselves
(``genlab.train.main``) and the sweep goes on; at the end the callback names them and exits
non-zero, with the command that retries only the jobs that did not complete.

Jobs that differ only in their seed (``seed=0,1,2``) are also taken together
(``genlab.groups``): ``groups.json`` and ``groups.csv`` hold each group's mean, std (ddof=1)
and count per metric, the log shows them as ``mean ± std`` and says, for the lead headline
metric, which pairs of groups have overlapping mean ± std intervals.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from genlab.groups import lead_metric, overlaps, pm, summarize, value_metrics
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
    return job_table([load_run(r, sweep) for r in find_runs(sweep)])


def job_table(runs: list[dict]) -> tuple[list[str], list[dict]]:
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


GROUP_FIELDS = ["group", "runs", "seeds", "n_runs", "status", "family", "model", "data"]


def group_table(groups: list[dict]) -> tuple[list[str], list[dict]]:
    """(columns, one row per seed group): per metric ``m`` its mean, ``m_std`` and ``m_n``."""
    metrics = value_metrics(metric_columns([{"metrics": g["metrics"]} for g in groups]))
    columns = GROUP_FIELDS + [f"{m}{tail}" for m in metrics for tail in ("", "_std", "_n")]
    rows = []
    for g in groups:
        row = {"group": g["name"], "runs": " ".join(g["runs"]), "n_runs": len(g["runs"]),
               "seeds": " ".join(map(str, g["seeds"])),
               **{k: g[k] for k in ("status", "family", "model", "data")}}  # fmt: skip
        for m in metrics:
            s = g["metrics"].get(m) or {}
            row.update({m: s.get("mean"), f"{m}_std": s.get("std"), f"{m}_n": s.get("n")})
        rows.append(row)
    return columns, rows


def write_groups(sweep: Path, groups: list[dict], statements: list[str]) -> None:
    """groups.json (the groups with their stats and the overlap statements) and groups.csv,
    each atomically."""
    doc = {"groups": groups, "overlaps": statements}
    atomic_write_text(sweep / "groups.json", json.dumps(doc, indent=2) + "\n")
    columns, rows = group_table(groups)
    with atomic_file(sweep / "groups.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def format_groups(groups: list[dict], width: int = 18) -> str:
    """The groups as text: name, runs, seeds and the headline metrics as ``mean ± std``."""
    have = {m for g in groups for m in g["metrics"]}
    shown = [m for m in HEADLINE if m in have][:8]
    first = max([len(g["name"]) for g in groups] + [5])
    heads = [m.removeprefix("val/")[:width].ljust(width) for m in shown]
    lines = ["  ".join(["group".ljust(first), "n".ljust(2), "seeds".ljust(8), *heads])]
    for g in groups:
        seeds = ",".join(map(str, g["seeds"]))
        cells = [pm(g["metrics"].get(m))[:width].ljust(width) for m in shown]
        lines.append("  ".join([g["name"].ljust(first), str(len(g["runs"])).ljust(2),
                                seeds[:8].ljust(8), *cells]))  # fmt: skip
    return "\n".join(lines)


def report_groups(sweep: Path, runs: list[dict]) -> list[dict]:
    """Write groups.json / groups.csv and log the grouped table with the overlap statements
    (only where there are seed groups or the lead metric has a spread: else the table repeats
    the jobs' one)."""
    groups = summarize(runs)
    metric = lead_metric(groups)
    statements = overlaps(groups, metric) if metric else []
    write_groups(sweep, groups, statements)
    spread = any((g["metrics"].get(metric) or {}).get("std") is not None for g in groups)
    if spread or any(len(g["runs"]) > 1 for g in groups):
        text = format_groups(groups)
        if statements:
            text += "\n" + "\n".join(statements)
        log.info("sweep %s: %d groups (runs that differ only in seed), mean ± std\n%s",
                 sweep, len(groups), text)  # fmt: skip
    return groups


class SweepSummary(Callback):
    """Args: fail_on_error: exit non-zero at the end of a sweep in which some job failed."""

    def __init__(self, fail_on_error: bool = True) -> None:
        self.fail_on_error = fail_on_error

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir():
            return
        runs = [load_run(r, sweep) for r in find_runs(sweep)]
        columns, records = job_table(runs)
        write_table(sweep, columns, records)
        try:
            log_wandb_table(config, sweep, columns, records)
        except Exception as err:  # noqa: BLE001 -- the table is on disk either way
            log.warning("W&B results table not logged: %s", err)
        log.info("sweep %s: %d jobs\n%s", sweep, len(records), format_table(columns, records))
        try:
            report_groups(sweep, runs)
        except Exception as err:  # noqa: BLE001 -- the jobs' table is on disk either way
            log.warning("groups by seed not written: %s", err)
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
