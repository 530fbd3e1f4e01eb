"""Cost of genlab's evaluation protocol against calling torch-fidelity directly.

On the same N "generated" and N reference uint8 images, with the same Inception-v3 weights
file, it times (in interleaved rounds, median reported, since the machine may be shared):

* ``torch-fidelity``: ``torch_fidelity.calculate_metrics(fid, kid, isc, prc)`` with
  ``feature_extractor="inception-v3-compat"`` and no cache (features of both sides);
* ``genlab uncached``: a fresh ``Evaluator.evaluate_images`` with an empty cache directory
  (features of both sides, then the reference is written to the cache);
* ``genlab cached``: a fresh ``Evaluator`` on the same cache directory (what a second
  evaluation in another process costs: the generated side only).

It also measures Inception feature extraction alone (images/s, batch 64) and relates it to the
machine's fp32 matmul peak, with the FLOPs of one 299x299 forward pass counted by
``torch.utils.flop_counter`` (about 11.4 GFLOP, as usually quoted).

Without the real weights (offline) a randomly initialised Inception of the same architecture is
used (``genlab.metrics.extractors.save_random_inception``): the cost is the same, the metric
values are meaningless. Images: MNIST test / train from ``--mnist`` when present, else random.

Run: ``python bench/eval_cost.py [--n 200] [--rounds 2] [--device cpu|cuda] [--weights FILE]``.
On a GPU, ``--n 10000`` gives the time for 10k images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from genlab.metrics.evaluator import Evaluator
from genlab.metrics.extractors import build_extractor, save_random_inception
from genlab.metrics.fidelity import TensorReference

REPO = Path(__file__).resolve().parents[1]


class Uint8Set(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def matmul_peak_gflops(device: str, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def load_images(n: int, mnist: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    if (mnist / "MNIST" / "raw").exists():
        from genlab.data import MNISTDataModule

        data = MNISTDataModule(root=str(mnist), download=False)
        gen = data.load_split("val").tensors[0][:n]
        ref = data.load_split("train").tensors[0][:n]
        return gen, ref, "MNIST 28x28 (test as generated, train as reference)"
    g = torch.Generator().manual_seed(0)
    shape = (n, 3, 32, 32)
    return (
        torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
        torch.randint(0, 256, shape, generator=g, dtype=torch.uint8),
        "random 32x32 RGB",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", type=int, default=200, help="generated images (and reference images)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weights", default=None, help="Inception weights (default: random init)")
    parser.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "assets" / "mnist")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval_cost.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="genlab-eval-cost-"))
    weights = args.weights or str(save_random_inception(work / "random-inception.pth"))
    gen, ref, source = load_images(args.n, args.mnist)
    n = len(gen)
    metrics = ["fid", "kid", "is", "pr"]
    common = dict(
        metrics=metrics,
        extractors=["inception"],
        inception_weights=weights,
        reference_samples=None,
        progress=False,
    )
    reference = TensorReference(ref, name="bench", tag=source)
    cuda = args.device == "cuda"

    def bare_torch_fidelity():
        return torch_fidelity.calculate_metrics(
            input1=Uint8Set(gen),
            input2=Uint8Set(ref),
            cuda=cuda,
            fid=True,
            kid=True,
            isc=True,
            prc=True,
            feature_extractor="inception-v3-compat",
            feature_extractor_weights_path=weights,
            kid_subset_size=min(1000, n),
            cache=False,
            verbose=False,
        )

    def genlab(cache_dir: Path):
        ev = Evaluator(**common, cache_dir=str(cache_dir))
        return ev.evaluate_images(gen, reference, args.device)

    times: dict[str, list[float]] = {
        "torch-fidelity": [],
        "genlab uncached": [],
        "genlab cached": [],
    }
    results = {}
    for r in range(args.rounds):
        cache_dir = work / f"cache{r}"
        for name, fn in (
            ("torch-fidelity", bare_torch_fidelity),
            ("genlab uncached", partial(genlab, cache_dir)),
            ("genlab cached", partial(genlab, cache_dir)),
        ):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name:16s} {times[name][-1]:7.1f} s", flush=True)

    # feature extraction alone, and its FLOPs
    ext = build_extractor("inception", weights, args.device)
    probe = gen[:1].expand(-1, 3, -1, -1).to(args.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ext.module(probe)
    gflop_per_image = counter.get_total_flops() / 1e9
    ev = Evaluator(**common)
    ev.features(ext, gen[:64])  # warm-up
    t0 = time.perf_counter()
    ev.features(ext, gen)
    if cuda:
        torch.cuda.synchronize()
    extract_ips = n / (time.perf_counter() - t0)
    peak = matmul_peak_gflops(args.device)

    med = {k: statistics.median(v) for k, v in times.items()}
    tf = results["torch-fidelity"]
    ours = results["genlab uncached"]["metrics"]
    report = {
        "device": args.device,
        "images": source,
        "n_generated": n,
        "n_reference": len(ref),
        "rounds": args.rounds,
        "seconds_median": med,
        "genlab_uncached_over_torch_fidelity": med["genlab uncached"] / med["torch-fidelity"],
        "cached_over_uncached": med["genlab cached"] / med["genlab uncached"],
        "inception_gflop_per_image": gflop_per_image,
        "extract_images_per_s": extract_ips,
        "matmul_peak_gflops": peak,
        "extract_fraction_of_peak": extract_ips * gflop_per_image / peak,
        "fid_genlab_vs_torch_fidelity": [ours["val/fid"], tf[torch_fidelity.KEY_METRIC_FID]],
        "weights": "given" if args.weights else "random init (cost only)",
        "torch": torch.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))
    print(
        f"\n{n} generated + {len(ref)} reference images on {args.device}: torch-fidelity "
        f"{med['torch-fidelity']:.1f} s, genlab uncached {med['genlab uncached']:.1f} s "
        f"({report['genlab_uncached_over_torch_fidelity']:.2f}x), cached "
        f"{med['genlab cached']:.1f} s ({report['cached_over_uncached']:.2f}x of uncached); "
        f"Inception {gflop_per_image:.1f} GFLOP/image, {extract_ips:.1f} images/s = "
        f"{100 * report['extract_fraction_of_peak']:.0f}% of the {peak:.0f} GFLOP/s matmul peak"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
