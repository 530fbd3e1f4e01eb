"""Shared fixtures: compose the real Hydra config (conf/) with tiny overrides."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from genlab.utils import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "assets"

# The evaluation protocol at its smallest: 16 samples, digit features, 8 images for bits/dim.
TINY_METRICS = [
    "metrics=cpu",
    "metrics.every_n_steps=0",
    "metrics.num_samples=16",
    "metrics.sample_batch_size=8",
    "metrics.reference_samples=32",
    "metrics.digit_datasets=[synthetic]",
    "metrics.bpd_images=8",
]

# A few batches of the smallest sensible run: synthetic 16x16 data, CPU, no external logger.
TINY = [
    "data=synthetic",
    "logger=none",
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "callbacks.sample_grid.every_n_steps=2",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    *TINY_METRICS,
]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def required_keys(model: str) -> list[str]:
    """The keys a model preset leaves required (``???``): values no default can give."""
    node = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
    return [k for k in node if OmegaConf.is_missing(node, k)]


def standalone_presets() -> list[str]:
    """The model presets that train from their YAML alone (no required keys)."""
    return [m for m in group_options("model") if not required_keys(m)]


# How a test fills a required model key: the preset whose finished (tiny) run it names. A
# preset with a required key that is not here fails test_every_model_preset_trains_and_samples.
STAGE_ONE = {
    "vqvae_run": "model=vqvae",
    "autoencoder_run": "model=autoencoder",
    "teacher_run": "model=edm",
}


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The config `python -m genlab <overrides>` would run, with the run dir at output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} resolve as under the CLI
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra: str) -> DictConfig:
        cfg = compose_cfg(
            [*TINY, f"paths.cache_dir={tmp_path / 'cache'}", *extra], tmp_path / "run"
        )
        if "steps" in (cfg.model.get("sampler") or {}):  # fewer sampling steps for grids
            cfg.model.sampler.steps = 5
        if "bpd_timesteps" in cfg.model:  # diffusion: a 4-timestep bits/dim estimate
            cfg.model.bpd_timesteps = 4
        if "ode_steps" in cfg.model:  # EDM, flow: a 4-step probability-flow ODE bits/dim
            cfg.model.ode_steps = 4
        if cfg.model._target_.endswith("AutoregressiveModule"):  # pixel by pixel: 8x8 images
            cfg.data.image_size = 8
        return cfg

    return make


def logged(run_dir: Path, key: str) -> list[str]:
    """The values of one metric in <run>/metrics.csv, as written (strings), in step order."""
    rows = list(csv.DictReader(open(Path(run_dir) / "metrics.csv")))
    return [row[key] for row in rows if row.get(key)]


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict | None = None,
    timeout: int = 600,
    module: str = "genlab",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` in a subprocess (no network: W&B offline)."""
    full_env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
            f"STDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


# Runs command jobs in one process that imports genlab once and forks a child per job; each
# child runs its module with runpy exactly as `python -m` does, with its own stdout, stderr,
# exit code and environment changes.
RUNNER = r"""
import importlib, json, os, runpy, signal, sys, traceback, warnings
warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
jobs, logs, out = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
for module in sorted({job[0] for job in jobs}):
    importlib.import_module(module + ".__main__" if module == "genlab" else module)
codes = []
for i, (module, args, *env) in enumerate(jobs):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.environ.update(env[0] if env else {})
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{logs}/{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        signal.alarm(120)
        sys.argv, code = [module, *args], 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
json.dump(codes, open(out, "w"))
"""


def run_cli_jobs(
    jobs: list, work: Path, cwd: Path | str, env: dict | None = None, timeout: int = 900
) -> list[dict]:
    """``python -m <module> <args>`` for each job ``(module, args)`` or ``(module, args, env)``
    (W&B offline), forked from one process: ``[{"rc", "out", "err"}]`` in job order."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps([list(job) for job in jobs]))
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    subprocess.run(
        [sys.executable, "-c", RUNNER, str(work / "jobs.json"), str(work), str(work / "rc")],
        cwd=cwd,
        env=full_env,
        check=True,
        timeout=timeout,
    )
    codes = json.loads((work / "rc").read_text())
    return [
        {"rc": rc, "out": (work / f"{i}.out").read_text(), "err": (work / f"{i}.err").read_text()}
        for i, rc in enumerate(codes)
    ]
