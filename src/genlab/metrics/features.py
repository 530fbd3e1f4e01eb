"""Features of uint8 images, torchmetrics style, and the cache of reference statistics.

- ``extract_features(ext, images)``: one extractor's features of uint8 (N, C, H, W) images, in
  batches, as {layer: (N, D) float32 on the CPU}.
- ``FeatureStats``: what an evaluation keeps of its images, per extractor: ``update(images)``
  with each chunk as it comes (so memory is bounded by the features, not the images),
  ``compute()`` -> the features of all of them, ``reset()``.
- ``ReferenceCache``: features and FID mean/covariance (where the extractor serves FD) of a
  dataset's reference split, computed once and kept in memory and on disk under
  ``<cache_dir>/reference``, keyed by the dataset's fields (name, split, resolution, file
  fingerprint), the number of images, the extractor and the sha256 of its weights; a second
  evaluation costs only the generated side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch_fidelity.metric_fid import fid_features_to_statistics
from tqdm.auto import tqdm

from genlab.data.convert import to_rgb_uint8
from genlab.metrics.extractors import Extractor
from genlab.runs import atomic_torch_save

log = logging.getLogger("genlab")


@torch.no_grad()
def extract_features(
    ext: Extractor,
    images: torch.Tensor,
    batch_size: int = 64,
    desc: str | None = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """uint8 (N, C, H, W), C in {1, 3} -> {layer: (N, D) float32 on the CPU}, ``batch_size``
    images per extractor call on the extractor's device; a progress bar named ``desc``."""
    device = next(iter(ext.module.buffers()), torch.empty(0)).device
    starts = range(0, len(images), batch_size)
    if desc is not None:
        starts = tqdm(starts, desc=desc, leave=False, disable=not progress)
    chunks = [
        ext.module.convert_features_tuple_to_dict(
            ext.module(to_rgb_uint8(images[i : i + batch_size]).to(device))
        )
        for i in starts
    ]
    return {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}


class FeatureStats:
    """The features of every image ``update`` was given, through one extractor."""

    def __init__(self, extractor: Extractor, batch_size: int = 64):
        self.extractor, self.batch_size = extractor, int(batch_size)
        self.reset()

    def reset(self) -> None:
        self._parts: list[dict[str, torch.Tensor]] = []
        self.num_images = 0

    def update(self, images: torch.Tensor) -> None:
        """Add uint8 images (B, C, H, W)."""
        self._parts.append(extract_features(self.extractor, images, self.batch_size))
        self.num_images += len(images)

    def compute(self) -> dict[str, torch.Tensor]:
        """{layer: (N, D)} of the N images so far."""
        if not self._parts:
            raise ValueError(f"no images were given to the {self.extractor.key} features")
        return {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}


class ReferenceCache:
    """Reference statistics {features, mu, sigma, num_images, subset, cache_file} per extractor
    and dataset split: from memory, from ``cache_dir`` (None: memory only), or computed.
    ``counters`` says which of the three each request was."""

    def __init__(self, cache_dir: str | Path | None = None, batch_size: int = 64,
                 progress: bool = True):  # fmt: skip
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.progress = int(batch_size), progress
        self.counters = {"reference_computed": 0, "reference_loaded": 0, "reference_reused": 0}
        self._memory: dict[str, dict] = {}

    def get(self, ext: Extractor, datamodule, split: str, samples: int | None) -> dict:
        """Statistics of ``samples`` images of ``datamodule``'s ``split`` (None: all of it;
        else a fixed random subset, seed 0) through ``ext``."""
        fields = {
            "data": datamodule.cache_fields(split),
            "reference_samples": samples,
            "extractor": ext.module.get_name(),
            "weights_sha256": ext.weights_sha256,
            "layers": sorted(set(ext.layers.values())),
            "version": 1,
        }
        key = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        if key in self._memory:
            self.counters["reference_reused"] += 1
            return self._memory[key]
        shape = "x".join(str(s) for s in datamodule.image_shape)
        n_tag = "all" if samples is None else str(samples)
        name = f"{datamodule.name}-{split}-{shape}-{ext.key}-n{n_tag}-{key[:12]}.pt"
        path = self.cache_dir / "reference" / name if self.cache_dir else None
        if path is not None and path.exists():
            ref = torch.load(path, map_location="cpu", weights_only=True)
            self.counters["reference_loaded"] += 1
        else:
            ref = self._compute(ext, datamodule, split, samples)
            self.counters["reference_computed"] += 1
            if path is not None:
                atomic_torch_save(ref, path)
        ref["cache_file"] = str(path) if path else None
        self._memory[key] = ref
        return ref

    def _compute(self, ext: Extractor, datamodule, split: str, samples: int | None) -> dict:
        images, subset = reference_images(datamodule, split, samples)
        if self.progress:
            log.info("reference features: %d %s images (%s)", len(images), split, ext.key)
        desc = f"eval: reference features ({ext.key})"
        feats = extract_features(ext, images, self.batch_size, desc, self.progress)
        ref = {"features": feats, "num_images": len(images), "subset": subset}
        if "fid" in ext.layers:  # FD's statistics (a CLIP space serves CMMD only)
            stats = fid_features_to_statistics(feats[ext.layers["fid"]])
            ref.update(mu=torch.from_numpy(stats["mu"]), sigma=torch.from_numpy(stats["sigma"]))
        return ref


def reference_images(datamodule, split: str, samples: int | None) -> tuple[torch.Tensor, str]:
    """uint8 images of the split (a fixed random subset of ``samples``, seed 0, in index order,
    when the split is larger) and how they were chosen."""
    images = datamodule.load_split(split).tensors[0]
    if samples is None or samples >= len(images):
        return images, "all"
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:samples]
    return images[idx.sort().values], f"fixed random subset of {len(images)} (seed 0)"


__all__ = ["FeatureStats", "ReferenceCache", "extract_features", "reference_images"]
