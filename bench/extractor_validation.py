"""Do genlab's offline feature spaces see image damage? Heusel et al. 2017 (GANs Trained by a Two
Time-Scale Update Rule, Appendix, Fig. A1) validated FID by disturbing real images and checking
that the distance to the clean data rises with the disturbance. This does the same for each
extractor that works offline:

* ``digits`` (``genlab-digits``, 128-d): MNIST test split against the MNIST train split;
* ``faces`` (``genlab-faces``, 256-d): CelebA val split against the CelebA train split
  (``CelebADataModule``, the preprocessing of ``conf/data/celeba.yaml``).

Six disturbances of the held-out images, each at strength 0 (clean) and five strengths:
Gaussian noise (std in [-1, 1] units), Gaussian blur (sigma in pixels), black rectangles
(count, sides 1/8 to 1/3 of the image), salt and pepper (pixel fraction), swirl (strength, as
skimage's ``swirl`` with radius = image side), and contamination (the fraction of images
replaced by the other dataset's: faces for digits, digits for faces). Every disturbance takes and
returns uint8 (N, C, H, W) and is seeded. Frechet distances use torch-fidelity's own functions on
the extractors' features, built as the evaluator builds them (``build_extractor``). For MNIST,
CMMD (``genlab.metrics.kernels.cmmd``) on the bundled digit CLIP's image embeddings
(``clip_digits``) is added.

Run: ``python bench/extractor_validation.py [--n 1000] [--extractors digits,faces]``;
``--extractors inception,dinov2 --weights inception=<file> --weights dinov2=<file>`` adds the
online spaces on the faces when their weights exist (slow on a CPU: use a GPU). Writes
``bench/results/extractor_validation.csv`` and ``docs/assets/extractor_validation.png`` and
prints a table with, per curve, whether the distance rises monotonically with strength.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch_fidelity.metric_fid import (
    fid_features_to_statistics,
)
from torchvision.transforms.v2 import functional as TF

from genlab.data import to_model, to_uint8

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
CSV_PATH = REPO / "bench" / "results" / "extractor_validation.csv"
PNG_PATH = REPO / "docs" / "assets" / "extractor_validation.png"


# ------------------------------------------------------------------ disturbances (uint8 in/out)
def gaussian_noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """x + N(0, std^2) in [-1, 1] units, clamped and rounded to 8 bits."""
    return to_uint8(to_model(x) + std * torch.randn(x.shape, generator=g))


def gaussian_blur(x: torch.Tensor, sigma: float, g: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur with std ``sigma`` pixels, kernel 2 ceil(3 sigma) + 1 (reflect padding)."""
    if sigma <= 0:
        return x.clone()
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def black_rectangles(x: torch.Tensor, count: float, g: torch.Generator) -> torch.Tensor:
    """``count`` black rectangles per image, sides uniform in [1/8, 1/3] of the image side,
    placed uniformly."""
    out = x.clone()
    h, w = x.shape[-2:]
    for i in range(len(x)):
        for _ in range(int(count)):
            rh, rw = (int(torch.randint(s // 8, s // 3 + 1, (1,), generator=g)) for s in (h, w))
            top = int(torch.randint(0, h - rh + 1, (1,), generator=g))
            left = int(torch.randint(0, w - rw + 1, (1,), generator=g))
            out[i, :, top : top + rh, left : left + rw] = 0
    return out


def salt_and_pepper(x: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """A ``fraction`` of each image's pixels (all channels) set to black or white, half each."""
    b, _, h, w = x.shape
    u = torch.rand((b, 1, h, w), generator=g)
    out = x.clone()
    out.masked_fill_((u < fraction / 2).expand_as(x), 0)
    out.masked_fill_(((u >= fraction / 2) & (u < fraction)).expand_as(x), 255)
    return out


def swirl(x: torch.Tensor, strength: float, g: torch.Generator | None = None) -> torch.Tensor:
    """skimage's ``swirl`` about the image centre with radius = the image side: the pixel at
    polar (rho, theta) is read from angle theta + strength * exp(-rho / r), r = ln 2 * side / 5
    (bilinear, border padding)."""
    if strength == 0:
        return x.clone()
    h, w = x.shape[-2:]
    r = math.log(2) * max(h, w) / 5
    yy, xx = torch.meshgrid(
        torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij"
    )
    rho = torch.sqrt(xx**2 + yy**2)
    theta = torch.atan2(yy, xx) + strength * torch.exp(-rho / r)
    grid = torch.stack([rho * torch.cos(theta) / (w / 2), rho * torch.sin(theta) / (h / 2)], -1)
    grid = grid.expand(len(x), h, w, 2)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def contaminate(
    x: torch.Tensor, fraction: float, g: torch.Generator, other: torch.Tensor
) -> torch.Tensor:
    """A ``fraction`` of the images (chosen at random) replaced by images of ``other``, uint8
    resized (antialiased bilinear) and channel-matched to x."""
    n = int(round(fraction * len(x)))
    out = x.clone()
    if n == 0:
        return out
    other = match(other, x)
    idx = torch.randperm(len(x), generator=g)[:n]
    pick = torch.randint(0, len(other), (n,), generator=g)
    out[idx] = other[pick]
    return out


def match(images: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """uint8 images resized and channel-matched (grey repeated, RGB averaged) to ``like``."""
    c, h, w = like.shape[1:]
    if images.shape[1] != c:
        images = images.expand(-1, 3, -1, -1) if c == 3 else images.float().mean(1, keepdim=True)
    if tuple(images.shape[-2:]) != (h, w):
        images = F.interpolate(images.float(), size=(h, w), mode="bilinear", antialias=True)
    return images.round().clamp(0, 255).to(torch.uint8) if images.is_floating_point() else images


STRENGTHS = {
    "noise": [0, 0.05, 0.1, 0.2, 0.35, 0.5],
    "blur": [0, 0.5, 1, 1.5, 2, 3],
    "rectangles": [0, 1, 2, 3, 4, 5],
    "salt_pepper": [0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "swirl": [0, 1, 2, 3, 4, 5],
    "contamination": [0, 0.1, 0.2, 0.3, 0.4, 0.5],
}


def disturbances(other: torch.Tensor) -> dict[str, Callable]:
    """name -> f(x uint8, strength, generator) -> uint8; ``other`` feeds contamination."""
    return {
        "noise": gaussian_noise,
        "blur": gaussian_blur,
        "rectangles": black_rectangles,
        "salt_pepper": salt_and_pepper,
        "swirl": swirl,
        "contamination": partial(contaminate, other=other),
    }


# ------------------------------------------------------------------ data and features
def load_mnist(assets: Path = ASSETS) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 (N, 3, 28, 28): MNIST through genlab's datamodule, grey repeated."""
    from genlab.data import MNISTDataModule

    dm = MNISTDataModule(root=str(assets / "mnist"), download=False, cache_dir=None)
    split = (dm.load_split(s).tensors[0] for s in ("train", "val"))
    return tuple(x.expand(-1, 3, -1, -1) for x in split)


def load_celeba(assets: Path = ASSETS, cache_dir: str | None = None):
    """(train, val) uint8 (N, 3, 64, 64) as conf/data/celeba.yaml preprocesses them."""
    from genlab.metrics.train_faces import load_faces

    return load_faces(str(assets / "celeba"), cache_dir)


def extractor(key: str, weights: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (N, 3, H, W) -> (N, D) float features of any ``EXTRACTORS`` key (``weights``: its
    weights file), built as the evaluator builds them
    (``genlab.metrics.extractors.build_extractor``); the layer is the one FID (or, for CLIP,
    CMMD) uses."""
    from genlab.metrics.extractors import build_extractor

    ex = build_extractor(key, weights)
    layer = ex.layers.get("fid") or ex.layers["cmmd"]
    index = list(ex.module.features_list).index(layer)

    @torch.no_grad()
    def features(x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return torch.cat([ex.module(x[i : i + batch])[index] for i in range(0, len(x), batch)])

    return features


def frechet(stats_ref: dict, feats: torch.Tensor) -> float:
    """torch-fidelity's FID formula between features and reference statistics
    (``genlab.metrics.frechet.frechet``, what the evaluator's FD-infinity uses)."""
    from genlab.metrics.frechet import frechet as fd

    return fd(feats, stats_ref)


def curves(
    features: Callable,
    reference: torch.Tensor,
    held_out: torch.Tensor,
    other: torch.Tensor,
    strengths: dict[str, list[float]] = STRENGTHS,
    seed: int = 0,
) -> dict[str, list[float]]:
    """FD(features of disturbed held_out, features of reference) per disturbance and strength."""
    stats_ref = fid_features_to_statistics(features(reference))
    out = {}
    for name, fn in disturbances(other).items():
        out[name] = [
            frechet(stats_ref, features(fn(held_out, s, torch.Generator().manual_seed(seed))))
            for s in strengths[name]
        ]
    return out


def cmmd_curves(reference, held_out, other, n_ref: int) -> dict[str, list[float]] | None:
    """CMMD (``genlab.metrics.kernels.cmmd``) on the bundled digit CLIP's image embeddings."""
    try:
        from genlab.metrics.kernels import cmmd
    except ImportError:
        return None
    embed = extractor("clip_digits")
    ref = embed(reference[:n_ref], batch=250)
    return {
        name: [
            float(cmmd(embed(fn(held_out, s, torch.Generator().manual_seed(0)), batch=250), ref))
            for s in STRENGTHS[name]
        ]
        for name, fn in disturbances(other).items()
    }


def monotonic(values: list[float]) -> bool:
    return all(b >= a for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------ report
def plot(results: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (space, table) in zip(axes[0], results.items()):
        for name, values in table.items():
            ax.plot(range(len(values)), values, marker="o", label=f"{name} {STRENGTHS[name][1:]}")
        values = [v for vs in table.values() for v in vs]
        if min(values) > 0:
            ax.set_yscale("log")
        else:  # an unbiased MMD^2 can dip below 0 near the clean point
            ax.set_yscale("symlog", linthresh=min(abs(v) for v in values if v) or 1.0)
        ax.set_xlabel("strength index (0 = clean)")
        ax.set_ylabel("distance to the reference")
        ax.set_title(space)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="held-out images per curve point")
    parser.add_argument(
        "--ref", type=int, default=0, help="reference images (0: whole train split)"
    )
    parser.add_argument(
        "--extractors",
        default="digits,faces",
        help="digits, faces; inception and dinov2 (on the faces) when --weights names a file",
    )
    parser.add_argument("--weights", action="append", default=[], metavar="KEY=FILE",
                        help="weights of an extractor, e.g. inception=<file>")  # fmt: skip
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--cache-dir", default="/tmp/genlab_bench_cache")
    parser.add_argument("--csv", type=Path, default=CSV_PATH)
    parser.add_argument("--png", type=Path, default=PNG_PATH)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    keys = args.extractors.split(",")
    mnist_train, mnist_test = load_mnist(args.assets)
    celeba_train, celeba_val = load_celeba(args.assets, args.cache_dir)
    ref = slice(None) if args.ref <= 0 else slice(0, args.ref)
    setups = {
        "digits": ("fd_digits", mnist_train[ref], mnist_test[: args.n], celeba_val),
        "faces": ("fd_faces", celeba_train[ref], celeba_val[: args.n], mnist_test),
    }
    for key, metric in (("inception", "fid"), ("dinov2", "fd_dinov2")):  # slow on a CPU
        setups[key] = (metric, *setups["faces"][1:])
    weights = dict(w.split("=", 1) for w in args.weights)
    results, rows = {}, []
    for key in keys:
        metric, reference, held_out, other = setups[key]
        start = time.time()
        results[f"{metric} ({key}: {len(held_out)} held-out vs {len(reference)} train)"] = table = (
            curves(extractor(key, weights.get(key)), reference, held_out, other)
        )
        rows += [
            (key, metric, d, s, v) for d, vs in table.items() for s, v in zip(STRENGTHS[d], vs)
        ]
        print(f"{key}: {time.time() - start:.0f} s")
        if key == "digits":
            cm = cmmd_curves(reference, held_out, other, n_ref=5000)
            if cm is None:
                print("cmmd: genlab.metrics.kernels.cmmd not available, skipped")
            else:
                results[f"cmmd (digit CLIP: {len(held_out)} held-out vs 5000 train)"] = cm
                rows += [
                    (key, "cmmd", d, s, v) for d, vs in cm.items() for s, v in zip(STRENGTHS[d], vs)
                ]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["extractor", "metric", "disturbance", "strength", "value"])
        writer.writerows([(k, m, d, s, f"{v:.6g}") for k, m, d, s, v in rows])
    for space, table in results.items():
        print(f"\n{space}")
        print(
            f"{'disturbance':<14}"
            + "".join(f"{'s' + str(i):>10}" for i in range(6))
            + "  monotonic"
        )
        for name, values in table.items():
            cells = "".join(f"{v:>10.4g}" for v in values)
            print(f"{name:<14}{cells}  {'yes' if monotonic(values) else 'NO'}")
        print("strengths: " + "; ".join(f"{d} {STRENGTHS[d]}" for d in table))
    plot(results, args.png)
    print(f"\nwrote {args.csv} and {args.png}")


if __name__ == "__main__":
    main()
