"""Plain vs cached PixelRNN sampling: images/s at batch 1 and batch 64 on 28x28x1 (MNIST
geometry), Row LSTM and Diagonal BiLSTM with the presets' sizes (conf/model/pixelrnn_*.yaml;
weights as initialised: the cost does not depend on them). The plain sampler runs the whole
network for every pixel; the cached one (genlab.nets.pixelrnn_cached) advances the recurrent
states a pixel at a time.

    python bench/pixelrnn_sampling.py [--models pixelrnn_row pixelrnn_diag] [--batches 1 64]
                                      [--pixels 56] [--threads N] [--no-full-cached]

A full plain grid at batch 64 takes too long, so both samplers are timed on the first
``--pixels`` pixels (default 56, the first 2 rows) of the module's own sampling loop (the
uniforms, draws and cache calls of ``AutoregressiveModule._sample_batch``) and extrapolated
to H * W pixels: every row costs the same in both samplers (the plain pass is over the whole
image whatever the row), so the extrapolation is fair when ``--pixels`` is a multiple of W;
the cached sampler's reset (the Diagonal BiLSTM's padding states) is timed apart and counted
once.
The output says so. Also timed, unless ``--no-full-cached``: a complete cached grid through
``module.sample`` (measured, not extrapolated). Prints images/s, the speed-up and whether both
samplers drew the same pixels for the same seed (float32), and writes
bench/results/pixelrnn_sampling.json (rows of models not run this time are kept).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from genlab.nets import rng
from genlab.nets.cached import cached_sampler
from genlab.utils import CONF_DIR


def build(model: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "data=mnist"])
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


@torch.no_grad()
def first_pixels(module, m: int, pixels: int, fast: bool) -> tuple[torch.Tensor, float, float]:
    """The first ``pixels`` pixels (raster order) of a batch of m, sampled as
    ``AutoregressiveModule._sample_batch`` does (unconditional preset: y None).
    -> (x (m, C, H, W) with the rest zero, seconds of the cache's reset, seconds of the
    pixels)."""
    c_dim, height, width = module.image_shape
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(m, *module.image_shape)
    u = rng.rand((m, height, width, c_dim), g)
    start = time.perf_counter()
    cache = cached_sampler(module.net) if fast else None
    if cache is not None:
        cache.reset(x, None)
    reset_end = time.perf_counter()
    for p in range(pixels):
        i, j = divmod(p, width)
        for c in range(c_dim):
            out = cache.step(x, i, j) if cache is not None else module._full(x, None, i, j)
            x[:, c, i, j] = module._draw(out, u[:, i, j], c, g)
        if cache is not None and j == width - 1:
            cache.end_row(x, i)
    return x, reset_end - start, time.perf_counter() - reset_end


def full_cached(module, m: int) -> float:
    module.sample_batch_size = m
    start = time.perf_counter()
    module.sample(m, generator=torch.Generator().manual_seed(0), fast=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["pixelrnn_row", "pixelrnn_diag"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--pixels", type=int, default=56, help="pixels timed (56: 2 rows)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-full-cached", action="store_true")
    parser.add_argument("--out", default="bench/results/pixelrnn_sampling.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        module = build(name)
        _, height, width = module.image_shape
        scale = height * width / args.pixels
        for fast in (True, False):  # warm-up
            first_pixels(module, 1, 1, fast)
        for b in args.batches:
            fast_x, reset_s, fast_s = first_pixels(module, b, args.pixels, True)
            plain_x, _, plain_s = first_pixels(module, b, args.pixels, False)
            plain_s, fast_s = plain_s * scale, reset_s + fast_s * scale  # the whole image
            row = {
                "model": name,
                "batch": b,
                "pixels_timed": args.pixels,
                "extrapolated_to": height * width,
                "plain_img_per_s": b / plain_s,
                "cached_img_per_s": b / fast_s,
                "cached_reset_s": reset_s,
                "speedup": plain_s / fast_s,
                "identical_images": int((fast_x == plain_x).flatten(1).all(1).sum()),
            }
            line = (
                f"{name:14s} batch {b:3d}: plain {row['plain_img_per_s']:9.4f} img/s  cached "
                f"{row['cached_img_per_s']:9.3f} img/s  x{row['speedup']:7.1f}  identical "
                f"{row['identical_images']}/{b}  (first {args.pixels} pixels, "
                f"extrapolated to {height * width})"
            )
            if not args.no_full_cached:
                row["cached_full_grid_img_per_s"] = b / full_cached(module, b)
                line += f"; full cached grid {row['cached_full_grid_img_per_s']:.3f} img/s"
            rows.append(row)
            print(line, flush=True)
    out = Path(args.out)
    if out.exists():  # keep the other models' rows from earlier runs
        done = {(r["model"], r["batch"]) for r in rows}
        earlier = json.loads(out.read_text())["results"]
        rows = [r for r in earlier if (r["model"], r["batch"]) not in done] + rows
    result = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "note": "images/s extrapolated from the first pixels_timed pixels to the full image",
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
