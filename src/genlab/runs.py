"""The run directory, in one place: writing files atomically, summary.json, reading a run
back (its config, checkpoint and model), and finding runs and what each recorded
(metrics.csv, sample grids, its composed config). Used by training, the sample and evaluate
commands, the sweep's summary, the dashboard and the comparison notebook.

Layout (DESIGN.md): ``.hydra/config.yaml`` (the composed config), ``checkpoints/last.ckpt``
(+ best), ``samples/`` (PNG grids by step), ``metrics.csv``, ``summary.json``.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from genlab.utils import UserError, one_line


# ------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file that appears at ``path`` complete or not at all: written to a temporary file in
    the same directory, flushed, fsynced and renamed over the target (``os.replace`` is
    atomic on POSIX and Windows); on any failure the temporary file is removed and the old
    target, if any, is untouched. The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(err):
            raise OSError(
                errno.ENOSPC,
                f"no space left on {path.parent} while writing {path.name}: "
                "free some space, then resume (the previous file is intact)",
            ) from None
        raise


def _out_of_space(err: BaseException) -> bool:
    """ENOSPC anywhere in the chain (torch wraps the OSError of a failed write)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files a killed ``atomic_file`` left in ``directory``."""
    stale = sorted(Path(directory).glob(".*.tmp")) if Path(directory).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def save_config(cfg: DictConfig, run_dir: str | Path) -> Path:
    """``<run>/.hydra/config.yaml``, the config sample, evaluate and a resume read: ``cfg``
    without its ``hydra`` node, as Hydra writes it, atomically."""
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return atomic_write_text(Path(run_dir) / ".hydra" / "config.yaml", OmegaConf.to_yaml(plain))


# ------------------------------------------------------------------ summary.json
UNREADABLE = "cannot be read"


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_summary(run_dir: str | Path, summary: dict, merge: bool = True) -> Path:
    """Write (or merge into) ``<run_dir>/summary.json`` atomically."""
    path = Path(run_dir) / "summary.json"
    data = read_summary(run_dir) if merge else {}
    if UNREADABLE in str(data.get("error")):
        data = {}  # an unreadable summary is replaced, not merged into
    data.update(_jsonable(summary))
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_summary(run_dir: str | Path) -> dict:
    """``<run_dir>/summary.json`` ({} if there is none). A summary that cannot be read is a
    failed run: ``{"status": "failed", "error": "... cannot be read ..."}``."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        return data
    except (ValueError, UnicodeDecodeError) as err:
        return {"status": "failed", "error": f"{path} {UNREADABLE} ({err}); re-run the job"}


# ------------------------------------------------------------------ reading a run back
class LoadedRun(NamedTuple):
    model: Any  # the family, with its weights, in eval mode
    cfg: DictConfig  # the run's composed config (with any model overrides merged)
    step: int | None  # the checkpoint's global step


def checkpoint_path(run_dir: str | Path, ckpt: str = "last") -> Path:
    """``<run>/checkpoints/<ckpt>.ckpt``, or ``ckpt`` itself when it is a .ckpt file."""
    if str(ckpt).endswith(".ckpt"):
        return Path(ckpt)
    return Path(run_dir) / "checkpoints" / f"{ckpt}.ckpt"


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint that is missing, truncated, corrupt or refused; the message names the file."""


def load_checkpoint(path: str | Path, fix: str, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, or one ``CheckpointError`` line
    naming the file, why it cannot be used and ``fix`` (torch's own message has no path, or
    runs to many lines). ``mmap=True`` reads only the file's index (a cheap check before
    anything starts; tensors are read when touched)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 -- whatever torch rejects, the file is unusable
        if "Weights only load failed" in str(err):
            why = "refused: it holds pickled objects other than tensors, which could run code"
        else:
            why = f"truncated or corrupt: {one_line(err, 120)}"
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({why}): {fix}") from err


def load_model(
    run_dir: str | Path,
    ckpt: str = "last",
    device: str = "cpu",
    overrides: Sequence[str] | dict = (),
    build: Callable[[DictConfig], Any] | None = None,
) -> LoadedRun:
    """The run's family with weights from ``checkpoints/<ckpt>.ckpt`` (``weights_only=True``,
    EMA included), in eval mode on ``device``; ``overrides`` (``["sampler.eta=1"]`` or a dict)
    are merged into the run's model config first. An override that switches the solver
    (``sampler._target_``) keeps the run's step count and drops the old solver's options."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: run_dir must be a genlab run directory")
    ckpt_path = checkpoint_path(run_dir, ckpt)
    fix = "choose another with ckpt=last|best|<file>.ckpt"
    state = load_checkpoint(ckpt_path, fix)
    cfg = OmegaConf.load(config_path)
    if overrides:
        extra = (
            OmegaConf.create(dict(overrides)) if isinstance(overrides, dict | DictConfig)
            else OmegaConf.from_dotlist(list(overrides))
        )  # fmt: skip
        sampler = cfg.model.get("sampler")
        switched = extra.get("sampler") or {}
        if (
            sampler is not None
            and "_target_" in switched
            and switched._target_ != sampler.get("_target_")
        ):  # another solver: keep the step count, not the old solver's own options
            kept = {k: sampler[k] for k in ("_partial_", "steps") if k in sampler}
            cfg.model.sampler = OmegaConf.create(kept)
        cfg.model = OmegaConf.merge(cfg.model, extra)
    if build is None:
        from hydra.utils import instantiate as build
    model = build(cfg.model)
    model.load_state_dict(state["state_dict"])
    return LoadedRun(model.to(device).eval(), cfg, state.get("global_step"))


# the columns a comparison leads with, in this order, where any run has them
HEADLINE = [
    "val/fid",
    "val/fd_digits",
    "val/fd_faces",
    "val/fd_dinov2",
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
LOWER_IS_BETTER = ("fid", "fd_", "kid", "cmmd", "bpd", "loss", "nfe")  # distances, costs


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


# ------------------------------------------------------------------ finding runs
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
