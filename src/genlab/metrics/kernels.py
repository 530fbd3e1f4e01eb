"""Distances between two sets of features that are not Frechet distances: CMMD (an MMD with a
Gaussian kernel on CLIP embeddings) and density / coverage (k-nearest-neighbour balls).

- ``mmd2_unbiased(x, y, sigma)``: the unbiased estimator of the squared maximum mean
  discrepancy (Gretton et al. 2012, Eq. 3) with the Gaussian RBF kernel
  ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))``, in float64::

      MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                - 2/(mn) sum_{i, j} k(x_i, y_j)

  It is 0 in expectation for two samples of one distribution (so it can be slightly negative)
  and it has no bias that depends on the sample size, unlike the Frechet distance.
- ``cmmd(x, y)``: CMMD (Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation
  Metric for Image Generation", Sec. 4): ``1000 * MMD^2_u`` with sigma = 10 on L2-normalised
  CLIP image embeddings, the paper's bandwidth and scale. The paper writes the unbiased
  estimator (its Eq. 3); its released code averages the full kernel matrices, diagonals
  included (the biased V-statistic). genlab computes the unbiased one, as the paper defines it.
- ``density_coverage(real, fake, k)``: density and coverage (Naeem et al. 2020, "Reliable
  Fidelity and Diversity Metrics for Generative Models", Eqs. 3-4), with ``B(x, r)`` the
  ball around real feature x whose radius r is the distance to its k-th nearest other
  real feature::

      density  = 1/(k M) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]
      coverage = 1/N     sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]

  (N real features X, M generated Y). Density can exceed 1; both are 1 in expectation for
  two samples of one distribution (density exactly so, Naeem et al. Sec. 3.2).
"""

from __future__ import annotations

import torch

CMMD_SIGMA = 10.0  # Jayasumana et al. 2024, Sec. 4: the bandwidth of the Gaussian kernel
CMMD_SCALE = 1000.0  # ... and the scale the paper reports CMMD at
DC_NEIGHBOURS = 5  # Naeem et al. 2020 use k = 5


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, n) squared Euclidean distances in float64 (exact zero on a shared row)."""
    a, b = a.double(), b.double()
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min(0.0)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Unbiased squared MMD between feature sets x (m, D) and y (n, D), m, n >= 2, with the
    Gaussian RBF kernel of bandwidth ``sigma``; float64 throughout (see the module doc)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"expected (m, D) and (n, D) features, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 features per set, got {m} and {n}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = torch.exp(-gamma * _sq_dists(x, x))
    k_yy = torch.exp(-gamma * _sq_dists(y, y))
    k_xy = torch.exp(-gamma * _sq_dists(x, y))
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def cmmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """CMMD of CLIP image embeddings x (m, D) against y (n, D): 1000 * unbiased MMD^2 with
    sigma = 10 (Jayasumana et al. 2024). The embeddings are L2-normalised here as well, so
    unnormalised ones give the paper's number too."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    return CMMD_SCALE * mmd2_unbiased(x, y, CMMD_SIGMA)


def density_coverage(
    real: torch.Tensor, fake: torch.Tensor, k: int = DC_NEIGHBOURS
) -> dict[str, float]:
    """{"density", "coverage"} of generated features ``fake`` (M, D) against ``real`` (N, D),
    N > k, by Naeem et al. 2020 Eqs. 3-4 (see the module doc); float64 distances."""
    if len(real) <= k:
        raise ValueError(f"density/coverage with k={k} needs more than {k} real features")
    real_d = _sq_dists(real, real)
    # k-th nearest other real point: index k of the sorted row (index 0 is the point itself)
    radii = real_d.kthvalue(k + 1, dim=1).values  # squared radii, (N,)
    # (N, M): Y_j in B(X_i, NND_k(X_i)); strict, as the authors' prdc package compares
    inside = _sq_dists(real, fake) < radii[:, None]
    density = inside.sum().item() / (k * len(fake))
    coverage = inside.any(dim=1).double().mean().item()
    return {"density": float(density), "coverage": float(coverage)}


__all__ = ["CMMD_SCALE", "CMMD_SIGMA", "cmmd", "density_coverage", "mmd2_unbiased"]
