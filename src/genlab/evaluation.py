"""Evaluating a model: sample it for the evaluation protocol and measure what it offers.

``evaluate_model(evaluator, model, datamodule)`` asks the model only through the family
contract (``genlab.families.contract``). It draws ``num_samples`` images with a fixed seed and
labels balanced over the classes, times the sampling (``sample_img_per_s``, feature extraction
excluded), counts network evaluations per image (``sample_nfe``, a forward hook on
``model.nfe_module()``), scores samples guided toward text prompts against the prompt each was
steered toward (``model.guidance.clip_targets``), and computes bits/dim of the first
``bpd_images`` validation images for ``Likelihood`` models. It returns ``(metrics,
protocol)`` and keeps nothing between calls: what is worth keeping (the built extractors and
CLIP, the reference statistics) is the ``genlab.metrics.Evaluator`` the caller owns and passes
in; the numbers themselves are computed by the metrics layer from the images.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from genlab.data.convert import to_model, to_uint8
from genlab.families.contract import Generative, Likelihood, ODELikelihood
from genlab.metrics.evaluator import Evaluator
from genlab.metrics.likelihood import CONVENTION
from genlab.metrics.protocol import count_rows
from genlab.metrics.ranks import Ranks
from genlab.nets.rng import SampleSeeds, sample_seed

log = logging.getLogger("genlab")


def sample_chunks(
    model,
    n: int,
    ev: Evaluator,
    stats: dict,
    indices: range | None = None,
    seed: int | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 chunks of samples ``indices`` (default all n) of the n-sample request,
    ``ev.sample_batch_size`` per ``sample`` call (``seed``, default ``ev.seed``; labels
    balanced over the classes); adds the sampling seconds and the network rows to ``stats``.
    Sample i draws from its own stream, seeded from ``(seed, i)``: the images depend neither
    on the batch size nor on how the indices are shared among ranks."""
    indices = range(n) if indices is None else indices
    seeds = SampleSeeds.for_indices(ev.seed if seed is None else seed, indices)
    labels = (
        torch.as_tensor(list(indices), dtype=torch.long) % model.num_classes
        if model.num_classes
        else None
    )
    net = model.nfe_module()
    bar = tqdm(total=len(indices), desc="eval: sampling", leave=False, disable=not ev.progress)
    with count_rows(net) as rows:
        for start in range(0, len(indices), ev.sample_batch_size):
            m = min(ev.sample_batch_size, len(indices) - start)
            y = None if labels is None else labels[start : start + m]
            t0 = time.perf_counter()
            part = seeds[start : start + m]
            images = model.sample(m, y=y, generator=part, use_ema=ev.use_ema)
            if images.is_cuda:
                torch.cuda.synchronize(images.device)
            stats["sample_s"] += time.perf_counter() - t0
            bar.update(m)
            yield to_uint8(images).cpu()
    bar.close()
    # 0 where the net never ran whole (no net, or a cached autoregressive sampler)
    stats["rows"] = rows[0] if net is not None else 0


@torch.no_grad()
def bits_per_dim(
    model, datamodule, ev: Evaluator, ode: bool = False, ranks: Ranks | None = None
) -> tuple[float, dict]:
    """Mean bits/dim of the first ``ev.bpd_images`` validation images, and how: the model's
    own ``bits_per_dim``, or (``ode``) its probability-flow ODE likelihood. Batch b of
    ``ev.bpd_batch_size`` images draws its noise from a stream seeded from ``(ev.seed, b)``,
    so the batches can be shared among ranks (``ranks``) with the same result."""
    ranks = ranks or Ranks()
    images = datamodule.load_split("val").tensors[0][: ev.bpd_images]
    batches = math.ceil(len(images) / ev.bpd_batch_size)
    mine = ranks.share(batches)
    name = "bits/dim (ODE)" if ode else "bits/dim"
    bar = tqdm(mine, desc=f"eval: {name}", leave=False, disable=not ev.progress)
    fn = model.ode_bits_per_dim if ode else model.bits_per_dim
    values = []
    for b in bar:
        x = to_model(images[b * ev.bpd_batch_size : (b + 1) * ev.bpd_batch_size])
        generator = torch.Generator().manual_seed(sample_seed(ev.seed, b))
        values.append(fn(x.to(model.device), generator=generator).double().cpu())
    per_batch = torch.stack([v.sum() for v in values]) if values else torch.zeros(0)
    total = ranks.gather(per_batch.to(torch.float64)).sum().item()
    value = total / max(len(images), 1)
    protocol = {"images": len(images), "split": "val", "convention": CONVENTION,
                "noise": "batch b of bpd_batch_size images: a stream seeded (seed, b)"}  # fmt: skip
    protocol.update(model.ode_protocol() if ode else model.bpd_protocol())
    if not math.isfinite(value):
        log.warning("bits/dim is not finite (%s)", value)
    return value, protocol


def guided_clip_protocol(guidance) -> dict:
    """What the CLIP score of samples guided toward prompts used."""
    return {
        **guidance.clip_targets(0)[0].protocol(),
        "prompts": "each sample's own guidance prompt (sampler.guidance.prompts)",
        "scorer": "the guiding CLIP: guided samples score high on it by construction",
    }


def sample_quality(
    ev: Evaluator, model, datamodule, n: int, ranks: Ranks, seed: int
) -> tuple[dict[str, float], dict]:
    """(metrics, protocol) of one sample set of n images drawn with ``seed``: the sample-quality
    metrics of every extractor, the CLIP score and the sampling cost (see ``evaluate_model``)."""
    device = model.device
    guidance = model.guidance  # guided toward prompts: scored against them
    guided = guidance if guidance is not None and guidance.clip_targets(0) else None
    share = ranks.share_chunks(n, ev.sample_batch_size)
    scores = ev.image_metrics(datamodule.name, device, clip=guided is None, first=share.start)
    not_computed = ev.unavailable(datamodule.name)
    metrics: dict[str, float] = {}
    protocol = ev.base_protocol(datamodule, n)
    wants_images = bool(scores.stats) or scores.clip is not None or guided is not None
    wants_images = wants_images or "cost" in ev.metrics
    if wants_images and not isinstance(model, Generative):  # e.g. a VQ-VAE without a prior
        not_computed["samples"] = (
            f"{type(model).__name__} cannot sample on its own (no prior): "
            "no sample-quality or sampling-cost metrics"
        )
    elif wants_images:
        stats = {"sample_s": 0.0, "rows": 0}
        for images in sample_chunks(model, n, ev, stats, indices=share, seed=seed):
            targets = guided.clip_targets(len(images)) if guided is not None else None
            scores.update(images, clip_targets=targets)
        scores.gather(ranks)
        if ranks.is_zero:  # the metrics once, from every rank's features
            metrics, protocol = scores.compute(datamodule)
        timing = ranks.gather_object((stats["sample_s"], stats["rows"]))
        if "cost" in ev.metrics:
            # the ranks sample side by side: the request took as long as the slowest
            metrics["sample_img_per_s"] = n / max(max(t for t, _ in timing), 1e-9)
            rows = sum(r for _, r in timing)
            if rows > 0:
                metrics["sample_nfe"] = rows / n
            protocol["cost"] = {"device": str(device), "batch": ev.sample_batch_size,
                                "processes": ranks.world}  # fmt: skip
    if guided is not None:
        not_computed.pop("clip", None)
        protocol["clip"] = guided_clip_protocol(guided)
    protocol["seed"] = seed
    protocol["not_computed"] = not_computed
    return metrics, protocol


def spread(sets: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """The metrics of K >= 2 sample sets -> ({name: mean, name_std: sample std (ddof=1)},
    {name: the K values}). A metric that already comes with a spread of its own inside one set
    (``kid_std``: over KID subsets; ``is_digits_std``: over IS splits) is averaged; where its
    name is the one the spread over sets takes (``is_digits`` -> ``is_digits_std``), the
    within-set one is renamed ``<name>_within_std``."""
    names = [k for k in sets[0] if all(k in s for s in sets)]
    values = {k: [s[k] for s in sets] for k in names}
    out: dict[str, float] = {}
    for name in names:
        v = torch.tensor(values[name], dtype=torch.float64)
        if f"{name}_std" in names:  # within-set spread sits where the spread over sets goes
            inner = torch.tensor(values[f"{name}_std"], dtype=torch.float64).mean().item()
            out[f"{name}_within_std"] = inner
        if name.endswith("_std"):
            continue  # a within-set spread: renamed above, or averaged below
        out[name] = v.mean().item()
        out[f"{name}_std"] = v.std(unbiased=True).item()
    for name in names:  # within-set spreads whose name is free (kid_std next to kid_mean)
        if name.endswith("_std") and name not in out and name.removesuffix("_std") not in names:
            out[name] = torch.tensor(values[name], dtype=torch.float64).mean().item()
    return out, values


def evaluate_model(
    ev: Evaluator, model, datamodule, n: int | None = None, ranks: Ranks | None = None
) -> tuple[dict[str, float], dict]:
    """``({"val/<name>": value}, protocol)`` of ``model`` under the protocol ``ev`` sets, with
    n samples (default ``ev.num_samples``) compared with ``datamodule``'s reference split.
    With ``ev.repeats`` = K > 1, K sample sets (seeds ``ev.seed`` .. ``ev.seed + K - 1``) give
    each sample metric as the mean and ``<name>_std`` (``spread``); the protocol keeps every
    set's values. Under DDP (``ranks``, every rank calls it) each rank samples its block of
    the ``sample_batch_size`` chunks and its share of the bits/dim batches; rank 0 computes
    the metrics from the gathered features and every rank returns them. The result does not
    depend on the number of ranks."""
    n = int(n or ev.num_samples)
    ranks = ranks or Ranks()
    seeds = [ev.seed + k for k in range(ev.repeats)]
    sets = [sample_quality(ev, model, datamodule, n, ranks, seed) for seed in seeds]
    metrics, protocol = sets[0]
    if len(sets) > 1:
        metrics, values = spread([m for m, _ in sets])
        protocol["repeats"] = {
            "k": len(sets),
            "seeds": seeds,
            "std": "sample standard deviation (ddof=1) over the k sample sets",
            "values": values,
        }
    protocol["seed"] = ev.seed
    not_computed = protocol.pop("not_computed")
    described = model.describe(ev.use_ema)
    protocol.update(
        sampler=described["sampler"],
        weights=described["weights"],
        labels=f"balanced over {model.num_classes} classes" if model.num_classes else None,
    )
    if ranks.shared:
        protocol["ranks"] = ranks.protocol()
    if "bpd" in ev.metrics and isinstance(model, Likelihood):
        metrics["bpd"], protocol["bpd"] = bits_per_dim(model, datamodule, ev, ranks=ranks)
    if "bpd_ode" in ev.metrics and isinstance(model, ODELikelihood):
        if "bpd" in metrics and model.bpd_protocol() == model.ode_protocol():  # EDM, flow
            metrics["bpd_ode"], protocol["bpd_ode"] = metrics["bpd"], protocol["bpd"]
        else:  # DDPM: the ODE next to its variational bound
            metrics["bpd_ode"], protocol["bpd_ode"] = bits_per_dim(
                model, datamodule, ev, ode=True, ranks=ranks
            )
    protocol["not_computed"] = not_computed
    metrics, protocol = ranks.broadcast((metrics, protocol))
    return {f"val/{k}": v for k, v in metrics.items()}, protocol


__all__ = ["bits_per_dim", "evaluate_model", "sample_chunks", "sample_quality", "spread"]
