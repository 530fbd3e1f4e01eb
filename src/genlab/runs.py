"""Reading run directories back: which runs a folder holds, what each one recorded
(summary.json, metrics.csv, sample grids, its composed config). Shared by the sweep's summary,
the dashboard and the comparison notebook."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from genlab.utils import read_summary

# the columns a comparison leads with, in this order, where any run has them
HEADLINE = [
    "val/fid",
    "val/fd_digits",
    "val/kid_mean",
    "val/kid_digits_mean",
    "val/is_mean",
    "val/is_digits",
    "val/precision",
    "val/precision_digits",
    "val/recall",
    "val/recall_digits",
    "val/bpd",
    "val/clip_score",
    "val/sample_img_per_s",
    "val/sample_nfe",
]
LOWER_IS_BETTER = ("fid", "fd_", "kid", "bpd", "loss", "nfe")


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(root: str | Path) -> list[Path]:
    """Run directories under root (root itself included): those with a summary.json or a
    .hydra/config.yaml, in natural order (job 2 before job 10)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} is not a directory: give a run, a sweep or a folder of runs"
        )
    found = set()
    for marker in ("summary.json", ".hydra/config.yaml"):
        for path in root.rglob(marker):
            run = path.parent if marker == "summary.json" else path.parent.parent
            if "wandb" not in run.relative_to(root).parts:
                found.add(run)
    return sorted(found, key=_natural)


def read_curves(run: str | Path) -> dict[str, list[tuple[int, float | None, float]]]:
    """metrics.csv as {metric: [(step, train seconds or None, value), ...]}. The seconds come
    from the ``time/train_s`` column (the WallClock callback), interpolated between the
    steps where it was logged."""
    path = Path(run) / "metrics.csv"
    if not path.exists():
        return {}
    rows = list(csv.DictReader(path.open()))
    clock = sorted(
        (int(r["step"]), float(r["time/train_s"]))
        for r in rows
        if r.get("time/train_s") and r.get("step")
    )
    curves: dict[str, list] = {}
    for r in rows:
        if not r.get("step"):
            continue
        step = int(r["step"])
        for key, value in r.items():
            if key in ("step", "epoch", "time/train_s") or value in ("", None):
                continue
            try:
                v = float(value)
            except ValueError:
                continue
            if math.isfinite(v):
                curves.setdefault(key, []).append((step, _at(clock, step), v))
    return curves


def _at(clock: list[tuple[int, float]], step: int) -> float | None:
    """Seconds at ``step``, linear between the logged (step, seconds) pairs."""
    if not clock:
        return None
    if step <= clock[0][0]:
        return clock[0][1] * step / max(clock[0][0], 1)
    for (s0, t0), (s1, t1) in zip(clock, clock[1:]):
        if s0 <= step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return clock[-1][1]


def latest_images(run: str | Path) -> dict[str, Path]:
    """The newest grid of each kind in <run>/samples: {"step": ..., "recon": ..., ...}."""
    newest: dict[str, tuple[int, Path]] = {}
    for png in Path(run, "samples").glob("*.png"):
        m = re.fullmatch(r"(.+?)_?(\d+)", png.stem)
        kind, step = (m.group(1), int(m.group(2))) if m else (png.stem, -1)
        if kind not in newest or step > newest[kind][0]:
            newest[kind] = (step, png)
    return {k: p for k, (_, p) in sorted(newest.items())}


def flat_config(run: str | Path) -> dict[str, Any]:
    """The run's composed config (.hydra/config.yaml) flattened to dotted keys, unresolved
    values as written."""
    path = Path(run) / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    out: dict[str, Any] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), "")
    return out


def overrides(run: str | Path) -> list[str]:
    path = Path(run) / ".hydra" / "overrides.yaml"
    return list(OmegaConf.load(path)) if path.exists() else []


def load_run(run: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """One run as a flat record: name (relative to root), status, error, family, model,
    data, parameters, steps, wall time, training images/s, and its final metrics."""
    run = Path(run)
    summary = read_summary(run)
    config = flat_config(run)
    choices = summary.get("choices") or {}
    name = str(run.relative_to(root)) if root is not None and run != Path(root) else run.name
    status = summary.get("status") or ("not started" if not config else "unknown")
    return {
        "name": name,
        "path": str(run),
        "status": status,
        "error": summary.get("error"),
        "family": (summary.get("family") or "").removesuffix("Module") or None,
        "model": choices.get("model"),
        "data": choices.get("data"),
        "parameters": summary.get("parameters"),
        "global_step": summary.get("global_step"),
        "wall_time_s": summary.get("wall_time_s"),
        "eval_time_s": summary.get("eval_time_s"),
        "train_images_per_s": summary.get("train_images_per_s"),
        "metrics": {
            k: v for k, v in (summary.get("metrics") or {}).items() if isinstance(v, int | float)
        },
        "overrides": overrides(run),
        "config": config,
    }


def metric_columns(runs: list[dict]) -> list[str]:
    """The validation metrics any run has: the headline ones first, then the rest sorted."""
    have = {k for r in runs for k in r["metrics"] if k.startswith("val/")}
    return [k for k in HEADLINE if k in have] + sorted(have - set(HEADLINE))


def config_differences(runs: list[dict]) -> list[str]:
    """Config keys whose values differ between the runs (paths and run names left out)."""
    keys = sorted({k for r in runs for k in r["config"]})
    skip = ("paths.", "hydra.")
    return [
        k
        for k in keys
        if not k.startswith(skip) and len({repr(r["config"].get(k, "—")) for r in runs}) > 1
    ]


def lower_is_better(metric: str) -> bool:
    return any(tag in metric for tag in LOWER_IS_BETTER)
