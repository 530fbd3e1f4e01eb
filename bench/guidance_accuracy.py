"""How well guidance steers digit models: "prompt accuracy", the fraction of guided samples
that the evaluation protocol's digit classifier assigns to the prompted digit (unguided: about
10%), beside the digit Frechet distance and the CLIP score of the same samples, guided and not,
and the sampling speed of each.

    python bench/guidance_accuracy.py [--n 200] [--data-dir ../shared/assets/mnist]
        [--out bench/results/guidance.json]
        --job "<label>|<run dir>|<conf/guidance option>|<key=value> <key=value> ..." ...

A job's key=value pairs set guidance.<key>, except model.sampler.<arg>=<value>, which changes
the run's sampler for that job, guided and unguided alike (e.g. model.sampler.eta=1).

Example (the README's table):
    --job "CLIP gradient|<diffusion run>|clip|scale=80 cutouts=8 model.sampler.eta=1"
    --job "classifier|<diffusion run>|classifier|scale=30 model.sampler.eta=1"
    --job "CLIP latent|<gan run>|clip|steps=30"
    --job "CLIP rerank|<pixelcnn run>|clip|method=rerank k=8"
    --job "CFG|<conditional diffusion run>|cfg|scale=3"

Image i is steered toward digit i mod 10: CLIP guidance by the prompt "a handwritten <digit
word>" (the prompts cycle over the images), classifier guidance by its classes (which cycle
likewise), a conditional model by its label. "Unguided" is the same model, seed and labels
without guidance (for a conditional model: its plain conditional samples). CLIP: the bundled
domain CLIP (genlab-digits), which is also the guiding CLIP, so guided CLIP scores are high by
construction; the digit classifier is an independent judge. The Frechet distance uses the
digit classifier's features against the first 10,000 MNIST training images (as val/fd_digits,
but on n samples: biased upward for small n, equally for the guided and unguided columns).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from genlab.data import MNISTDataModule, to_model
from genlab.guidance import build_guidance
from genlab.metrics.clip import CLIPScore
from genlab.metrics.digits import load_digit_classifier
from genlab.metrics.train_clip import WORDS
from genlab.runs import load_model
from genlab.utils import compose

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


def parse_job(text: str) -> dict:
    parts = [p.strip() for p in text.split("|")]
    if len(parts) not in (3, 4):
        raise SystemExit(f"--job {text!r}: expected 'label|run dir|guidance option|key=value ...'")
    overrides = parts[3].split() if len(parts) == 4 else []
    return {"label": parts[0], "run": parts[1], "guidance": parts[2], "overrides": overrides}


def draw(model, n: int, y, seed: int = 0) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = model.sample(n, y=y, generator=torch.Generator().manual_seed(seed)).float()
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", action="append", required=True, type=parse_job)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--data-dir", default="../shared/assets/mnist")
    parser.add_argument("--out", default="bench/results/guidance.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = load_digit_classifier().eval()
    clip = CLIPScore("genlab-digits")
    train, _ = MNISTDataModule(root=args.data_dir, download=False, cache_dir=None).read_split(
        "train"
    )
    ref_stats = fid_features_to_statistics(features(net, to_model(train[:10000]))[0])
    target = torch.arange(args.n) % 10
    prompts = [PROMPTS[int(t)] for t in target]

    def measure(images: torch.Tensor, secs: float) -> dict:
        feats, preds = features(net, images)
        return {
            "prompt_accuracy": float((preds == target).float().mean()),
            "fd_digits": frechet(feats, ref_stats),
            "clip_score": clip.score(images, prompts),
            "img_per_s": args.n / secs,
        }

    unguided: dict[str, dict] = {}  # per run: the same samples serve every job on it
    rows = []
    for job in args.job:
        sampler = [o for o in job["overrides"] if o.startswith("model.sampler.")]
        model, cfg, step = load_model(job["run"], overrides=[o[len("model.") :] for o in sampler])
        y = target if model.num_classes else None
        key = f"{job['run']} {' '.join(sampler)}"
        if key not in unguided:
            unguided[key] = measure(*draw(model, args.n, y))
        extra = [f"guidance.prompts=[{','.join(PROMPTS)}]"] if job["guidance"] == "clip" else []
        settings = [f"guidance.{o}" for o in job["overrides"] if o not in sampler]
        conf = compose("sample", [f"run_dir={job['run']}", f"guidance={job['guidance']}",
                                  *extra, *settings]).guidance  # fmt: skip
        model.set_guidance(build_guidance(conf))
        guide = model.guidance
        row = {
            "label": job["label"],
            "run": job["run"],
            "model": cfg.model._target_.rsplit(".", 1)[-1],
            "preset": Path(job["run"]).name,
            "step": step,
            "n": args.n,
            "guidance": guide.protocol(),
            "sampler": model.describe()["sampler"],
            "unguided": unguided[key],
            "guided": measure(*draw(model, args.n, y)),
        }
        rows.append(row)
        u, g = row["unguided"], row["guided"]
        print(f"{job['label']}: prompt accuracy {u['prompt_accuracy']:.3f} -> "
              f"{g['prompt_accuracy']:.3f}, fd_digits {u['fd_digits']:.2f} -> "
              f"{g['fd_digits']:.2f}, CLIP score {u['clip_score']:.1f} -> {g['clip_score']:.1f}, "
              f"img/s {u['img_per_s']:.2f} -> {g['img_per_s']:.2f}", flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"prompts": PROMPTS, "results": rows}, indent=2) + "\n")
    print("\n| method | model | prompt acc. | fd_digits | CLIP score | img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        u, g = r["unguided"], r["guided"]
        print(f"| {r['label']} | {r['preset']} (step {r['step']}) | "
              f"{u['prompt_accuracy']:.2f} → **{g['prompt_accuracy']:.2f}** | "
              f"{u['fd_digits']:.1f} → {g['fd_digits']:.1f} | "
              f"{u['clip_score']:.1f} → {g['clip_score']:.1f} | "
              f"{u['img_per_s']:.1f} → {g['img_per_s']:.2f} |")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
