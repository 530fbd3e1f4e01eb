"""Evaluate a finished run, or images made by any tool, with genlab's evaluation protocol.

    python -m genlab.evaluate run_dir=<run> [n=5000] [metrics=[fid,kid,is,pr,bpd,cost]]
                              [ckpt=last] [steps=N] [device=auto] [<evaluator key>=value ...]
    python -m genlab.evaluate images=<folder|.npz|.pt> data=<preset> [n=N]
                              [metrics=[fid,kid,is,pr]] [paths.data_dir=<dir>] [data.<key>=...]
                              [out=<file.json>] [<evaluator key>=value ...]

A run is evaluated with its own ``metrics`` config (``conf/metrics/default.yaml`` for runs that
have none) and the overrides given; the result and its protocol are appended to the run's
``summary.json`` under ``evaluations``. Images are uint8 (N, C, H, W) or (N, H, W, C): a
folder of image files, an ``.npz`` (the first array, e.g. ``arr_0`` as written by the ADM /
guided-diffusion samplers) or a ``.pt`` (a tensor, or a dict with ``images`` as written by
``python -m genlab.sample``). Evaluator keys: see ``genlab.metrics.Evaluator`` (for example
``extractors=[digits]``, ``reference_samples=null``, ``inception_weights=<file>``).
Missing weights stop the command with one line saying which file and how to provide it.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from genlab.data import readers
from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.evaluator import Evaluator
from genlab.utils import CONF_DIR, read_summary, write_summary

RESERVED = {"run_dir", "images", "data", "paths", "n", "ckpt", "steps", "device", "out"}
USAGE = (
    "usage: python -m genlab.evaluate run_dir=<run> [n=N] [metrics=[fid,kid,is,pr,bpd]] ...\n"
    "   or: python -m genlab.evaluate images=<folder|.npz|.pt> data=<preset> [n=N] ..."
)


class UsageError(SystemExit):
    pass


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
def _evaluator_overrides(args: DictConfig) -> dict:
    params = set(inspect.signature(Evaluator).parameters)
    extra = {k: v for k, v in args.items() if k not in RESERVED}
    unknown = sorted(set(extra) - params)
    if unknown:
        raise UsageError(
            f"unknown option(s) {unknown}; evaluator options: {sorted(params)}\n{USAGE}"
        )
    out = OmegaConf.to_container(OmegaConf.create(extra), resolve=True)
    if "n" in args:
        out["num_samples"] = int(args.n)
    return out


def _metrics_cfg(cfg: DictConfig) -> DictConfig:
    """The run's metrics config, or the default preset resolved against the run's config."""
    if cfg.get("metrics") and "_target_" in cfg.metrics:
        return cfg.metrics
    merged = OmegaConf.merge(
        cfg, {"metrics": OmegaConf.load(CONF_DIR / "metrics" / "default.yaml")}
    )
    return merged.metrics


def _compose_data(preset: str, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"data={preset}", *overrides])


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _print(result: dict) -> None:
    for key, value in result["metrics"].items():
        print(f"{key:28s} {value:.6g}")
    missing = result["protocol"].get("not_computed") or {}
    for key, reason in missing.items():
        print(f"{'(not computed) ' + key:28s} {reason}")


# ------------------------------------------------------------------ the two modes
def evaluate_run(args: DictConfig) -> dict:
    from genlab.sample import load_model

    run_dir = Path(args.run_dir)
    ckpt = str(args.get("ckpt", "last"))
    device = _device(str(args.get("device", "auto")))
    model, cfg, step = load_model(run_dir, ckpt, device)
    if args.get("steps") is not None and isinstance(getattr(model, "sampler", None), partial):
        model.sampler = partial(
            model.sampler.func, **{**model.sampler.keywords, "steps": int(args.steps)}
        )
    evaluator = Evaluator.from_config(
        _metrics_cfg(cfg), on_missing_weights="raise", **_evaluator_overrides(args)
    )
    datamodule = instantiate(cfg.data)
    result = evaluator.evaluate_model(model, datamodule)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ckpt": ckpt, "step": step, **result}
    summary = read_summary(run_dir)
    write_summary(run_dir, {"evaluations": [*summary.get("evaluations", []), record]})
    return record


def evaluate_images(args: DictConfig) -> dict:
    if "data" not in args or not isinstance(args.data, str):
        raise UsageError(f"images=... needs data=<preset> (one of conf/data/*.yaml)\n{USAGE}")
    overrides = [f"data.{k}={v}" for k, v in (args.get("data_overrides") or {}).items()]
    overrides += [f"{k}={v}" for k, v in _dotted(args, "paths")]
    cfg = _compose_data(args.data, overrides)
    images = load_images(args.images)
    if "n" in args:
        images = images[: int(args.n)]
    evaluator = Evaluator.from_config(
        cfg.metrics, on_missing_weights="raise", **_evaluator_overrides(args)
    )
    evaluator.metrics = [m for m in evaluator.metrics if m not in ("bpd", "cost")]
    datamodule = instantiate(cfg.data)
    result = evaluator.evaluate_images(images, datamodule, _device(str(args.get("device", "auto"))))
    result["images"] = {"source": str(args.images), "shape": list(images.shape)}
    return result


def _dotted(args: DictConfig, prefix: str) -> list[tuple[str, object]]:
    node = args.get(prefix)
    if not isinstance(node, DictConfig):
        return []
    return [(f"{prefix}.{k}", v) for k, v in node.items()]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    # metrics.<key>=... (as in training configs) is the same as <key>=...
    argv = [a[len("metrics.") :] if a.startswith("metrics.") else a for a in argv]
    data_overrides = {
        a.split("=", 1)[0][5:]: a.split("=", 1)[1] for a in argv if a.startswith("data.")
    }
    args = OmegaConf.from_dotlist([a for a in argv if not a.startswith("data.")])
    if data_overrides:
        args.data_overrides = data_overrides
        RESERVED.add("data_overrides")
    if ("run_dir" in args) == ("images" in args):
        raise UsageError(USAGE)
    try:
        result = evaluate_run(args) if "run_dir" in args else evaluate_images(args)
    except (
        WeightsNotFoundError,
        readers.DatasetNotFoundError,
        FileNotFoundError,
        ValueError,
    ) as err:
        raise UsageError(f"error: {err}") from None
    _print(result)
    if args.get("out"):
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    elif "run_dir" in args:
        print(f"appended to {Path(args.run_dir) / 'summary.json'} (evaluations)")
    return result


if __name__ == "__main__":
    main()
