"""Cached vs plain autoregressive sampling: images/s at batch 1 and batch 64 on 28x28 MNIST
geometry, with the presets' networks (weights as initialised: the cost does not depend on
them). The plain sampler -- what PixelCNN ports do -- runs the whole network for every pixel;
the cached sampler (genlab.nets.cached, after Ramachandran et al. 2017, who report about 2x at
batch 1 up to 183x at batch 256) computes only the new pixel's activations.

    python bench/ar_sampling.py [--models pixelcnn gated_pixelcnn pixelcnn_pp] [--batches 1 64]

Prints images/s of each sampler, the speed-up, and whether both drew the same images for the
same seed (float32), and writes bench/results/ar_sampling.json (rows of models not run this
time are kept from the file).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from genlab.utils import CONF_DIR


def build(model: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "data=mnist"])
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


def timed(module, n: int, fast: bool) -> tuple[torch.Tensor, float]:
    module.sample_batch_size = n
    start = time.perf_counter()
    images = module.sample(n, generator=torch.Generator().manual_seed(0), fast=fast)
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["pixelcnn", "gated_pixelcnn", "pixelcnn_pp"]
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/ar_sampling.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        module = build(name)
        timed(module, 1, True)  # warm-up
        for b in args.batches:
            fast_images, fast_s = timed(module, b, True)
            plain_images, plain_s = timed(module, b, False)
            row = {
                "model": name,
                "batch": b,
                "plain_img_per_s": b / plain_s,
                "cached_img_per_s": b / fast_s,
                "speedup": plain_s / fast_s,
                "identical_images": int((fast_images == plain_images).flatten(1).all(1).sum()),
            }
            rows.append(row)
            print(
                f"{name:16s} batch {b:3d}: plain {row['plain_img_per_s']:8.3f} img/s  cached "
                f"{row['cached_img_per_s']:8.3f} img/s  x{row['speedup']:6.1f}  "
                f"identical {row['identical_images']}/{b}"
            )
    out = Path(args.out)
    if out.exists():  # keep the other models' rows from earlier runs
        done = {(r["model"], r["batch"]) for r in rows}
        earlier = json.loads(out.read_text())["results"]
        rows = [r for r in earlier if (r["model"], r["batch"]) not in done] + rows
    result = {"device": "cpu", "threads": torch.get_num_threads(), "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
