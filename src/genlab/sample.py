"""Sample from a finished (or running) run (a Hydra app; ``conf/sample.yaml``):

    python -m genlab.sample run_dir=<run> [n=64] [ckpt=last] [seed=0] [ema=true] [steps=50]
        [label=3] ['prompts=[a handwritten seven,the digit 2]'] [mean=true] [temperature=0.7]
        [device=auto]
        [out=<path without extension>]
        [guidance=<conf/guidance option> guidance.<key>=<value> ...] [+model.<key>=<value> ...]

Rebuilds the model from ``<run>/.hydra/config.yaml``, loads ``<run>/checkpoints/<ckpt>.ckpt``
(``weights_only=True``), and writes ``<out>.png`` (a grid) and ``<out>.pt`` (uint8 images
(n, C, H, W), labels, and the settings used).
Default ``out``: ``<run>/samples/sample_<ckpt>_s<seed>``. ``mean`` (VAEs): the decoder's mean
image (true) or pixels drawn from p(x | z) (false). ``temperature`` (hierarchical VAEs): the
prior std scale, a float or one per latent group, top first (0: the prior means).
``prompts`` (text-to-image runs, ``model=text_flow``): the images' captions, cycled over the n
images, one per grid column.
``guidance`` (default: the run's own) selects a ``conf/guidance`` option, e.g.
``guidance=cfg guidance.scale=3``.
``+model.<key>=<value>`` changes the run's model config before it is built, for settings that
do not touch the weights: ``+model.sampler.eta=1``, ``+model.sampler.steps=100``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from genlab.callbacks.samples import grid_layout, save_columns
from genlab.data.convert import save_grid, to_uint8
from genlab.families.contract import Generative, TextConditional
from genlab.families.hvae import HierarchicalVAEModule
from genlab.families.vae import VAEModule
from genlab.guidance import GuidanceError, build_guidance
from genlab.nets.rng import SampleSeeds
from genlab.runs import load_model
from genlab.utils import CONF_DIR, UsageError, compose, reported


def device_of(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; other names as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else str(name)


def run(cfg: DictConfig) -> dict:
    """Sample as ``cfg`` (a composed ``conf/sample.yaml``) says; returns the files and images."""
    model_overrides = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}
    try:
        model, run_cfg, step = load_model(
            cfg.run_dir, str(cfg.ckpt), device_of(cfg.device), model_overrides
        )
    except FileNotFoundError as err:
        raise UsageError(f"error: {err}") from None
    guidance_conf = cfg.guidance if "guidance" in cfg else run_cfg.get("guidance")
    try:
        model.set_guidance(build_guidance(guidance_conf))
    except GuidanceError as err:
        raise UsageError(str(err)) from None
    if not isinstance(model, Generative):
        raise UsageError(
            f"{type(model).__name__} in {cfg.run_dir} cannot sample on its own (it has no "
            "prior): train one with `python -m genlab model=vqvae_prior "
            f"model.vqvae_run={cfg.run_dir}` and sample that run"
        )
    n, seed = int(cfg.n), int(cfg.seed)
    y, nrow, columns = grid_layout(model, n)
    if cfg.label is not None:  # one class for all: no class columns (prompt ones stay)
        y = torch.full((n,), int(cfg.label), dtype=torch.long)
        nrow = nrow if columns else None
    opts = {"use_ema": bool(cfg.ema)}
    if cfg.get("prompts") is not None:  # text-to-image: one prompt per column, cycled
        if not isinstance(model, TextConditional):
            raise UsageError(
                f"prompts= is for text-to-image runs (model=text_flow); {type(model).__name__} "
                "is not one: steer it with guidance=clip 'guidance.prompts=[...]'"
            )
        opts["prompts"] = [str(p) for p in cfg.prompts]
        y, columns = None, opts["prompts"] if len(opts["prompts"]) <= 16 else None
        nrow = len(columns) if columns else None
    if cfg.steps is not None:
        opts["steps"] = int(cfg.steps)
    if cfg.mean is not None:  # VAEs: decoder mean (true) or pixels drawn (false)
        if not isinstance(model, (VAEModule, HierarchicalVAEModule)):
            raise UsageError(f"mean= is for VAEs; {type(model).__name__} has no decoder mean")
        opts["mean"] = bool(cfg.mean)
    if cfg.get("temperature") is not None:
        if not isinstance(model, HierarchicalVAEModule):
            raise UsageError(
                f"temperature= is for hierarchical VAEs (model=hvae); {type(model).__name__} "
                "has no prior temperature"
            )
        t = cfg.temperature
        opts["temperature"] = float(t) if isinstance(t, (int, float)) else [float(v) for v in t]
        groups = model.num_groups
        if isinstance(opts["temperature"], list) and len(opts["temperature"]) != groups:
            raise UsageError(
                f"temperature= lists {len(opts['temperature'])} values; this model has "
                f"{groups} latent groups: give one float or {groups} values, top first"
            )
    generator = SampleSeeds.for_indices(seed, range(n))  # the same images for any batch size
    images = model.sample(n, y=y, generator=generator, progress=True, **opts)
    ckpt = str(cfg.ckpt)
    out = Path(cfg.out or Path(cfg.run_dir) / "samples" / f"sample_{Path(ckpt).stem}_s{seed}")
    png = save_grid(images, out.with_suffix(".png"), nrow=nrow)
    if columns:
        save_columns(png, columns)
    info = {
        "n": n,
        "seed": seed,
        "ckpt": ckpt,
        "global_step": step,
        "labels": y,
        "use_ema": opts["use_ema"],
        "steps": opts.get("steps"),
        "mean": opts.get("mean"),
        "temperature": opts.get("temperature"),
        "guidance": None if model.guidance is None else model.guidance.protocol(),
        "prompts": opts.get("prompts"),
        "model_overrides": [f"{k}={v}" for k, v in _dotted(model_overrides)],
        "columns": columns,
    }
    torch.save({"images": to_uint8(images).cpu(), **info}, out.with_suffix(".pt"))
    print(f"wrote {png} and {out.with_suffix('.pt')}")
    return {"png": png, "pt": out.with_suffix(".pt"), "images": images}


def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def main(argv: list[str]) -> dict:
    """``python -m genlab.sample <argv>`` from Python (tests, notebooks)."""
    return run(compose("sample", argv))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
def cli(cfg: DictConfig) -> None:
    with reported():  # a user error: one line, exit status 1
        run(cfg)


if __name__ == "__main__":
    cli()
