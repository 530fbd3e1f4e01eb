"""Sample from a finished (or running) run:

    python -m genlab.sample run_dir=<run> [n=64] [ckpt=last] [seed=0] [ema=true] [steps=50]
                            [label=3] [mean=true] [device=auto] [out=<path without extension>]
                            [guidance=<conf/guidance option> guidance.<key>=<value> ...]
                            [model.<key>=<value> ...]

Rebuilds the model from ``<run>/.hydra/config.yaml``, loads ``<run>/checkpoints/<ckpt>.ckpt``
(``weights_only=True``), and writes ``<out>.png`` (a grid) and ``<out>.pt`` (uint8 images
(n, C, H, W), labels, and the settings used).
Default ``out``: ``<run>/samples/sample_<ckpt>_s<seed>``. ``mean`` (VAEs): the decoder's mean
image (true, default) or pixels drawn from p(x | z) (false). ``guidance`` (default: the run's
own) picks a ``conf/guidance`` option, e.g. ``guidance=cfg guidance.scale=3``.
``model.<key>=<value>`` changes the run's model config before it is built, for settings that
do not touch the weights: ``model.sampler.eta=1``, ``model.sampler.steps=100``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genlab.callbacks.samples import grid_layout, save_columns
from genlab.data.convert import save_grid, to_uint8
from genlab.guidance import GuidanceError, attach, build_guidance
from genlab.metrics.protocol import accepts
from genlab.utils import CONF_DIR


class UsageError(SystemExit):
    pass


def load_model(
    run_dir: str | Path, ckpt: str = "last", device: str = "cpu", overrides: list[str] = ()
):
    """The run's family with weights from ``checkpoints/<ckpt>.ckpt``, in eval mode;
    ``overrides`` (``sampler.eta=1``, ...) are merged into the run's model config first."""
    run_dir = Path(run_dir)
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: run_dir must be a genlab run directory")
    ckpt_path = Path(ckpt) if ckpt.endswith(".ckpt") else run_dir / "checkpoints" / f"{ckpt}.ckpt"
    if not ckpt_path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found (ckpt=last|best|<file>.ckpt)")
    cfg = OmegaConf.load(config_path)
    if overrides:
        cfg.model = OmegaConf.merge(cfg.model, OmegaConf.from_dotlist(list(overrides)))
    model = instantiate(cfg.model)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval(), cfg, state.get("global_step")


def guidance_config(argv: list[str]) -> tuple[list[str], object]:
    """Split ``guidance=<option>`` and ``guidance.<key>=<value>`` off the arguments; returns
    the other arguments and the chosen guidance config (None: none was given)."""
    rest, choice, overrides = [], None, []
    for arg in argv:
        if arg.startswith("guidance="):
            choice = arg.split("=", 1)[1]
        elif arg.startswith("guidance."):
            overrides.append(arg.removeprefix("guidance."))
        else:
            rest.append(arg)
    conf = None
    if choice is not None:
        path = CONF_DIR / "guidance" / f"{choice}.yaml"
        if not path.exists():
            options = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise UsageError(f"guidance={choice} is not an option: one of {', '.join(options)}")
        conf = OmegaConf.load(path)
    if overrides:
        if conf is None or "_target_" not in conf:
            raise UsageError(
                f"{overrides[0]!r} given without guidance=<option> (e.g. guidance=cfg)"
            )
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(overrides))
    return rest, conf


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, guidance_conf = guidance_config(argv)
    model_overrides = [a.removeprefix("model.") for a in argv if a.startswith("model.")]
    args = OmegaConf.from_dotlist([a for a in argv if not a.startswith("model.")])
    if "run_dir" not in args:
        raise UsageError(
            "usage: python -m genlab.sample run_dir=<run> [n=64] [ckpt=last] [seed=0] "
            "[ema=true] [steps=N] [label=K] [mean=true] [device=auto] [out=<path>] "
            "[guidance=cfg guidance.scale=S] [model.sampler.eta=1]"
        )
    device = args.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt = str(args.get("ckpt", "last"))
    model, cfg, step = load_model(args.run_dir, ckpt, device, model_overrides)
    if guidance_conf is None:
        guidance_conf = cfg.get("guidance")  # the run's own
    try:
        guidance = build_guidance(guidance_conf)
        if guidance is not None:
            attach(model, guidance)
    except GuidanceError as err:
        raise UsageError(str(err)) from None
    if not getattr(model, "can_sample", True):
        raise UsageError(
            f"{type(model).__name__} in {args.run_dir} cannot sample on its own (it has no "
            "prior): train one with `python -m genlab model=vqvae_prior "
            f"model.vqvae_run={args.run_dir}` and sample that run"
        )
    n, seed = int(args.get("n", 64)), int(args.get("seed", 0))
    y, nrow, columns = grid_layout(model, n)
    if args.get("label") is not None:  # one class for all: no class columns (prompt ones stay)
        y = torch.full((n,), int(args.label), dtype=torch.long)
        nrow = nrow if columns else None
    opts = {}
    if args.get("steps") is not None:
        opts["steps"] = int(args.steps)
    if args.get("ema") is not None:
        opts["use_ema"] = bool(args.ema)
    if args.get("mean") is not None:  # VAEs: decoder mean (true) or pixels drawn (false)
        if not accepts(model.sample, "mean"):
            raise UsageError(f"mean= is for VAEs; {type(model).__name__} has no decoder mean")
        opts["mean"] = bool(args.mean)
    generator = torch.Generator().manual_seed(seed)
    images = model.sample(n, y=y, generator=generator, progress=True, **opts)
    out = Path(
        args.get("out") or Path(args.run_dir) / "samples" / f"sample_{Path(ckpt).stem}_s{seed}"
    )
    png = save_grid(images, out.with_suffix(".png"), nrow=nrow)
    if columns:
        save_columns(png, columns)
    info = {
        "n": n,
        "seed": seed,
        "ckpt": ckpt,
        "global_step": step,
        "labels": y,
        "use_ema": opts.get("use_ema", True),
        "steps": opts.get("steps"),
        "mean": opts.get("mean"),
        "guidance": None if guidance is None else guidance.protocol(),
        "model_overrides": model_overrides,
        "columns": columns,
    }
    torch.save({"images": to_uint8(images).cpu(), **info}, out.with_suffix(".pt"))
    print(f"wrote {png} and {out.with_suffix('.pt')}")
    return {"png": png, "pt": out.with_suffix(".pt"), "images": images}


if __name__ == "__main__":
    main()
