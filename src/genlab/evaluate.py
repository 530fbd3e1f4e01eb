"""Evaluate a finished run, or images made by any tool, with genlab's evaluation protocol
(a Hydra app; ``conf/evaluate.yaml``).

    python -m genlab.evaluate run_dir=<run> [n=5000] [ckpt=last] [steps=N] [device=auto]
                              [metrics=<preset>] [metrics.<key>=<value> | +metrics.<key>=<value>]
                              [nfe=[2,4,8,16,32]] [+model.<key>=<value> ...]
    python -m genlab.evaluate images=<folder|.npz|.pt> data=<preset> [n=N] [metrics=<preset>]
                              [paths.data_dir=<dir>] [data.<key>=...] [out=<file.json>]

A run is evaluated with its own ``metrics`` config (``conf/metrics/default.yaml`` for runs that
have none, and for images), or the preset chosen with ``metrics=<preset>``; what ``metrics``
holds after composition is merged over it (``+metrics.extractors=[digits]`` changes one
setting of the run's own). The result and its protocol are appended to the run's
``summary.json`` under ``evaluations``. Images are uint8 (N, C, H, W) or (N, H, W, C): a
folder of image files, an ``.npz`` (the first array, e.g. ``arr_0`` as written by the ADM /
guided-diffusion samplers) or a ``.pt`` (a tensor, or a dict with ``images`` as written by
``python -m genlab.sample``). Metrics keys: see ``genlab.metrics.Evaluator`` (for example
``metrics.extractors=[digits]``, ``metrics.reference_samples=null``,
``metrics.inception_weights=<file>``).
Missing weights stop the command with one line saying which file and how to provide it.

``nfe=[2,4,8,16,32]`` (denoising models) evaluates once per number of network evaluations,
with the steps ``genlab.diffusion.samplers.steps_for_nfe`` gives the run's sampler, or the one
chosen with ``+model.sampler._target_=genlab.diffusion.samplers.<solver>`` (which keeps the
run's step count and drops the old solver's options: ``genlab.runs.load_model``). It writes
the table ``<run>/nfe.csv`` (one row per solver, spacing, sampler options, requested NFE, checkpoint
and metrics settings; the NFE counted on the network beside the one asked for; rows of other
solvers and settings are kept, a repeated point replaces its row) and its plot
``<run>/nfe.png`` (each quality metric against the counted NFE, one line per solver and
spacing). Bits/dim does not depend on the sampler and is left out of the sweep.
``+model.<key>=<value>`` changes the run's model config before it is built (settings that do
not touch the weights), as for ``python -m genlab.sample``.
"""

from __future__ import annotations

import inspect
import json
import time
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from tqdm.auto import tqdm

from genlab import nfe as nfe_table
from genlab.data import readers
from genlab.diffusion.samplers import steps_for_nfe
from genlab.evaluation import evaluate_model
from genlab.families.autoregressive import AutoregressiveModule
from genlab.families.contract import Denoising
from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.evaluator import Evaluator
from genlab.runs import load_model, read_summary, write_summary
from genlab.sample import device_of
from genlab.utils import CONF_DIR, UsageError, compose, reported

USAGE = (
    "usage: python -m genlab.evaluate run_dir=<run> [n=N] [metrics=<preset>] ...\n"
    "   or: python -m genlab.evaluate images=<folder|.npz|.pt> data=<preset> [n=N] ..."
)
# keys of a metrics config that configure the callback, not the evaluation
CALLBACK_KEYS = {"_target_", "every_n_steps", "at_end"}


# ------------------------------------------------------------------ reading images
def _to_nchw_uint8(array, source: str) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(array))
    if images.dtype != torch.uint8:
        raise ValueError(
            f"{source}: expected uint8 images (0..255), got {images.dtype}; convert them first "
            f"(genlab.data.convert.to_uint8 maps [-1, 1] floats to uint8)"
        )
    if images.dim() == 3:  # (N, H, W) grey
        images = images[:, None]
    if images.dim() != 4:
        raise ValueError(
            f"{source}: expected (N, C, H, W) or (N, H, W, C), got {tuple(images.shape)}"
        )
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"{source}: images must have 1 or 3 channels, got {tuple(images.shape)}")
    return images.contiguous()


def load_images(path: str | Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from a folder of images, an .npz or a .pt file."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = readers.list_images(path)
        if not files:
            raise FileNotFoundError(f"no images in {path} (looked for {readers.IMAGE_EXTENSIONS})")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB" if im.mode != "L" else "L")))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"{path}: images differ in size/mode {sorted(shapes)[:3]}; make them equal"
            )
        return _to_nchw_uint8(np.stack(arrays), str(path))
    if not path.is_file():
        raise FileNotFoundError(f"images not found: {path} (a folder, .npz or .pt file)")
    if path.suffix == ".npz":
        with np.load(path) as blob:
            key = "images" if "images" in blob.files else blob.files[0]
            return _to_nchw_uint8(blob[key], f"{path}[{key}]")
    if path.suffix == ".pt":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return _to_nchw_uint8(blob["images"] if isinstance(blob, dict) else blob, str(path))
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use a folder, .npz or .pt)")


# ------------------------------------------------------------------ configs
def metrics_config(cfg: DictConfig, base: DictConfig | None, context: DictConfig) -> dict:
    """The evaluator's settings: ``cfg.metrics`` (what was composed: a preset, single keys,
    or nothing) merged over ``base`` (the run's own metrics config, or the default preset),
    resolved against ``context`` (the run's config, or this command's)."""
    if base is None or "_target_" not in base:
        base = OmegaConf.load(CONF_DIR / "metrics" / "default.yaml")
    context = OmegaConf.create(OmegaConf.to_container(context))  # not struct: metrics is new
    merged = OmegaConf.merge(context, {"metrics": base}, {"metrics": cfg.get("metrics") or {}})
    settings = OmegaConf.to_container(merged.metrics, resolve=True)
    allowed = set(inspect.signature(Evaluator).parameters) | CALLBACK_KEYS
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise UsageError(
            f"error: unknown metrics setting(s) {unknown}; one of {sorted(allowed - CALLBACK_KEYS)}"
        )
    if cfg.get("n") is not None:
        settings["num_samples"] = int(cfg.n)
    return {k: v for k, v in settings.items() if k not in CALLBACK_KEYS}


def _print(result: dict) -> None:
    for key, value in result["metrics"].items():
        print(f"{key:28s} {value:.6g}")
    missing = result["protocol"].get("not_computed") or {}
    for key, reason in missing.items():
        print(f"{'(not computed) ' + key:28s} {reason}")


# ------------------------------------------------------------------ the model
def with_steps(sampler, steps: int):
    """The sampler partial with ``steps`` set."""
    return partial(sampler.func, **{**sampler.keywords, "steps": int(steps)})


def load_run_model(cfg: DictConfig):
    """(model, run config, step) of ``cfg.run_dir`` with the ``+model.`` changes."""
    overrides = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") else {}
    try:
        return load_model(cfg.run_dir, str(cfg.ckpt), device_of(cfg.device), overrides)
    except InstantiationException as err:  # e.g. a solver given an option it does not take
        raise UsageError(f"error: {err.__cause__ or ' '.join(str(err).split())}") from None


# ------------------------------------------------------------------ quality against NFE
def nfe_values(value) -> list[int]:
    """``nfe=`` (a list, or one number) as sorted distinct positive integers; [] for null."""
    if value is None:
        return []
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, list) else [value]
    try:
        ok = values and all(float(v) == int(v) >= 1 for v in values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(
            f"error: nfe= takes positive integers, e.g. nfe=[2,4,8,16,32]; got {value}"
        )
    return sorted({int(v) for v in values})


def solver_of(model, sampler_protocol: dict) -> tuple[str, str, str]:
    """(solver name, spacing, the sampler settings that differ from the solver's defaults as
    ``key=value`` text, e.g. ``eta=1.0``; "" for none)."""
    func = model.sampler
    while isinstance(func, partial):
        func = func.func
    params = inspect.signature(func).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not p.empty}
    spacing = sampler_protocol.get("spacing", defaults.get("spacing", ""))
    skip = {"name", "steps", "spacing", "spacing_chosen_by", *model.frame.describe()}
    options = [
        f"{k}={json.dumps(v, sort_keys=True) if isinstance(v, dict) else v}"
        for k, v in sorted(sampler_protocol.items())
        if k not in skip and (k not in defaults or defaults[k] != v)
    ]
    return str(sampler_protocol.get("name", "")), str(spacing), " ".join(options)


def nfe_sweep(cfg, model, evaluator, datamodule, settings: dict, step) -> dict:
    """Evaluate ``model`` at each ``cfg.nfe``; merge the rows into ``<run>/nfe.csv`` and plot
    the table to ``<run>/nfe.png``."""
    run_dir, sampler, rows = Path(cfg.run_dir), model.sampler, []
    bar = tqdm(nfe_values(cfg.nfe), desc="nfe sweep", disable=not evaluator.progress)
    for nfe in bar:
        steps = steps_for_nfe(sampler, nfe)
        bar.set_postfix(nfe=nfe, steps=steps)
        model.sampler = with_steps(sampler, steps)
        start = time.perf_counter()
        metrics, protocol = evaluate_model(evaluator, model, datamodule)
        solver, spacing, options = solver_of(model, protocol["sampler"])
        counted = metrics.pop("val/sample_nfe", None)
        counted = int(counted) if counted is not None and counted == int(counted) else counted
        rows.append({
            "solver": solver, "spacing": spacing, "options": options, "nfe_requested": nfe,
            "steps": steps, "nfe": counted, "ckpt": str(cfg.ckpt), "step": step,
            "weights": protocol["weights"], "settings": nfe_table.settings_id(settings),
            "num_samples": evaluator.num_samples, "seed": evaluator.seed,
            "time_s": round(time.perf_counter() - start, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **metrics,
        })  # fmt: skip
    model.sampler = sampler
    table = nfe_table.write_table(run_dir / nfe_table.TABLE, rows)
    plot = nfe_table.plot(table, run_dir / nfe_table.PLOT)
    return {"nfe": rows, "table": str(run_dir / nfe_table.TABLE), "plot": str(plot)}


def _print_sweep(result: dict) -> None:
    for row in result["nfe"]:
        head = f"{row['solver']} ({row['spacing']}) nfe {row['nfe']} (asked {row['nfe_requested']})"
        values = "  ".join(f"{k} {v:.6g}" for k, v in row.items() if k.startswith("val/"))
        print(f"{head:36s} {values}")
    print(f"wrote {result['table']} and {result['plot']}")


# ------------------------------------------------------------------ the two modes
def evaluate_run(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    ckpt = str(cfg.ckpt)
    nfes = nfe_values(cfg.get("nfe"))
    if nfes and cfg.steps is not None:
        raise UsageError("error: steps= or nfe=[...], not both (nfe= sets the steps)")
    model, run_cfg, step = load_run_model(cfg)
    if nfes and not isinstance(model, Denoising):
        how = "pixel by pixel" if isinstance(model, AutoregressiveModule) else "in one pass"
        raise UsageError(
            f"error: nfe=[{','.join(map(str, nfes))}] needs a denoising model (diffusion, EDM, "
            f"flow); {model.family} samples {how}"
        )
    if cfg.steps is not None:
        if not isinstance(model, Denoising):
            raise UsageError(f"steps= is for diffusion models; {type(model).__name__} has none")
        model.sampler = with_steps(model.sampler, cfg.steps)
    settings = metrics_config(cfg, run_cfg.get("metrics"), run_cfg)
    if nfes:  # the counted NFE is a cost metric; bits/dim does not depend on the sampler
        chosen = settings.get("metrics", inspect.signature(Evaluator).parameters["metrics"].default)
        settings["metrics"] = [*(m for m in chosen if m not in ("bpd", "cost")), "cost"]
    evaluator = Evaluator(**settings, on_missing_weights="raise")
    datamodule = instantiate(run_cfg.data)
    if nfes:
        return nfe_sweep(cfg, model, evaluator, datamodule, settings, step)
    start = time.perf_counter()
    metrics, protocol = evaluate_model(evaluator, model, datamodule)
    result = {"metrics": metrics, "protocol": protocol, "time_s": time.perf_counter() - start}
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ckpt": ckpt, "step": step, **result}
    summary = read_summary(run_dir)
    write_summary(run_dir, {"evaluations": [*summary.get("evaluations", []), record]})
    return record


def evaluate_images(cfg: DictConfig) -> dict:
    if cfg.get("data") is None:
        raise UsageError(f"images=... needs data=<preset> (one of conf/data/*.yaml)\n{USAGE}")
    if cfg.get("nfe") is not None:
        raise UsageError(
            "error: nfe=[...] evaluates a run's model: give run_dir=<run>, not images="
        )
    images = load_images(cfg.images)
    if cfg.n is not None:
        images = images[: int(cfg.n)]
    settings = metrics_config(cfg, None, cfg)
    settings["metrics"] = [m for m in settings.get("metrics", []) if m not in ("bpd", "cost")]
    evaluator = Evaluator(**settings, on_missing_weights="raise")
    datamodule = instantiate(cfg.data)
    result = evaluator.evaluate_images(images, datamodule, device_of(cfg.device))
    result["images"] = {"source": str(cfg.images), "shape": list(images.shape)}
    return result


def run(cfg: DictConfig) -> dict:
    """Evaluate as ``cfg`` (a composed ``conf/evaluate.yaml``) says; print and return it."""
    if (cfg.run_dir is None) == (cfg.images is None):
        raise UsageError(USAGE)
    with open_dict(cfg):
        cfg.seed = cfg.get("seed", 0)
    try:
        result = evaluate_run(cfg) if cfg.run_dir is not None else evaluate_images(cfg)
    except (WeightsNotFoundError, readers.DatasetNotFoundError, FileNotFoundError,
            ValueError) as err:  # fmt: skip
        raise UsageError(f"error: {err}") from None
    if "nfe" in result:
        _print_sweep(result)
    else:
        _print(result)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {cfg.out}")
    elif cfg.run_dir is not None and "nfe" not in result:
        print(f"appended to {Path(cfg.run_dir) / 'summary.json'} (evaluations)")
    return result


def main(argv: list[str]) -> dict:
    """``python -m genlab.evaluate <argv>`` from Python (tests, notebooks)."""
    return run(compose("evaluate", argv))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def cli(cfg: DictConfig) -> None:
    with reported():  # a user error: one line, exit status 1
        run(cfg)


if __name__ == "__main__":
    cli()
