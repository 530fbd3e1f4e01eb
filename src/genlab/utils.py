"""Run-directory helpers shared by the entry points: config location, summary.json, W&B mode."""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path
from typing import Any


def _conf_dir() -> Path:
    """The Hydra config tree: $GENLAB_CONF_DIR if set, else the genlab/conf/ an installed wheel
    ships (setup.py copies it there at build time), else the checkout's top-level conf/ (a
    source tree or an editable install, which reads conf/ live)."""
    if os.environ.get("GENLAB_CONF_DIR"):
        return Path(os.environ["GENLAB_CONF_DIR"]).expanduser().resolve()
    package = Path(__file__).resolve().parent
    if (package / "conf" / "config.yaml").is_file():
        return package / "conf"
    return package.parents[1] / "conf"


CONF_DIR = _conf_dir()


def wandb_mode(requested: str | None) -> str:
    """``auto`` -> ``online`` when the user is logged in to W&B (WANDB_API_KEY or ~/.netrc),
    else ``offline``; any other value is passed through."""
    if requested not in (None, "auto"):
        return str(requested)
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def sweep_dir() -> Path | None:
    """The sweep directory when running as a job of a Hydra multirun (-m), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        return None
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:
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
    data.update(_jsonable(summary))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
