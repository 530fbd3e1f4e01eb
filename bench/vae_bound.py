"""The importance-weighted bound of a trained VAE on the test set, for several K.

    python bench/vae_bound.py --run <run dir> --k 1 10 100 1000 --n 10000 [--ckpt last]

Prints, for each K, -log p(x) in nats per image (upper bound; Burda et al. 2016, Eq. 8) and in
bits/dim (the evaluation protocol's convention), with the standard error over images and the
decoding throughput, and writes them as JSON (``--out``). K = 1 is the ELBO; the bound tightens
as K grows. ``--first`` limits large K to the first N' images (the cost grows as K * N).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from tqdm import tqdm

from genlab.data.convert import to_model
from genlab.runs import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a VAE run directory")
    parser.add_argument("--ckpt", default="last")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--n", type=int, default=10000, help="test images")
    parser.add_argument("--first", type=int, default=None, help="images for K >= 1000")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, cfg, step = load_model(args.run, args.ckpt, "cpu")
    datamodule = instantiate(cfg.data)
    images, labels = datamodule.load_split("val").tensors
    dims = images[0].numel()
    rows = []
    for k in args.k:
        n = args.n if (args.first is None or k < 1000) else min(args.n, args.first)
        x_all = to_model(images[:n])
        g = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        bpd = torch.cat(
            [
                model.bits_per_dim(x_all[i : i + args.batch], generator=g, k=k)
                for i in tqdm(range(0, n, args.batch), desc=f"K={k}", leave=False)
            ]
        ).double()
        seconds = time.perf_counter() - start
        nats = bpd * dims * math.log(2)
        row = {
            "k": k,
            "images": n,
            "nats": nats.mean().item(),
            "nats_se": (nats.std() / math.sqrt(n)).item(),
            "bpd": bpd.mean().item(),
            "decodes_per_s": k * n * max(model.num_classes, 1) / seconds,
        }
        rows.append(row)
        print(
            f"K={k:>5}  images={n:>5}  -log p(x) <= {row['nats']:.2f} +- {row['nats_se']:.2f} "
            f"nats  = {row['bpd']:.4f} bits/dim  ({row['decodes_per_s']:.0f} decodes/s)"
        )
    result = {
        "run": str(args.run),
        "global_step": step,
        "dataset": cfg.data._target_,
        "binarize": cfg.data.get("binarize"),
        "likelihood": cfg.model.get("likelihood"),
        "bounds": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
