"""The evaluation protocol on images; it never sees a model (sampling one for evaluation is
``genlab.evaluation.evaluate_model``, which is handed the caller's ``Evaluator``).

- ``Evaluator``: the ``metrics`` config group's settings, checked, and what is worth building
  once: the feature extractors, the CLIP scorer, the reference statistics
  (``genlab.metrics.features.ReferenceCache``). Missing weights warn once and are recorded
  (``not_computed``), or raise.
- ``ImageMetrics``: one evaluation, torchmetrics style: ``update(images)`` with each uint8 chunk
  as it comes, ``compute(datamodule)`` -> ({name: value}, protocol): FID / KID / IS / PR by
  torch-fidelity's own functions against the reference split (``genlab.metrics.fidelity``),
  and ``clip_score`` against ``clip.prompts`` cycled over the images, or each chunk's own.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch_fidelity

from genlab.data.convert import to_model
from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.extractors import Extractor, build_extractor
from genlab.metrics.features import FeatureStats, ReferenceCache, extract_features
from genlab.metrics.fidelity import fidelity_metrics

log = logging.getLogger("genlab")

METRICS = ("fid", "kid", "is", "pr", "dc", "cmmd", "bpd", "bpd_ode", "cost", "clip")
FIDELITY = ("fid", "kid", "is", "pr", "dc", "cmmd")
DIGIT_SPACES = ("digits", "clip_digits")  # extractors that only fit digit datasets


class Evaluator:
    """Args:
    metrics: any of fid, kid, is, pr, dc (density/coverage), cmmd (sample quality; cmmd on
        the CLIP extractors), bpd (models with a likelihood), cost (sampling speed), clip (CLIP
        score of the samples against ``clip.prompts``).
    extractors: any of ``genlab.metrics.extractors.EXTRACTORS``: inception, dinov2 and clip
        anywhere; digits and clip_digits only on ``digit_datasets``, faces only on
        ``face_datasets``.
    repeats: K sample sets (seeds ``seed`` .. ``seed + K - 1``): every sample metric is their
        mean and ``<name>_std`` their standard deviation.
    fd_infinity: {points, min_fraction} of FD-infinity (Chong & Forsyth 2020) for every
        Frechet distance, or None. bootstrap: rounds of a bootstrap interval of every FD (0: off).
    dinov2: {model, weights} of the DINOv2 extractor. cmmd_clip: {model, pretrained} of the
        open_clip model of the ``clip`` extractor (CMMD). faces_weights: the face extractor.
    num_samples: generated images per evaluation.
    sample_batch_size: images per ``sample()`` call. batch_size: images per extractor call.
    reference_split / reference_samples: the real images the samples are compared with; a
        fixed random subset (seed 0) when the split is larger, all of it when null.
    kid_subset_size / kid_subsets / isc_splits / prc_neighborhood: torch-fidelity's settings
        (the subset size is capped by the number of images; the protocol records it).
    dc_neighborhood: k of density/coverage (Naeem et al. 2020 use 5).
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
        dc_neighborhood: int = 5,
        bpd_images: int = 1000,
        bpd_batch_size: int = 64,
        seed: int = 0,
        use_ema: bool = True,
        inception_weights: str | None = None,
        digits_weights: str | None = None,
        digit_datasets: Iterable[str] = ("mnist",),
        face_datasets: Iterable[str] = ("celeba",),
        faces_weights: str | None = None,
        dinov2: dict | None = None,
        cmmd_clip: dict | None = None,
        repeats: int = 1,
        fd_infinity: dict | None = None,
        bootstrap: int = 0,
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
        self.dc_neighborhood = int(dc_neighborhood)
        self.bpd_images, self.bpd_batch_size = int(bpd_images), int(bpd_batch_size)
        self.seed, self.use_ema = int(seed), bool(use_ema)
        dinov2, cmmd_clip = dict(dinov2 or {}), dict(cmmd_clip or {})
        self.weights = {"inception": inception_weights, "digits": digits_weights,
                        "faces": faces_weights, "dinov2": dinov2.pop("weights", None)}  # fmt: skip
        self.options = {"dinov2": dinov2, "clip": cmmd_clip}
        self.digit_datasets, self.face_datasets = set(digit_datasets), set(face_datasets)
        if int(repeats) < 1:
            raise ValueError(f"metrics.repeats must be >= 1, got {repeats}")
        self.repeats, self.bootstrap = int(repeats), int(bootstrap)
        self.fd_infinity = dict(fd_infinity) if fd_infinity else None
        self.cache_dir = Path(os.path.expanduser(cache_dir)) if cache_dir else None
        self.clip_cfg = dict(clip or {})
        self.on_missing_weights = on_missing_weights
        self.progress = progress
        # built once, kept between evaluations
        self.not_computed: dict[str, str] = {}  # what could not be built, and why
        self.references = ReferenceCache(self.cache_dir, self.batch_size, progress)
        self._extractors: dict[str, Extractor] = {}
        self._clip = None

    @classmethod
    def from_config(cls, cfg, **overrides) -> Evaluator:
        """From a ``metrics`` config node (extra keys such as ``every_n_steps`` are ignored)."""
        params = inspect.signature(cls).parameters
        kwargs = {k: v for k, v in dict(cfg).items() if k in params}
        kwargs.update(overrides)
        for key in ("metrics", "extractors", "digit_datasets", "face_datasets"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = list(kwargs[key])
        for key in ("clip", "dinov2", "cmmd_clip", "fd_infinity"):
            if kwargs.get(key) is not None:
                kwargs[key] = dict(kwargs[key])
        return cls(**kwargs)

    # ------------------------------------------------------------------ built once
    @property
    def extractors(self) -> list[Extractor]:
        """The extractors built so far."""
        return list(self._extractors.values())

    @property
    def counters(self) -> dict[str, int]:
        """How often reference statistics were computed, loaded from disk, reused in memory."""
        return self.references.counters

    def _missing(self, what: str, err: Exception) -> None:
        if self.on_missing_weights == "raise":
            raise err
        self.not_computed[what] = str(err)
        log.warning("%s -- %s metrics are not computed for this run", err, what)

    def setup(self, dataset: str, device: torch.device | str = "cpu") -> list[Extractor]:
        """The configured extractors that apply to ``dataset`` (``applies``), each built once
        and moved to ``device``; missing weights warn once or raise."""
        if not any(m in FIDELITY for m in self.metrics):
            return []
        out = []
        for key in self.extractor_keys:
            if key in self.not_computed or self.applies(key, dataset) is not True:
                continue
            if key not in self._extractors:
                try:
                    self._extractors[key] = build_extractor(
                        key, self.weights.get(key), device, self.options.get(key)
                    )
                except WeightsNotFoundError as err:
                    self._missing(key, err)
                    continue
            out.append(self._extractors[key])
            out[-1].module.to(device)
        return out

    def applies(self, key: str, dataset: str) -> bool | str:
        """True when extractor ``key`` fits ``dataset``, else why not."""
        if key in DIGIT_SPACES and dataset not in self.digit_datasets:
            return f"{dataset} is not a digit dataset (metrics.digit_datasets)"
        if key == "faces" and dataset not in self.face_datasets:
            return f"{dataset} is not a face dataset (metrics.face_datasets)"
        return True

    def clip_scorer(self, device: torch.device | str = "cpu"):
        """The CLIP that scores images against ``clip.prompts`` (built once on ``device``);
        None when the clip metric is off, has no prompts or its weights are missing."""
        if "clip" not in self.metrics or not self.clip_cfg.get("prompts"):
            return None
        if self._clip is None and "clip" not in self.not_computed:
            from genlab.metrics.clip import CLIPScore  # open_clip is imported when needed

            try:
                self._clip = CLIPScore(
                    model=self.clip_cfg.get("model", "ViT-B-32"),
                    pretrained=self.clip_cfg.get("pretrained", "openai"),
                    device=device,
                )
            except WeightsNotFoundError as err:
                self._missing("clip", err)
        return self._clip

    def unavailable(self, dataset: str) -> dict[str, str]:
        """What this evaluator cannot compute on ``dataset``, with reasons
        (``protocol.not_computed``)."""
        out = dict(self.not_computed)
        fidelity = any(m in FIDELITY for m in self.metrics)
        for key in self.extractor_keys if fidelity else ():
            if self.applies(key, dataset) is not True:
                out[key] = self.applies(key, dataset)
        if "clip" in self.metrics and not self.clip_cfg.get("prompts"):
            out["clip"] = "no prompts (metrics.clip.prompts)"
        return out

    def reference(self, ext: Extractor, datamodule) -> dict:
        """Features and FID statistics of the reference split (``ReferenceCache.get``)."""
        return self.references.get(ext, datamodule, self.reference_split, self.reference_samples)

    def features(self, ext: Extractor, images: torch.Tensor, desc: str | None = None) -> dict:
        """uint8 (N, C, H, W) -> {layer: (N, D) float32 on the CPU}; a progress bar if desc."""
        return extract_features(ext, images, self.batch_size, desc, self.progress)

    # ------------------------------------------------------------------ one evaluation
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

    def image_metrics(
        self, dataset: str, device="cpu", clip: bool = True, first: int = 0
    ) -> ImageMetrics:
        """A fresh accumulator for one evaluation of images compared with ``dataset``;
        ``clip=False``: no scorer for ``clip.prompts`` (the images bring their own); ``first``:
        the index of the first image it will be given (a rank's block of a shared request)."""
        scorer = self.clip_scorer(device) if clip else None
        return ImageMetrics(self, self.setup(dataset, device), scorer, first)

    def evaluate_images(self, images: torch.Tensor, datamodule, device="cpu") -> dict:
        """Metrics of given uint8 images (N, C, H, W) (samples from any tool) vs the dataset:
        {"metrics": {"val/<name>": value}, "protocol", "time_s"}."""
        start = time.perf_counter()
        scores = self.image_metrics(datamodule.name, device)
        for i in range(0, len(images), self.sample_batch_size):
            scores.update(images[i : i + self.sample_batch_size])
        metrics, protocol = scores.compute(datamodule)
        return {
            "metrics": {f"val/{k}": v for k, v in metrics.items()},
            "protocol": protocol,
            "time_s": time.perf_counter() - start,
        }


class ImageMetrics:
    """The configured metrics of one stream of uint8 images: features per extractor and
    per-image CLIP scores, nothing else (the extractors, scorer and reference statistics are
    the ``Evaluator``'s)."""

    def __init__(
        self, evaluator: Evaluator, extractors: Sequence[Extractor], clip=None, first: int = 0
    ):
        self.evaluator, self.clip, self.first = evaluator, clip, int(first)
        self.stats = [FeatureStats(ext, evaluator.batch_size) for ext in extractors]
        self.reset()

    def reset(self) -> None:
        for stats in self.stats:
            stats.reset()
        self.clip_scores: list[torch.Tensor] = []
        self.num_images = 0

    def update(self, images: torch.Tensor, clip_targets: tuple | None = None) -> None:
        """Add uint8 images (B, C, H, W). ``clip_targets`` = (CLIP scorer, B prompts) scores
        each image against its own prompt (samples guided toward prompts); otherwise, with a
        scorer, the images are scored against ``clip.prompts``, cycled over all of them."""
        for stats in self.stats:
            stats.update(images)
        if clip_targets is None and self.clip is not None:
            prompts = list(self.evaluator.clip_cfg["prompts"])
            pair = [
                prompts[(self.first + self.num_images + i) % len(prompts)]
                for i in range(len(images))
            ]
            clip_targets = (self.clip, pair)
        if clip_targets is not None:
            clip, pair = clip_targets
            with torch.no_grad():
                scores = clip.score_pairs(to_model(images).to(clip.device), pair)
            self.clip_scores.append(scores.cpu())
        self.num_images += len(images)

    def gather(self, ranks) -> None:
        """Every rank's features and CLIP scores, in index order, on every rank
        (``genlab.metrics.ranks.Ranks``; a rank may have had no images); nothing to do for
        one process."""
        if not ranks.shared:
            return
        for stats in self.stats:
            mine = stats.compute() if stats.num_images else None
            layout = {k: (tuple(v.shape[1:]), v.dtype) for k, v in (mine or {}).items()}
            layout = next(x for x in ranks.gather_object(layout) if x)  # some rank has images
            empty = {
                k: torch.zeros((0, *shape), dtype=dtype) for k, (shape, dtype) in layout.items()
            }
            features = mine or empty
            stats._parts = [{k: ranks.gather(features[k]) for k in sorted(layout)}]
            stats.num_images = len(stats._parts[0][sorted(layout)[0]])
        if any(ranks.gather_object(bool(self.clip_scores))):
            mine = torch.cat(self.clip_scores) if self.clip_scores else torch.zeros(0)
            self.clip_scores = [ranks.gather(mine)]
        self.num_images = sum(ranks.gather_object(self.num_images))
        self.first = 0

    def compute(self, datamodule) -> tuple[dict[str, float], dict]:
        """({name: value}, protocol) of the images so far against ``datamodule``'s reference
        split (names without the ``val/`` prefix)."""
        ev = self.evaluator
        metrics: dict[str, float] = {}
        protocol = ev.base_protocol(datamodule, self.num_images)
        protocol["extractors"] = {}
        settings = dict(metrics=ev.metrics, kid_subsets=ev.kid_subsets, isc_splits=ev.isc_splits,
                        prc_neighborhood=ev.prc_neighborhood, fd_infinity=ev.fd_infinity,
                        bootstrap=ev.bootstrap, dc_neighborhood=ev.dc_neighborhood)  # fmt: skip
        for stats in self.stats:
            ext, ref = stats.extractor, ev.reference(stats.extractor, datamodule)
            kid_size = min(ev.kid_subset_size, stats.num_images, ref["num_images"])  # capped
            gen, how = stats.compute(), {}
            metrics.update(
                fidelity_metrics(
                    ext.key, ext.layers, gen, ref, kid_subset_size=kid_size, protocol=how,
                    **settings,
                )
            )  # fmt: skip
            protocol["extractors"][ext.key] = {
                **ext.protocol(),
                **how,
                "kid_subset_size": kid_size,
                "reference_images": ref["num_images"],
                "reference_subset": ref["subset"],
                "reference_cache": ref["cache_file"],
            }
        if self.clip_scores:
            metrics["clip_score"] = torch.cat(self.clip_scores).mean().item()
        if self.clip is not None:
            protocol["clip"] = {**self.clip.protocol(), "prompts": list(ev.clip_cfg["prompts"])}
        protocol["not_computed"] = ev.unavailable(datamodule.name)
        return metrics, protocol


__all__ = ["FIDELITY", "METRICS", "Evaluator", "ImageMetrics"]
