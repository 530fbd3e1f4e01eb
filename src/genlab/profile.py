"""Defaults that fit the machine: ``profile=auto`` (the default) picks a CPU budget when no GPU
is present and the GPU trainer preset when one is, for whatever the command line leaves at its
default. On a CPU the full-size defaults mean 20,000 steps (hours) and then a 5,000-sample
evaluation through Inception; the CPU profile gives

- ``trainer.max_time=00:00:15:00`` (unless ``trainer.max_steps`` or ``trainer.max_time`` is
  given),
- the ``metrics=cpu`` protocol (unless a ``metrics`` option or key is given; per key),
- a first sample grid after 100 steps (``callbacks.sample_grid.every_n_steps=100``),

and the GPU profile the ``trainer=gpu`` preset (bf16 mixed precision). An ``experiment``
preset or a chosen ``trainer`` option brings its own budget and turns the profile off for
that part; ``profile=off`` keeps the full-size defaults everywhere, ``profile=cpu|gpu``
forces one. What was applied is one log line at start and ``profile`` in the saved config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from genlab.runs import save_config
from genlab.utils import CONF_DIR, ConfigError

log = logging.getLogger("genlab")

CPU_TIME = "00:00:15:00"
CPU_FIRST_GRID = 100
CHOICES = ("auto", "cpu", "gpu", "off")


def _preset(group: str, name: str) -> dict:
    """The keys a preset file sets itself (its ``defaults`` list left out)."""
    node = OmegaConf.load(CONF_DIR / group / f"{name}.yaml")
    return {k: v for k, v in OmegaConf.to_container(node).items() if k != "defaults"}


def apply(cfg: DictConfig, overrides: list[str], choices: dict) -> list[str]:
    """Applies the profile ``cfg.profile`` names to ``cfg`` in place where ``overrides`` (the
    command line) and ``choices`` (the config groups chosen) leave the defaults; returns the
    settings applied as ``key=value`` (empty: nothing changed). ``cfg.profile`` becomes the
    profile that applied (``cpu``, ``gpu`` or ``off``)."""
    profile = str(cfg.get("profile", "auto"))
    if profile not in CHOICES:
        raise ConfigError(f"profile={profile} is not one of {', '.join(CHOICES)}")
    if profile == "auto":
        profile = "gpu" if torch.cuda.is_available() else "cpu"
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    experiment = choices.get("experiment")
    applied: list[str] = []

    def put(key: str, value) -> None:
        if key in given:
            return
        OmegaConf.update(cfg, key, value, force_add=True)
        applied.append(f"{key}={value}")

    with open_dict(cfg):
        cfg.profile = profile
        if profile == "off" or experiment not in (None, "null"):
            cfg.profile = "off"
            return applied
        if profile == "cpu":
            if "trainer" not in given and not given & {"trainer.max_steps", "trainer.max_time"}:
                put("trainer.max_time", CPU_TIME)
            if "metrics" not in given and cfg.get("metrics") is not None:
                for key, value in _preset("metrics", "cpu").items():
                    if cfg.metrics.get(key) != value:
                        put(f"metrics.{key}", value)
            grid = (cfg.get("callbacks") or {}).get("sample_grid")
            if grid is not None and "callbacks" not in given:
                if grid.get("every_n_steps", 0) > CPU_FIRST_GRID:
                    put("callbacks.sample_grid.every_n_steps", CPU_FIRST_GRID)
        elif "trainer" not in given:
            for key, value in _preset("trainer", "gpu").items():
                if cfg.trainer.get(key) != value:
                    put(f"trainer.{key}", value)
    return applied


def describe(profile: str, applied: list[str]) -> str:
    """The one line logged at start (a forced profile says so: not what the machine has)."""
    where = "a GPU found" if torch.cuda.is_available() else "no GPU found"
    return (
        f"{where}: profile={profile} sets {' '.join(applied)} (overrides win; profile=off "
        "for the full-size defaults)"
    )


def machine_defaults(cfg: DictConfig, overrides: list[str], choices: dict) -> list[str]:
    """``apply`` for a run about to start (``python -m genlab``): one line says what changed,
    and the run's saved config (``.hydra/config.yaml``, what sample, evaluate and a resume
    read) holds it."""
    applied = apply(cfg, overrides, choices)
    if applied:
        log.info(describe(cfg.profile, applied))
        if (Path(cfg.paths.output_dir) / ".hydra").is_dir():  # Hydra wrote it before the change
            save_config(cfg, cfg.paths.output_dir)
    return applied
