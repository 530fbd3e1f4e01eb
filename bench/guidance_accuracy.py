"""Prompt accuracy of CLIP guidance on digit models: the fraction of guided samples that the
evaluation protocol's digit classifier assigns to the prompted digit (unguided: about 10%),
beside the digit Frechet distance and the CLIP score of the same samples, guided and not.

    python bench/guidance_accuracy.py --runs <run> [<run> ...] [--n 200] [--k 4]
        [--data-dir ../shared/assets/mnist] [--out bench/results/guidance_rerank.json]

Prompts: "a handwritten <zero..nine>", cycled over the n images (so each digit gets n/10).
CLIP: the bundled domain CLIP (genlab-digits). Method: rerank (best of k samples per image).
The Frechet distance uses the digit classifier's features against the first 10,000 MNIST
training images (as val/fd_digits, but on n samples: biased upward for small n, and equally
so for the guided and unguided columns).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from genlab.data import MNISTDataModule, to_model
from genlab.guidance import attach
from genlab.guidance.clip import ClipGuidance
from genlab.metrics.digits import load_digit_classifier
from genlab.metrics.train_clip import WORDS
from genlab.sample import load_model

PROMPTS = [f"a handwritten {w}" for w in WORDS]


@torch.no_grad()
def features(net, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit-classifier features, predicted digits) of images in [-1, 1]."""
    feats, preds = [], []
    for i in range(0, len(images), 500):
        f = net.features(images[i : i + 500])
        feats.append(f)
        preds.append(net.head(f).argmax(1))
    return torch.cat(feats).double(), torch.cat(preds)


def frechet(a: torch.Tensor, ref_stats: dict) -> float:
    stats = fid_features_to_statistics(a)
    return float(
        fid_statistics_to_metric(stats, ref_stats, verbose=False)["frechet_inception_distance"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--data-dir", default="../shared/assets/mnist")
    parser.add_argument("--out", default="bench/results/guidance_rerank.json")
    args = parser.parse_args()
    net = load_digit_classifier().eval()
    train, _ = MNISTDataModule(root=args.data_dir, download=False, cache_dir=None).read_split(
        "train"
    )
    ref_stats = fid_features_to_statistics(features(net, to_model(train[:10000]))[0])
    target = torch.arange(args.n) % 10
    rows = []
    for run in args.runs:
        model, cfg, step = load_model(run)
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        y = target if getattr(model, "num_classes", 0) else None
        start = time.perf_counter()
        plain = model.sample(args.n, y=y, generator=gen()).float()
        plain_s = time.perf_counter() - start
        guide = ClipGuidance(PROMPTS, k=args.k)
        attach(model, guide)
        start = time.perf_counter()
        guided = model.sample(args.n, y=y, generator=gen()).float()
        guided_s = time.perf_counter() - start
        prompts = [PROMPTS[int(t)] for t in target]
        row = {"run": run, "model": cfg.model._target_.rsplit(".", 1)[-1], "step": step,
               "n": args.n, "k": args.k}  # fmt: skip
        for name, images, secs in (("unguided", plain, plain_s), ("rerank", guided, guided_s)):
            feats, preds = features(net, images)
            row[name] = {
                "prompt_accuracy": float((preds == target).float().mean()),
                "fd_digits": frechet(feats, ref_stats),
                "clip_score": guide.clip.score(images, prompts),
                "img_per_s": args.n / secs,
            }
        rows.append(row)
        u, g = row["unguided"], row["rerank"]
        print(f"{run}: prompt accuracy {u['prompt_accuracy']:.3f} -> {g['prompt_accuracy']:.3f}, "
              f"fd_digits {u['fd_digits']:.2f} -> {g['fd_digits']:.2f}, "
              f"CLIP score {u['clip_score']:.1f} -> {g['clip_score']:.1f}, "
              f"img/s {u['img_per_s']:.1f} -> {g['img_per_s']:.1f}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompts": PROMPTS, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
