"""Sample-quality metrics by torch-fidelity's own functions on precomputed features, and a
reference "dataset" made of fixed images.

Metric names: Inception features give the standard names (``fid``, ``kid_mean``, ``is_mean``,
``precision`` ...); the digit classifier gives its own (``fd_digits``, ``is_digits`` ...), since
its numbers are not comparable with Inception's. Generated features are torch-fidelity's
``input1`` and the reference ``input2``, with torch-fidelity's seed, so the values equal
``torch_fidelity.calculate_metrics`` on the same images and weights (tested).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import TensorDataset
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)
from torch_fidelity.metric_kid import (
    KEY_METRIC_KID_MEAN,
    KEY_METRIC_KID_STD,
    kid_features_to_metric,
)
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)

from genlab.metrics.frechet import bootstrap_fd, infinity_counts
from genlab.metrics.frechet import fd_infinity as frechet_infinity
from genlab.metrics.kernels import CMMD_SCALE, CMMD_SIGMA, cmmd, density_coverage

MIN_INFINITY_SAMPLES = 50  # FD-infinity below this: too few points to fit

# torch-fidelity result key -> metric name, per extractor (each feature space gets its own
# names: their numbers do not compare). Inception's are the standard names.
NAMES = {
    "inception": {
        KEY_METRIC_FID: "fid",
        KEY_METRIC_KID_MEAN: "kid_mean",
        KEY_METRIC_KID_STD: "kid_std",
        KEY_METRIC_ISC_MEAN: "is_mean",
        KEY_METRIC_ISC_STD: "is_std",
        KEY_METRIC_PRECISION: "precision",
        KEY_METRIC_RECALL: "recall",
        "density": "density",
        "coverage": "coverage",
    },
    "digits": {
        KEY_METRIC_FID: "fd_digits",
        KEY_METRIC_KID_MEAN: "kid_digits_mean",
        KEY_METRIC_KID_STD: "kid_digits_std",
        KEY_METRIC_ISC_MEAN: "is_digits",
        KEY_METRIC_ISC_STD: "is_digits_std",
        KEY_METRIC_PRECISION: "precision_digits",
        KEY_METRIC_RECALL: "recall_digits",
        "density": "density_digits",
        "coverage": "coverage_digits",
    },
    "clip": {"cmmd": "cmmd"},
    "clip_digits": {"cmmd": "cmmd_digits"},
}
for _space in ("faces", "dinov2"):  # no class head: no Inception Score
    NAMES[_space] = {
        KEY_METRIC_FID: f"fd_{_space}",
        KEY_METRIC_KID_MEAN: f"kid_{_space}_mean",
        KEY_METRIC_KID_STD: f"kid_{_space}_std",
        KEY_METRIC_PRECISION: f"precision_{_space}",
        KEY_METRIC_RECALL: f"recall_{_space}",
        "density": f"density_{_space}",
        "coverage": f"coverage_{_space}",
    }
FIDELITY_SEED = DEFAULTS["rng_seed"]  # torch-fidelity's seed for IS shuffling and KID subsets


def fidelity_metrics(
    key: str,
    layers: dict[str, str],
    gen: dict[str, torch.Tensor],
    ref: dict,
    *,
    metrics: Iterable[str],
    kid_subsets: int,
    kid_subset_size: int,
    isc_splits: int,
    prc_neighborhood: int,
    fd_infinity: dict | None = None,
    bootstrap: int = 0,
    dc_neighborhood: int = 5,
    protocol: dict | None = None,
) -> dict[str, float]:
    """FID / KID / IS / PR by torch-fidelity's own functions, density/coverage and CMMD
    (``genlab.metrics.kernels``), generated features ``gen`` ({layer: (N, D)}) against a
    reference ({"features": {layer: (M, D)}, "mu", "sigma"}), named for the extractor ``key``
    (``NAMES``; a metric the extractor has no layer for is skipped). ``layers`` maps
    fid/kid/isc/prc/cmmd to layers. With ``fid``: ``fd_infinity`` ({points, min_fraction}, or
    None) adds ``<fd name>_inf`` (Chong & Forsyth 2020), ``bootstrap`` > 0 rounds add
    ``<fd name>_ci_low`` / ``_ci_high`` (``genlab.metrics.frechet``). Density/coverage use
    ``dc_neighborhood`` neighbours (Naeem et al.'s k = 5) and a fixed random subset of as many
    reference features as there are generated ones. How each was computed goes into
    ``protocol`` when given."""
    out: dict[str, float] = {}  # torch-fidelity's keys
    derived: dict[str, float] = {}  # named already: FD-infinity, the bootstrap interval
    real = ref["features"]
    names = NAMES[key]
    protocol = {} if protocol is None else protocol
    want = {m for m in metrics if m != "pr" or "prc" in layers}
    if "fid" in want and "fid" in layers:
        stats_gen = fid_features_to_statistics(gen[layers["fid"]])
        stats_ref = {"mu": ref["mu"].numpy(), "sigma": ref["sigma"].numpy()}
        out.update(fid_statistics_to_metric(stats_gen, stats_ref, verbose=False))
        fd = names[KEY_METRIC_FID]
        n = len(gen[layers["fid"]])
        if fd_infinity and n >= MIN_INFINITY_SAMPLES:
            counts = infinity_counts(n, int(fd_infinity.get("points", 5)),
                                     float(fd_infinity.get("min_fraction", 0.25)))  # fmt: skip
            inf = frechet_infinity(gen[layers["fid"]], ref, counts, seed=FIDELITY_SEED)
            derived[f"{fd}_inf"] = inf["value"]
            protocol["fd_infinity"] = {"counts": counts, "fit": "least squares FD_N = FD_inf "
                                       "+ slope / N (Chong & Forsyth 2020)",
                                       f"{fd}_at_counts": inf["fd"]}  # fmt: skip
        elif fd_infinity:
            protocol["fd_infinity"] = f"not computed: fewer than {MIN_INFINITY_SAMPLES} samples"
        if bootstrap:
            boot = bootstrap_fd(gen[layers["fid"]], ref, int(bootstrap), seed=FIDELITY_SEED)
            derived[f"{fd}_ci_low"], derived[f"{fd}_ci_high"] = boot["low"], boot["high"]
            protocol["bootstrap"] = {"rounds": boot["rounds"], "interval": "2.5-97.5 percentile "
                                     "of the FD of resampled generated features",
                                     "std": boot["std"]}  # fmt: skip
    if "kid" in want and "kid" in layers:
        out.update(
            kid_features_to_metric(
                gen[layers["kid"]],
                real[layers["kid"]],
                kid_subsets=kid_subsets,
                kid_subset_size=kid_subset_size,
                rng_seed=FIDELITY_SEED,
                verbose=False,
            )
        )
    if "is" in want and "isc" in layers:
        out.update(isc_features_to_metric(gen[layers["isc"]], isc_splits, True, FIDELITY_SEED))
    if "pr" in want:
        out.update(
            prc_features_to_metric(
                gen[layers["prc"]],
                real[layers["prc"]],
                prc_neighborhood=prc_neighborhood,
                save_cpu_ram=False,
                verbose=False,
            )
        )
    if "dc" in want and "prc" in layers:
        out.update(_density_coverage(real[layers["prc"]], gen[layers["prc"]], dc_neighborhood,
                                     layers["prc"], protocol))  # fmt: skip
    if "cmmd" in want and "cmmd" in layers and len(gen[layers["cmmd"]]) >= 2:
        out["cmmd"] = cmmd(gen[layers["cmmd"]], real[layers["cmmd"]])
        protocol["cmmd"] = {"sigma": CMMD_SIGMA, "scale": CMMD_SCALE,
                            "estimator": "unbiased MMD^2, Gaussian RBF"}  # fmt: skip
    named = {names[k]: float(v) for k, v in out.items() if k in names}
    return {**named, **derived}


def _density_coverage(pool: torch.Tensor, fake: torch.Tensor, k: int, layer: str,
                      protocol: dict) -> dict[str, float]:  # fmt: skip
    """Density and coverage of ``fake`` against a fixed random subset of as many reference
    features (Naeem et al. compare equal counts: coverage depends on the ratio; seeded), or
    nothing when either side has at most k features."""
    if min(len(pool), len(fake)) <= k:
        return {}
    real = pool
    if len(pool) > len(fake):
        g = torch.Generator().manual_seed(FIDELITY_SEED)
        real = pool[torch.randperm(len(pool), generator=g)[: len(fake)]]
    protocol["density_coverage"] = {
        "neighbours": k,
        "features": layer,
        "real": f"{len(real)} of {len(pool)} reference features (seed {FIDELITY_SEED})",
    }
    return density_coverage(real, fake, k)


class TensorReference:
    """Fixed uint8 images (N, C, H, W) as the reference "dataset" (the part of the DataModule
    contract the evaluator uses: ``name``, ``image_shape``, ``load_split``, ``cache_fields``).
    ``tag`` names the set in the cache key; the same tag must mean the same images."""

    def __init__(self, images: torch.Tensor, name: str = "tensor", tag: str = ""):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}"
            )
        self.images, self.name, self.tag = images, name, tag
        self.image_shape = tuple(images.shape[1:])

    def load_split(self, split: str) -> TensorDataset:
        return TensorDataset(self.images, torch.zeros(len(self.images), dtype=torch.long))

    def cache_fields(self, split: str) -> dict:
        return {"name": self.name, "tag": self.tag, "n": len(self.images), "split": split}
