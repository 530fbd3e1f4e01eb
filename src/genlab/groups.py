"""Runs that differ only in their seed, taken together: mean ± std of every metric over the
seeds, whether two groups' mean ± std intervals overlap, and how far the metrics agree on
the ranking of runs (Kendall τ). Used by the sweep's summary (``genlab.sweep``), the dashboard
and ``bench/metric_agreement.py``; the inputs are the records of ``genlab.runs.load_run``.

Two runs are in one group when their composed configs (``.hydra/config.yaml``, unresolved) are
equal once ``seed``, the ``*.seed`` keys that follow it (``${seed}``, or the run's own seed
value) and the per-job ``paths.*`` / ``hydra.*`` keys are left out, and their seeds differ. A
group of one is a run as it was: its spread, where it reports one itself (``val/X_std`` beside
``val/X``, e.g. from ``metrics.repeats=K``; ``val/X_std`` beside ``val/X_mean`` for KID), is
kept beside its value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import combinations, combinations_with_replacement
from typing import Any, NamedTuple

import numpy as np

from genlab.runs import HEADLINE, lower_is_better, metric_columns

FIELDS = ("parameters", "global_step", "train_images_per_s", "wall_time_s")  # averaged too
PER_JOB = ("paths.", "hydra.")  # config keys that differ per job (as config_differences skips)
COST = ("_per_s", "nfe")  # cost metrics (sampling images/s, NFE): not a quality ranking
BOUNDS = ("_std", "_ci_low", "_ci_high")  # a metric's spread or interval, not a metric
NOT_RANKED = ("val/loss",)  # each family's own objective: no common scale to rank runs by


# ------------------------------------------------------------------ which runs go together
def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_seed(key: str) -> bool:
    return key == "seed" or key.endswith(".seed")


def identity(run: dict) -> str | None:
    """The run's config without its seed and per-job keys, as a comparable string (None
    for a run without a config: it groups with nothing)."""
    config = run.get("config") or {}
    if not config:
        return None
    seed = config.get("seed")
    kept = {
        k: v
        for k, v in config.items()
        if k != "seed"
        and not k.startswith(PER_JOB)
        and not (k.endswith(".seed") and (v == seed or v == "${seed}"))
    }
    return json.dumps(kept, sort_keys=True, default=str)


def seed_of(run: dict) -> Any:
    return (run.get("config") or {}).get("seed")


def group_runs(runs: Sequence[dict]) -> list[list[dict]]:
    """The runs in groups, in the order of each group's first run. Runs with equal identity and
    distinct seeds form one group; equal identity with a repeated seed (the same run twice)
    leaves each run on its own."""
    buckets: dict[Any, list[dict]] = {}
    for i, run in enumerate(runs):
        key = identity(run)
        buckets.setdefault(key if key is not None else ("alone", i), []).append(run)
    out = []
    for members in buckets.values():
        seeds = [seed_of(r) for r in members]
        if len(members) > 1 and (None in seeds or len({repr(s) for s in seeds}) < len(seeds)):
            out += [[r] for r in members]
        else:
            out.append(members)
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(out, key=lambda g: order[id(g[0])])


def labels(groups: Sequence[Sequence[dict]]) -> list[str]:
    """A name for each group: a run's own name when it is alone; for seed groups, the
    command-line overrides (without seeds and paths) that set the group apart from the others,
    e.g. ``model=vae``."""

    def own(group):
        return [o for o in group[0].get("overrides") or []
                if not _is_seed(_key(o)) and not _key(o).startswith(PER_JOB)]  # fmt: skip

    common = set.intersection(*(set(own(g)) for g in groups)) if len(groups) > 1 else set()
    names = []
    for group in groups:
        if len(group) == 1:
            names.append(group[0]["name"])
            continue
        distinct = " ".join(o for o in own(group) if o not in common)
        names.append(distinct or f"{group[0]['name']} (+{len(group) - 1} seeds)")
    return names


# ------------------------------------------------------------------ mean ± std
def spread_key(metric: str, have: Sequence[str]) -> str | None:
    """The column that holds ``metric``'s own spread, where the runs have one: ``val/X_std``
    for ``val/X`` (``val/X_mean``'s is ``val/X_std`` as well)."""
    for key in (f"{metric}_std", f"{metric.removesuffix('_mean')}_std"):
        if key != metric and key in have:
            return key
    return None


def value_metrics(metrics: Sequence[str]) -> list[str]:
    """The metrics that are values, not the spread of another metric in the list."""
    spreads = {spread_key(m, metrics) for m in metrics} - {None}
    return [m for m in metrics if m not in spreads]


def stats(values: Sequence[float], own_std: float | None = None) -> dict:
    """{"mean", "std", "n", "spread"}: the sample std (ddof=1) over n >= 2 values ("seeds"),
    or one value with the std the run reported itself ("run"), or none (std None)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(x) >= 2:
        return {"mean": float(x.mean()), "std": float(x.std(ddof=1)), "n": len(x),
                "spread": "seeds"}  # fmt: skip
    if len(x) == 1:
        std = own_std if own_std is not None and math.isfinite(own_std) else None
        spread = "run" if std is not None else None
        return {"mean": float(x[0]), "std": std, "n": 1, "spread": spread}
    return {"mean": None, "std": None, "n": 0, "spread": None}


def summarize(runs: Sequence[dict]) -> list[dict]:
    """One record per group: name, its runs and seeds, status, family/model/data, and
    {metric: stats} for every validation metric (spread columns folded in) and run field."""
    groups = group_runs(runs)
    all_metrics = metric_columns(list(runs))
    metrics = value_metrics(all_metrics)
    out = []
    for name, members in zip(labels(groups), groups):
        statuses = [r["status"] for r in members]
        done = statuses.count("completed")
        status = statuses[0] if len(set(statuses)) == 1 else f"{done}/{len(members)} completed"
        record = {
            "name": name,
            "runs": [r["name"] for r in members],
            "seeds": [seed_of(r) for r in members],
            "status": status,
            **{k: members[0].get(k) for k in ("family", "model", "data")},
            "metrics": {},
            "fields": {f: stats([r.get(f) for r in members]) for f in FIELDS},
        }
        for m in metrics:
            having = [r for r in members if m in r["metrics"]]
            own = spread_key(m, all_metrics)
            own_std = having[0]["metrics"].get(own) if own and len(having) == 1 else None
            if having:
                record["metrics"][m] = stats([r["metrics"][m] for r in having], own_std)
        out.append(record)
    return out


def pm(s: dict | None, digits: int = 4) -> str:
    """A stats dict as text: ``12.3 ± 0.45`` (``12.3`` without a spread, ``""`` without a value)."""
    if not s or s.get("mean") is None:
        return ""
    mean = f"{s['mean']:.{digits}g}"
    return mean if s.get("std") is None else f"{mean} ± {s['std']:.2g}"


# ------------------------------------------------------------------ do the intervals overlap?
def lead_metric(groups: Sequence[dict]) -> str | None:
    """The first headline quality metric the groups have (what the comparison leads with)."""
    have = {m for g in groups for m in g["metrics"]}
    return next((m for m in HEADLINE if m in have and not is_cost(m)), None)


def overlaps(groups: Sequence[dict], metric: str) -> list[str]:
    """For each pair of groups with ``metric``: whether their mean ± std intervals overlap.
    A group without a spread is the point at its mean."""
    short = metric.removeprefix("val/")
    have = [g for g in groups if metric in g["metrics"]]
    lines = []
    for a, b in combinations(have, 2):
        sa, sb = a["metrics"][metric], b["metrics"][metric]
        if sa["std"] is None and sb["std"] is None:
            verdict = "no spread to compare (one run each, no repeats)"
        else:
            da, db = sa["std"] or 0.0, sb["std"] or 0.0
            apart = max(sa["mean"] - da, sb["mean"] - db) > min(sa["mean"] + da, sb["mean"] + db)
            verdict = ("apart (difference larger than the spread)" if apart
                       else "intervals overlap (difference within the spread)")  # fmt: skip
        lines.append(f"{short}: {a['name']} vs {b['name']}: {verdict}")
    return lines


# ------------------------------------------------------------------ do the metrics agree?
class Agreement(NamedTuple):
    metrics: list[str]  # the metrics compared, headline ones first
    tau: np.ndarray  # (M, M) Kendall τ (tau-b) between rankings; nan where it is undefined
    n: np.ndarray  # (M, M) how many runs have both metrics


def is_cost(metric: str) -> bool:
    """Sampling images/s and network evaluations: what a sample costs, not how good it is."""
    return any(tag in metric for tag in COST)


def metric_agreement(runs: Sequence[dict], min_runs: int = 3) -> Agreement:
    """Kendall τ between the rankings of ``runs`` (records with a ``metrics`` dict) by every
    pair of validation metrics at least ``min_runs`` of them have; each metric is ranked best
    first (``lower_is_better`` ones reversed), so τ = +1 means the two metrics order the runs
    the same way. Spread and interval columns (``_std``, ``_ci_low`` / ``_ci_high``) and cost
    metrics are left out, and so is ``val/loss`` (each family's own objective). A pair is
    computed on the runs that have both metrics (nan with fewer than ``min_runs`` or a
    constant one)."""
    from scipy.stats import kendalltau

    def finite(r, m):
        v = r["metrics"].get(m)
        return isinstance(v, int | float) and math.isfinite(v)

    columns = [m for m in metric_columns(list(runs))
               if not m.endswith(BOUNDS) and not is_cost(m) and m not in NOT_RANKED]  # fmt: skip
    metrics = [m for m in columns if sum(finite(r, m) for r in runs) >= min_runs]
    size = len(metrics)
    tau, n = np.full((size, size), np.nan), np.zeros((size, size), dtype=int)
    for i, j in combinations_with_replacement(range(size), 2):
        a, b = metrics[i], metrics[j]
        both = [r for r in runs if finite(r, a) and finite(r, b)]
        n[i, j] = n[j, i] = len(both)
        constant = min(len({r["metrics"][m] for r in both}) for m in (a, b)) < 2
        if len(both) < min_runs or constant:
            continue  # too few runs, or a metric that does not rank them
        sign = [(-1.0 if lower_is_better(m) else 1.0) for m in (a, b)]
        x = [sign[0] * r["metrics"][a] for r in both]
        y = [sign[1] * r["metrics"][b] for r in both]
        tau[i, j] = tau[j, i] = kendalltau(x, y).statistic
    return Agreement(metrics, tau, n)
