"""The Frechet distance at more than one sample count: its extrapolation to infinitely many
samples, and a bootstrap interval. Both reuse torch-fidelity's statistics and distance, so the
plain value they start from is exactly the one ``genlab.metrics.fidelity`` reports.

- ``fd_infinity(gen, ref)``: FID-infinity (Chong & Forsyth 2020, "Effectively Unbiased FID and
  Inception Score and where to find them", CVPR, Sec. 3.1). The Frechet distance of N samples is
  biased upward by a term that, to first order, falls as 1/N and whose size depends on the
  model; so FD is computed on random subsets of N_1 < ... < N_P generated features (the last is
  all of them), the line ``FD_N = FD_inf + slope / N`` is fitted by least squares, and its
  intercept is reported. The paper spaces 15 counts evenly from 5k to 50k; genlab's default is
  5 counts evenly from n/4 to n, sized for the thousands of samples a CPU evaluation draws
  (``metrics.fd_infinity_points``, ``metrics.fd_infinity_min_fraction``).
- ``bootstrap_fd(gen, ref, rounds)``: the percentile bootstrap of the generated side (the
  reference statistics fixed): FD of ``rounds`` resamples with replacement, their 2.5 / 97.5
  percentiles and standard deviation. Resampling repeats images, which shrinks the sample's
  diversity, so the resampled FDs sit above the plain value by about the bias FD_inf removes:
  read the interval as the spread of the number, not as a bound on the true distance. The
  seed repeats (``metrics.repeats``) are the better spread when they are affordable.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

FD_KEY = "frechet_inception_distance"  # torch-fidelity's result key, whatever the features


def frechet(gen: torch.Tensor, ref: dict) -> float:
    """FD of generated features (N, D) against reference statistics {"mu", "sigma"} (tensors
    or arrays), by torch-fidelity's own functions."""
    stats = fid_features_to_statistics(gen)
    mu, sigma = (np.asarray(ref[k]) for k in ("mu", "sigma"))
    ref_stats = {"mu": mu.astype(stats["mu"].dtype), "sigma": sigma.astype(stats["sigma"].dtype)}
    return float(fid_statistics_to_metric(stats, ref_stats, verbose=False)[FD_KEY])


def infinity_counts(n: int, points: int = 5, min_fraction: float = 0.25) -> list[int]:
    """``points`` sample counts evenly spaced from ``min_fraction * n`` to ``n`` (distinct)."""
    if points < 2:
        raise ValueError(f"FD-infinity needs at least 2 sample counts, got points={points}")
    low = max(2, int(round(min_fraction * n)))
    return sorted({int(round(c)) for c in np.linspace(low, n, points)})


def fd_infinity(
    gen: torch.Tensor,
    ref: dict,
    counts: list[int] | None = None,
    seed: int = 0,
) -> dict:
    """{"value": FD_inf, "slope", "counts", "fd"} from generated features ``gen`` (N, D) against
    reference statistics ``ref``: FD on a random subset (seeded) of each count, all N for the
    largest, then the least-squares line in 1/N (Chong & Forsyth 2020, Sec. 3.1)."""
    n = len(gen)
    counts = infinity_counts(n) if counts is None else sorted(int(c) for c in counts)
    if len(counts) < 2 or counts[-1] > n or counts[0] < 2:
        raise ValueError(f"FD-infinity counts {counts} do not fit {n} features")
    g = torch.Generator().manual_seed(seed)
    fds = []
    for count in counts:
        subset = gen if count == n else gen[torch.randperm(n, generator=g)[:count]]
        fds.append(frechet(subset, ref))
    inv = np.array([1.0 / c for c in counts])
    slope, intercept = np.polyfit(inv, np.array(fds), 1)
    return {"value": float(intercept), "slope": float(slope), "counts": counts, "fd": fds}


def bootstrap_fd(gen: torch.Tensor, ref: dict, rounds: int = 100, seed: int = 0) -> dict:
    """{"low", "high", "std", "rounds"}: 2.5 / 97.5 percentiles and standard deviation of the FD
    of ``rounds`` resamples (with replacement, seeded) of ``gen`` against fixed ``ref``."""
    if rounds < 2:
        raise ValueError(f"a bootstrap needs at least 2 rounds, got {rounds}")
    g = torch.Generator().manual_seed(seed)
    n = len(gen)
    values = np.array(
        [frechet(gen[torch.randint(n, (n,), generator=g)], ref) for _ in range(rounds)]
    )
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "std": float(values.std(ddof=1)),
            "rounds": int(rounds)}  # fmt: skip


__all__ = ["bootstrap_fd", "fd_infinity", "frechet", "infinity_counts"]
