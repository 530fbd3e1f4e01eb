"""ImageGPT sampling, plain vs KV cache: images/s at batch 1 and 64 on 28x28 MNIST geometry
with model=image_gpt (weights as initialised: the cost does not depend on them).

The plain sampler runs the whole network -- a full pass over the T = 784 positions, O(T^2)
attention per layer -- for every value; the KV-cache sampler (``genlab.nets.transformer_ar.
CachedImageGPT``) runs one position per step against each layer's cached keys and values.
Every plain pass costs the same, so the plain sampler is timed over the first ``--positions``
values and extrapolated linearly to T (``plain_extrapolated`` in the results; ``--positions
784`` times it whole). The cached sampler's step grows with t (attention over t keys), so it
is timed over the whole image (``--cached-positions`` to shorten it for a smoke run), and
also over the same first positions as the plain one. Both draw the same uniforms through the
family's loop (``AutoregressiveModule._sample_batch``: inverse-CDF draws, one value at a
time); the values both drew are compared (float32).

    python bench/transformer_sampling.py [--batches 1 64] [--positions 32] [--threads N]

Writes bench/results/transformer_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from genlab.data.convert import from_levels
from genlab.families.autoregressive import AutoregressiveModule, sample_categorical
from genlab.nets import rng
from genlab.nets.cached import cached_sampler
from genlab.utils import CONF_DIR


def build(model: str) -> AutoregressiveModule:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", "data=mnist"])
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


@torch.inference_mode()
def sample_prefix(
    module: AutoregressiveModule, batch: int, positions: int, fast: bool, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """The family's sampling loop over the first ``positions`` values (raster, then channel
    order) of ``batch`` unconditional images -> (images (B, C, H, W), seconds)."""
    c_dim, height, width = module.image_shape
    x = torch.zeros(batch, c_dim, height, width)
    u = rng.rand((batch, height, width, c_dim), torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    cache = cached_sampler(module.net) if fast else None
    if cache is not None:
        cache.reset(x, None)
    t = 0
    for i in range(height):
        for j in range(width):
            for c in range(c_dim):
                if t == positions:
                    return x, time.perf_counter() - start
                out = cache.step(x, i, j) if cache is not None else module.net(x)[..., i, j]
                x[:, c, i, j] = from_levels(sample_categorical(out[:, :, c], u[:, i, j, c]))
                t += 1
        if cache is not None:
            cache.end_row(x, i)
    return x, time.perf_counter() - start


def prefix_values(x: torch.Tensor, positions: int) -> torch.Tensor:
    """The first ``positions`` values of each image in sampling order: (B, positions)."""
    return x.permute(0, 2, 3, 1).flatten(1)[:, :positions]


def measure(module, batch: int, positions: int, cached_positions: int) -> dict:
    total = module.image_shape[0] * module.image_shape[1] * module.image_shape[2]
    sample_prefix(module, batch, 2, False), sample_prefix(module, batch, 2, True)  # warm-up
    plain, plain_s = sample_prefix(module, batch, positions, fast=False)
    _, fast_prefix_s = sample_prefix(module, batch, positions, fast=True)
    fast, fast_s = sample_prefix(module, batch, cached_positions, fast=True)
    plain_image_s = plain_s * total / positions
    fast_image_s = fast_s * total / cached_positions  # exact when the whole image was run
    same = prefix_values(plain, positions) == prefix_values(fast, positions)
    return {
        "model": "image_gpt",
        "batch": batch,
        "sequence_length": total,
        "positions_timed_plain": positions,
        "positions_timed_cached": cached_positions,
        "plain_extrapolated": positions < total,
        "cached_extrapolated": cached_positions < total,
        "plain_img_per_s": batch / plain_image_s,
        "cached_img_per_s": batch / fast_image_s,
        "speedup": plain_image_s / fast_image_s,
        "speedup_first_positions": plain_s / fast_prefix_s,
        "identical_prefixes": int(same.all(1).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="image_gpt")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--positions", type=int, default=32, help="plain: values timed")
    parser.add_argument("--cached-positions", type=int, default=None, help="default: all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="bench/results/transformer_sampling.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    module = build(args.model)
    total = module.image_shape[0] * module.image_shape[1] * module.image_shape[2]
    positions = min(args.positions, total)
    cached_positions = max(min(args.cached_positions or total, total), positions)
    rows = []
    for b in args.batches:
        row = measure(module, b, positions, cached_positions)
        row["model"] = args.model
        rows.append(row)
        print(
            f"{args.model} batch {b:3d}: plain {row['plain_img_per_s']:9.4f} img/s "
            f"({'extrapolated from ' + str(positions) if row['plain_extrapolated'] else 'whole'}"
            f" of {total} values)  KV cache {row['cached_img_per_s']:9.4f} img/s  "
            f"x{row['speedup']:7.1f} (first {positions}: x{row['speedup_first_positions']:.1f})"
            f"  identical first {positions} values {row['identical_prefixes']}/{b}"
        )
    result = {"device": "cpu", "threads": torch.get_num_threads(), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
