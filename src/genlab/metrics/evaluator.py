"""The evaluation protocol on images and features: one ``Evaluator`` (its settings and what
is worth keeping between evaluations: the built extractors and the reference statistics)
used by ``genlab.evaluation`` for models and by ``python -m genlab.evaluate`` for images. It
never sees a model: sampling one for evaluation is ``genlab.evaluation.evaluate_model``.

- Sample quality: FID, KID, Inception Score and precision/recall computed by torch-fidelity's
  own functions on features of uint8 images held in memory (never PNG files). Images arrive in
  chunks and are turned into features as they come, so memory is bounded by the features.
- Reference statistics (features and FID mean/covariance of the real split) are computed once
  and cached on disk under ``<cache_dir>/reference``, keyed by dataset, split, resolution, the
  dataset's file fingerprint, the number of images, the extractor and the sha256 of its
  weights; a second evaluation costs only the generated side.
- CLIP score of the images against ``clip.prompts`` (or, for guided samples, their own).

Every result comes with the protocol that produced it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics
from tqdm.auto import tqdm

from genlab.data.convert import to_model, to_rgb_uint8
from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.extractors import Extractor, build_extractor
from genlab.metrics.fidelity import fidelity_metrics
from genlab.runs import atomic_torch_save

log = logging.getLogger("genlab")

METRICS = ("fid", "kid", "is", "pr", "bpd", "cost", "clip")
FIDELITY = ("fid", "kid", "is", "pr")


class Evaluator:
    """Args:
    metrics: any of fid, kid, is, pr (sample quality), bpd (likelihood families), cost
        (sampling speed), clip (CLIP score of the samples against ``clip.prompts``).
    extractors: ``inception`` and/or ``digits`` (the latter only on ``digit_datasets``).
    num_samples: generated images per evaluation.
    sample_batch_size: images per ``sample()`` call. batch_size: images per extractor call.
    reference_split / reference_samples: the real images the samples are compared with; a
        fixed random subset (seed 0) when the split is larger, all of it when null.
    kid_subset_size / kid_subsets / isc_splits / prc_neighborhood: torch-fidelity's settings
        (the subset size is capped by the number of images; the protocol records it).
    bpd_images / bpd_batch_size: validation images for bits/dim and their batch size.
    seed: seeds the generated side (same noise at every evaluation).
    use_ema: sample with EMA weights where the family has them.
    inception_weights / digits_weights: local weight files (None: default location).
    cache_dir: where reference statistics are cached (None: not cached on disk).
    clip: {model, pretrained, prompts} for the ``clip`` metric.
    on_missing_weights: ``warn`` (training: go on, record it) or ``raise`` (evaluate CLI).
    """

    def __init__(
        self,
        metrics: Iterable[str] = ("fid", "kid", "is", "pr", "bpd", "cost"),
        extractors: Iterable[str] = ("inception", "digits"),
        num_samples: int = 5000,
        sample_batch_size: int = 250,
        batch_size: int = 64,
        reference_split: str = "train",
        reference_samples: int | None = 10000,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        isc_splits: int = 10,
        prc_neighborhood: int = 3,
        bpd_images: int = 1000,
        bpd_batch_size: int = 64,
        seed: int = 0,
        use_ema: bool = True,
        inception_weights: str | None = None,
        digits_weights: str | None = None,
        digit_datasets: Iterable[str] = ("mnist",),
        cache_dir: str | None = None,
        clip: dict | None = None,
        on_missing_weights: str = "warn",
        progress: bool = True,
    ):
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}: choose from {list(METRICS)}")
        if on_missing_weights not in ("warn", "raise"):
            raise ValueError("on_missing_weights must be warn or raise")
        self.metrics = list(metrics)
        self.extractor_keys = list(extractors)
        self.num_samples = int(num_samples)
        self.sample_batch_size = int(sample_batch_size)
        self.batch_size = int(batch_size)
        self.reference_split = reference_split
        self.reference_samples = reference_samples
        self.kid_subset_size, self.kid_subsets = int(kid_subset_size), int(kid_subsets)
        self.isc_splits, self.prc_neighborhood = int(isc_splits), int(prc_neighborhood)
        self.bpd_images, self.bpd_batch_size = int(bpd_images), int(bpd_batch_size)
        self.seed, self.use_ema = int(seed), bool(use_ema)
        self.weights = {"inception": inception_weights, "digits": digits_weights}
        self.digit_datasets = set(digit_datasets)
        self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else None
        self.clip_cfg = dict(clip or {})
        self.on_missing_weights = on_missing_weights
        self.progress = progress
        self.extractors: list[Extractor] | None = None
        self.not_computed: dict[str, str] = {}
        self.counters = {"reference_computed": 0, "reference_loaded": 0, "reference_reused": 0}
        self._references: dict[str, dict] = {}
        self._clip = None

    @classmethod
    def from_config(cls, cfg, **overrides) -> Evaluator:
        """From a ``metrics`` config node (extra keys such as ``every_n_steps`` are ignored)."""
        params = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in dict(cfg).items() if k in params}
        kwargs.update(overrides)
        for key in ("metrics", "extractors", "digit_datasets"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = list(kwargs[key])
        if kwargs.get("clip") is not None:
            kwargs["clip"] = dict(kwargs["clip"])
        return cls(**kwargs)

    # ------------------------------------------------------------------ extractors
    def _missing(self, what: str, err: Exception) -> None:
        if self.on_missing_weights == "raise":
            raise err
        self.not_computed[what] = str(err)
        log.warning("%s -- %s metrics are not computed for this run", err, what)

    def setup(self, dataset: str, device: torch.device | str = "cpu") -> list[Extractor]:
        """Build the extractors once (on ``device``); missing weights warn or raise."""
        if self.extractors is not None:
            for ext in self.extractors:
                ext.module.to(device)
            return self.extractors
        self.extractors = []
        if not any(m in FIDELITY for m in self.metrics):
            return self.extractors
        for key in self.extractor_keys:
            if key == "digits" and dataset not in self.digit_datasets:
                self.not_computed["digits"] = f"{dataset} is not a digit dataset"
                continue
            try:
                self.extractors.append(build_extractor(key, self.weights.get(key), device))
            except WeightsNotFoundError as err:
                self._missing(key, err)
        return self.extractors

    # ------------------------------------------------------------------ features
    @torch.no_grad()
    def features(
        self, ext: Extractor, images: torch.Tensor, desc: str | None = None
    ) -> dict[str, torch.Tensor]:
        """uint8 (N, C, H, W) -> {layer: (N, D) float32 on the CPU}; a progress bar if desc."""
        device = next(iter(ext.module.buffers()), torch.empty(0)).device
        starts = range(0, len(images), self.batch_size)
        if desc is not None:
            starts = tqdm(starts, desc=desc, leave=False, disable=not self.progress)
        chunks = [
            ext.module.convert_features_tuple_to_dict(
                ext.module(to_rgb_uint8(images[i : i + self.batch_size]).to(device))
            )
            for i in starts
        ]
        return {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}

    def _reference_images(self, datamodule) -> tuple[torch.Tensor, str]:
        images = datamodule.load_split(self.reference_split).tensors[0]
        n = self.reference_samples
        if n is None or n >= len(images):
            return images, "all"
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        return images[idx.sort().values], f"fixed random subset of {len(images)} (seed 0)"

    def reference(self, ext: Extractor, datamodule) -> dict:
        """Features and FID statistics of the reference split, from memory, disk, or computed."""
        split = self.reference_split
        fields = {
            "data": datamodule.cache_fields(split),
            "reference_samples": self.reference_samples,
            "extractor": ext.module.get_name(),
            "weights_sha256": ext.weights_sha256,
            "layers": sorted(set(ext.layers.values())),
            "version": 1,
        }
        key = hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        if key in self._references:
            self.counters["reference_reused"] += 1
            return self._references[key]
        shape = "x".join(str(s) for s in datamodule.image_shape)
        n_tag = "all" if self.reference_samples is None else str(self.reference_samples)
        name = f"{datamodule.name}-{split}-{shape}-{ext.key}-n{n_tag}-{key[:12]}.pt"
        path = self.cache_dir / "reference" / name if self.cache_dir else None
        if path is not None and path.exists():
            ref = torch.load(path, map_location="cpu", weights_only=True)
            self.counters["reference_loaded"] += 1
        else:
            images, subset = self._reference_images(datamodule)
            if self.progress:
                log.info("reference features: %d %s images (%s)", len(images), split, ext.key)
            feats = self.features(ext, images, desc=f"eval: reference features ({ext.key})")
            stats = fid_features_to_statistics(feats[ext.layers["fid"]])
            ref = {
                "features": feats,
                "mu": torch.from_numpy(stats["mu"]),
                "sigma": torch.from_numpy(stats["sigma"]),
                "num_images": len(images),
                "subset": subset,
            }
            self.counters["reference_computed"] += 1
            if path is not None:
                atomic_torch_save(ref, path)
        ref["cache_file"] = str(path) if path else None
        self._references[key] = ref
        return ref

    # ------------------------------------------------------------------ metric math
    def fidelity(self, ext: Extractor, gen: dict[str, torch.Tensor], ref: dict) -> dict:
        """torch-fidelity's FID / KID / IS / PR on generated features vs the reference."""
        n_gen = len(next(iter(gen.values())))
        return fidelity_metrics(
            ext.key,
            ext.layers,
            gen,
            ref,
            metrics=self.metrics,
            kid_subsets=self.kid_subsets,
            kid_subset_size=self.kid_size(n_gen, ref["num_images"]),
            isc_splits=self.isc_splits,
            prc_neighborhood=self.prc_neighborhood,
        )

    def kid_size(self, n_gen: int, n_ref: int) -> int:
        return min(self.kid_subset_size, n_gen, n_ref)

    # ------------------------------------------------------------------ the generated side
    def _consume(self, chunks: Iterable[torch.Tensor], exts: list[Extractor], guided=None) -> dict:
        feats: dict[str, list[dict]] = {ext.key: [] for ext in exts}
        clip_scores = []
        count = 0
        for images in chunks:
            for ext in exts:
                feats[ext.key].append(self.features(ext, images))
            if self._clip is not None or guided is not None:
                clip_scores.append(self._clip_pairs(images, count, guided))
            count += len(images)
        merged = {
            key: {layer: torch.cat([c[layer] for c in parts]) for layer in parts[0]}
            for key, parts in feats.items()
            if parts
        }
        return {"features": merged, "clip": torch.cat(clip_scores) if clip_scores else None}

    # ------------------------------------------------------------------ CLIP score
    def _setup_clip(self, device) -> None:
        if "clip" not in self.metrics or self._clip is not None or "clip" in self.not_computed:
            return
        if not self.clip_cfg.get("prompts"):
            self.not_computed["clip"] = "no prompts (metrics.clip.prompts)"
            return
        from genlab.metrics.clip import CLIPScore

        try:
            self._clip = CLIPScore(
                model=self.clip_cfg.get("model", "ViT-B-32"),
                pretrained=self.clip_cfg.get("pretrained", "openai"),
                device=device,
            )
        except WeightsNotFoundError as err:
            self._missing("clip", err)

    def _clip_pairs(self, images: torch.Tensor, offset: int, guided=None) -> torch.Tensor:
        """Per-image CLIP scores. Samples guided toward prompts are scored by the guiding CLIP
        against the prompt each was steered toward (one chunk is one ``sample`` call, and the
        guidance says which prompt each of its images got); others against
        ``clip.prompts``, cycled over all the samples."""
        if guided is not None:
            clip, pair = guided(len(images))
        else:
            clip, prompts = self._clip, list(self.clip_cfg["prompts"])
            pair = [prompts[(offset + i) % len(prompts)] for i in range(len(images))]
        with torch.no_grad():
            return clip.score_pairs(to_model(images).to(clip.device), pair).cpu()

    # ------------------------------------------------------------------ entry points
    def _fidelity_results(self, exts, consumed, datamodule) -> tuple[dict, dict]:
        metrics, ext_protocol = {}, {}
        for ext in exts:
            ref = self.reference(ext, datamodule)
            metrics.update(self.fidelity(ext, consumed["features"][ext.key], ref))
            n_gen = len(next(iter(consumed["features"][ext.key].values())))
            ext_protocol[ext.key] = {
                **ext.protocol(),
                "kid_subset_size": self.kid_size(n_gen, ref["num_images"]),
                "reference_images": ref["num_images"],
                "reference_subset": ref["subset"],
                "reference_cache": ref["cache_file"],
            }
        if consumed["clip"] is not None:
            metrics["clip_score"] = consumed["clip"].mean().item()
        return metrics, ext_protocol

    def _annotate(self, protocol: dict, guided=None) -> None:
        if guided is not None:
            protocol["clip"] = {
                **guided(0)[0].protocol(),
                "prompts": "each sample's own guidance prompt (sampler.guidance.prompts)",
                "scorer": "the guiding CLIP: guided samples score high on it by construction",
            }
        elif self._clip is not None:
            protocol["clip"] = {**self._clip.protocol(), "prompts": list(self.clip_cfg["prompts"])}
        protocol["not_computed"] = dict(self.not_computed)

    def base_protocol(self, datamodule, n: int) -> dict:
        return {
            "num_samples": n,
            "seed": self.seed,
            "reference": {"dataset": datamodule.name, "split": self.reference_split},
            "kid_subsets": self.kid_subsets,  # subset size: per extractor (capped by N)
            "is_splits": self.isc_splits,
            "pr_neighborhood": self.prc_neighborhood,
            "torch_fidelity": torch_fidelity.__version__,
        }

    def prepare(self, dataset: str, device, guided=None) -> bool:
        """Build what the configured metrics need on ``device`` (extractors, CLIP); True when
        they need images at all (features, CLIP scores or the sampling cost)."""
        exts = self.setup(dataset, device)
        self._setup_clip(device)
        if guided is not None:
            self.not_computed.pop("clip", None)
        return bool(exts or self._clip is not None or guided is not None or "cost" in self.metrics)

    def score(self, chunks: Iterable[torch.Tensor], datamodule, n: int, guided=None):
        """Metrics of uint8 image chunks (N, C, H, W) against the dataset's reference split:
        ``({name: value}, protocol)``; ``guided(n) -> (CLIP scorer, prompts)`` scores samples
        steered toward prompts against their own. Call ``prepare`` first."""
        exts = self.extractors or []
        consumed = self._consume(chunks, exts, guided)
        protocol = self.base_protocol(datamodule, n)
        metrics, protocol["extractors"] = self._fidelity_results(exts, consumed, datamodule)
        return metrics, protocol

    def finish(self, protocol: dict, guided=None) -> dict:
        """The protocol with what the CLIP score used and what was not computed."""
        self._annotate(protocol, guided)
        return protocol

    def evaluate_images(self, images: torch.Tensor, datamodule, device="cpu") -> dict:
        """Metrics of given uint8 images (N, C, H, W) (samples from any tool) vs the dataset."""
        start = time.perf_counter()
        self.prepare(datamodule.name, device)
        chunks = (
            images[i : i + self.sample_batch_size]
            for i in range(0, len(images), self.sample_batch_size)
        )
        metrics, protocol = self.score(chunks, datamodule, len(images))
        return {
            "metrics": {f"val/{k}": v for k, v in metrics.items()},
            "protocol": self.finish(protocol),
            "time_s": time.perf_counter() - start,
        }
