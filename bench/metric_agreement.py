"""Do the metrics agree? Kendall τ between the rankings of a sweep's runs by each pair of
validation metrics (issue 17).

    python bench/metric_agreement.py <sweep or folder of runs> [--by-group] [--min-runs 3]
        [--out FILE.csv]

The completed runs under the directory are ranked best first by every ``val/`` metric at
least ``--min-runs`` of them have (``genlab.runs.lower_is_better``: a Fréchet distance, KID
or bits/dim ranks low values first, IS, precision or recall high ones), and Kendall's τ-b
(``scipy.stats.kendalltau``) is computed between every pair of rankings on the runs that have
both metrics: +1 the same order, -1 the reverse, blank where fewer than ``--min-runs`` runs
have both or a metric is constant. Spreads (``_std`` columns) and costs (sampling images/s,
NFE) are left out. ``--by-group`` ranks the seed groups (runs that differ only in ``seed``)
by their means instead of the single runs. The table is printed and written as CSV to
``--out`` (default ``<dir>/metric_agreement.csv``): a ``metric`` column, then one per metric,
then ``n_<metric>``, the number of runs each pair was computed on.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from genlab.groups import metric_agreement, summarize
from genlab.runs import atomic_file, find_runs, load_run


def ranked_units(root: Path, by_group: bool) -> list[dict]:
    """The completed runs under root (or their seed groups, by their means)."""
    runs = [load_run(p, root) for p in find_runs(root)]
    if not by_group:
        return [r for r in runs if r["status"] == "completed"]
    return [
        {"name": g["name"], "metrics": {m: s["mean"] for m, s in g["metrics"].items()}}
        for g in summarize(runs)
        if g["status"] == "completed"
    ]


def format_tau(metrics: list[str], tau) -> str:
    names = [m.removeprefix("val/") for m in metrics]
    width = max([len(n) for n in names] + [6])
    lines = ["τ".ljust(width) + "  " + "  ".join(n[:8].rjust(8) for n in names)]
    for name, row in zip(names, tau):
        cells = ["" if math.isnan(t) else f"{t:+.2f}" for t in row]
        lines.append(name.ljust(width) + "  " + "  ".join(c.rjust(8) for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a sweep directory or any folder of runs")
    parser.add_argument("--by-group", action="store_true", help="rank seed groups by their means")
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory: give a sweep or a folder of runs")
        return 1
    units = ranked_units(args.root, args.by_group)
    result = metric_agreement(units, min_runs=args.min_runs)
    what = "seed groups" if args.by_group else "completed runs"
    if len(result.metrics) < 2:
        print(f"{len(units)} {what} under {args.root}: fewer than two metrics that "
              f"{args.min_runs} or more of them have; nothing to compare")  # fmt: skip
        return 1
    out = args.out or args.root / "metric_agreement.csv"
    with atomic_file(out, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", *result.metrics, *(f"n_{m}" for m in result.metrics)])
        for m, row, n in zip(result.metrics, result.tau, result.n):
            writer.writerow([m, *("" if math.isnan(t) else f"{t:.4f}" for t in row), *n])
    print(f"Kendall τ between the metrics' rankings of {len(units)} {what} under {args.root}")
    print(format_tau(result.metrics, result.tau))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
