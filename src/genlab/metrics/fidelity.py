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

# torch-fidelity result key -> metric name, per extractor (digit numbers get their own names)
NAMES = {
    "inception": {
        KEY_METRIC_FID: "fid",
        KEY_METRIC_KID_MEAN: "kid_mean",
        KEY_METRIC_KID_STD: "kid_std",
        KEY_METRIC_ISC_MEAN: "is_mean",
        KEY_METRIC_ISC_STD: "is_std",
        KEY_METRIC_PRECISION: "precision",
        KEY_METRIC_RECALL: "recall",
    },
    "digits": {
        KEY_METRIC_FID: "fd_digits",
        KEY_METRIC_KID_MEAN: "kid_digits_mean",
        KEY_METRIC_KID_STD: "kid_digits_std",
        KEY_METRIC_ISC_MEAN: "is_digits",
        KEY_METRIC_ISC_STD: "is_digits_std",
        KEY_METRIC_PRECISION: "precision_digits",
        KEY_METRIC_RECALL: "recall_digits",
    },
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
) -> dict[str, float]:
    """FID / KID / IS / PR by torch-fidelity's own functions, generated features ``gen``
    ({layer: (N, D)}) against a reference ({"features": {layer: (M, D)}, "mu", "sigma"}),
    named for the extractor ``key`` (``NAMES``). ``layers`` maps fid/kid/isc/prc to layers."""
    out: dict[str, float] = {}
    real = ref["features"]
    if "fid" in metrics:
        stats_gen = fid_features_to_statistics(gen[layers["fid"]])
        stats_ref = {"mu": ref["mu"].numpy(), "sigma": ref["sigma"].numpy()}
        out.update(fid_statistics_to_metric(stats_gen, stats_ref, verbose=False))
    if "kid" in metrics:
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
    if "is" in metrics:
        out.update(isc_features_to_metric(gen[layers["isc"]], isc_splits, True, FIDELITY_SEED))
    if "pr" in metrics:
        out.update(
            prc_features_to_metric(
                gen[layers["prc"]],
                real[layers["prc"]],
                prc_neighborhood=prc_neighborhood,
                save_cpu_ram=False,
                verbose=False,
            )
        )
    return {NAMES[key][k]: float(v) for k, v in out.items() if k in NAMES[key]}


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
