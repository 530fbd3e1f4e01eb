"""Quality against the number of network evaluations (NFE): the table ``<run>/nfe.csv`` and
its plot ``<run>/nfe.png``, written by ``python -m genlab.evaluate run_dir=<run>
"nfe=[2,4,8,16,32]"`` and read by the dashboard.

The table has one row per point: the solver, its spacing, the sampler settings that differ from
the solver's defaults (``options``, e.g. ``eta=1.0``), the NFE asked for, the ``steps`` that
gave it (``genlab.diffusion.samplers.steps_for_nfe``), the NFE counted on the network (``nfe``,
what ``val/sample_nfe`` reports), the checkpoint and its step, EMA or raw weights, ``settings``
(8 hex digits naming the evaluator settings a number depends on, with ``num_samples`` and
``seed`` spelled out), the seconds the point took, when, and one column per metric
(``val/fd_digits``, ``val/fid``, ..., ``val/sample_img_per_s``; empty where a row has none). A
row is identified by ``KEY``: writing a point again replaces its row, any other row is kept, so
sweeps of several solvers accumulate in one table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

from genlab.runs import HEADLINE, atomic_file

TABLE, PLOT = "nfe.csv", "nfe.png"
# a row's identity: a repeated point replaces its row, anything else is appended
KEY = ["solver", "spacing", "options", "nfe_requested", "ckpt", "step", "weights", "settings"]
COLUMNS = [*KEY[:4], "steps", "nfe", *KEY[4:], "num_samples", "seed", "time_s", "time"]
# evaluator settings that cannot change a number (left out of the settings fingerprint)
NOT_SETTINGS = {"progress", "on_missing_weights", "cache_dir", "batch_size", "bpd_images",
                "bpd_batch_size"}  # fmt: skip


def settings_id(settings: dict) -> str:
    """8 hex digits that name the evaluator settings a number depends on."""
    kept = {k: v for k, v in sorted(settings.items()) if k not in NOT_SETTINGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def read_table(path: Path) -> list[dict]:
    """The rows of an ``nfe.csv`` (strings; "" where a row has no value)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_table(path: Path, rows: list[dict]) -> list[dict]:
    """Merge rows into the table at ``path`` (same key: replaced; new: appended), sorted by
    solver, spacing, options, settings and NFE, written atomically; returns all rows."""
    table = {tuple(r.get(k, "") for k in KEY): r for r in read_table(path)}
    for row in rows:
        row = {k: _cell(v) for k, v in row.items()}
        table[tuple(row[k] for k in KEY)] = row
    merged = sorted(table.values(), key=lambda r: (
        r["solver"], r["spacing"], r["options"], r["settings"], r["ckpt"], r["step"],
        int(r["nfe_requested"])))  # fmt: skip
    have = {k for r in merged for k in r if k.startswith("val/")}
    metrics = [k for k in HEADLINE if k in have] + sorted(have - set(HEADLINE))
    columns = [*COLUMNS, *metrics]
    merged = [{c: r.get(c) or "" for c in columns} for r in merged]  # every row, every column
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(merged)
    with atomic_file(path, "w") as f:
        f.write(text.getvalue())
    return merged


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped into lines: solver (spacing) [options], and the checkpoint and settings
    where the table holds more than one."""
    extra = ("ckpt", "step", "weights", "settings")
    several = len({tuple(r[k] for k in extra) for r in rows}) > 1
    lines: dict[str, list[dict]] = {}
    for r in rows:
        label = f"{r['solver']} ({r['spacing']})" + (f" {r['options']}" if r["options"] else "")
        if several:
            label += f" · {r['ckpt']}@{r['step']} n={r['num_samples']} [{r['settings']}]"
        lines.setdefault(label, []).append(r)
    return lines


def plotted_metrics(rows: list[dict], most: int = 4) -> list[str]:
    """The quality metrics worth a panel: the table's first ``most`` (headline order) that
    have a finite value, neither spreads (``_std``) nor sampling cost."""

    def finite(k):
        return any(r.get(k) not in (None, "") and float(r[k]) == float(r[k]) for r in rows)

    keys = [k for k in (rows[0] if rows else {}) if k.startswith("val/")]
    keys = [k for k in keys if not k.endswith("_std") and not k.startswith("val/sample_")]
    return [k for k in keys if finite(k)][:most]


def plot(rows: list[dict], path: Path) -> Path:
    """Each quality metric against the counted NFE (log x), one line per solver/spacing."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    quality = plotted_metrics(rows)
    cols = min(2, max(1, len(quality)))
    nrows = -(-max(1, len(quality)) // cols)
    fig = Figure(figsize=(4.6 * cols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax in axes[len(quality) :]:
        ax.set_visible(False)
    if not quality:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no quality metric in the table", ha="center")
    lines = series(rows)
    for ax, metric in zip(axes, quality):
        xs = set()
        for label, line in lines.items():
            points = sorted(
                (float(r["nfe"] or r["nfe_requested"]), float(r[metric])) for r in line
                if r.get(metric) not in (None, "")
            )  # fmt: skip
            if points:
                xs.update(x for x, _ in points)
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xticks(sorted(xs))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network evaluations per image (counted)")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    if quality:
        axes[0].legend(fontsize=8)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


__all__ = ["COLUMNS", "KEY", "PLOT", "TABLE", "plot", "read_table", "series", "settings_id",
           "write_table"]  # fmt: skip
