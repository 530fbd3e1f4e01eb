"""Evaluate a finished run, or images made by any tool, with genlab's evaluation protocol
(a Hydra app; ``conf/evaluate.yaml``).

    python -m genlab.evaluate run_dir=<run> [n=5000] [ckpt=last] [steps=N] [device=auto]
                              [metrics=<preset>] [metrics.<key>=<value> | +metrics.<key>=<value>]
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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from genlab.data import readers
from genlab.evaluation import evaluate_model
from genlab.families.contract import Denoising
from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.evaluator import Evaluator
from genlab.runs import load_model, read_summary, write_summary
from genlab.sample import device_of
from genlab.utils import CONF_DIR, UsageError, compose

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


# ------------------------------------------------------------------ the two modes
def evaluate_run(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    ckpt = str(cfg.ckpt)
    model, run_cfg, step = load_model(run_dir, ckpt, device_of(cfg.device))
    if cfg.steps is not None:
        if not isinstance(model, Denoising):
            raise UsageError(f"steps= is for diffusion models; {type(model).__name__} has none")
        sampler = model.sampler
        model.sampler = partial(sampler.func, **{**sampler.keywords, "steps": int(cfg.steps)})
    settings = metrics_config(cfg, run_cfg.get("metrics"), run_cfg)
    evaluator = Evaluator(**settings, on_missing_weights="raise")
    datamodule = instantiate(run_cfg.data)
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
    _print(result)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {cfg.out}")
    elif cfg.run_dir is not None:
        print(f"appended to {Path(cfg.run_dir) / 'summary.json'} (evaluations)")
    return result


def main(argv: list[str]) -> dict:
    """``python -m genlab.evaluate <argv>`` from Python (tests, notebooks)."""
    return run(compose("evaluate", argv))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def cli(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    cli()
