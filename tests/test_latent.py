"""Latent denoising models: the encoded dataset is cached once per autoencoder, training never
runs the encoder, samples are decoded images, and guidance composes (issue 19, item 2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from genlab.data.latents import EncodedSplit, LatentDataModule
from genlab.families.autoencoder import AutoencoderModule
from genlab.families.contract import EncodedData, Generative, Likelihood, ODELikelihood
from genlab.guidance import build_guidance
from genlab.guidance.base import GuidanceError
from genlab.guidance.gradient import GradientGuidance
from genlab.train import train

from .conftest import TINY, compose_cfg


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory) -> Path:
    """A tiny finished model=autoencoder run on the synthetic 16x16 images."""
    root = tmp_path_factory.mktemp("ae")
    cfg = compose_cfg(
        [*TINY, "model=autoencoder", f"paths.cache_dir={root / 'cache'}", "metrics.at_end=false"],
        root / "run",
    )
    train(cfg)
    return Path(cfg.paths.output_dir)


def latent_cfg(tmp_path: Path, run: Path, *extra: str, model: str = "latent_flow"):
    return compose_cfg(
        [*TINY, f"model={model}", f"model.autoencoder_run={run}",
         f"paths.cache_dir={tmp_path / 'cache'}", "metrics.at_end=false",
         "model.sampler.steps=3", *extra],
        tmp_path / "run",
    )  # fmt: skip


def build(tmp_path, run, *extra, model="latent_flow"):
    cfg = latent_cfg(tmp_path, run, *extra, model=model)
    return instantiate(cfg.model), instantiate(cfg.data), cfg


@pytest.fixture
def count_encodes(monkeypatch):
    """Counts the autoencoder's encoder calls (batches), whatever instance makes them."""
    calls = []
    original = AutoencoderModule.encode_posterior

    def counted(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(AutoencoderModule, "encode_posterior", counted)
    return calls


def test_the_cache_is_built_once_and_belongs_to_its_autoencoder(
    autoencoder_run, tmp_path, count_encodes
):
    model, images, _ = build(tmp_path, autoencoder_run)
    cache = tmp_path / "latents"
    first = model.encoded_data(images, cache)
    assert sum(count_encodes) == 256 + 64  # every train and val image, once
    assert len(list(cache.glob("latents-*.pt"))) == 2
    again, _, _ = build(tmp_path, autoencoder_run)  # a new run with the same autoencoder
    second = again.encoded_data(images, cache)
    assert sum(count_encodes) == 256 + 64, "the second run read the cache"
    assert torch.equal(first.splits["train"].mean, second.splits["train"].mean)

    # another autoencoder (other weights in its checkpoint): a cache of its own
    other = tmp_path / "other_ae"
    shutil.copytree(autoencoder_run, other)
    ckpt = other / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k in state["state_dict"] if k.startswith("decoder."))
    state["state_dict"][name] = state["state_dict"][name] + 1.0
    torch.save(state, ckpt)
    changed, _, _ = build(tmp_path, other)
    changed.encoded_data(images, cache)
    assert sum(count_encodes) == 2 * (256 + 64)
    assert len(list(cache.glob("latents-*.pt"))) == 4


def test_training_epochs_never_run_the_encoder(autoencoder_run, tmp_path, count_encodes):
    """Three epochs of training (256 synthetic images, batch 64: 12 steps) encode each image
    once: the calls are the cache's, none per step or per epoch."""
    cfg = latent_cfg(tmp_path, autoencoder_run, "trainer.max_steps=12", "data.batch_size=64")
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["global_step"] == 12
    assert sum(count_encodes) == 256 + 64
    latent = summary["protocol"]["latent"]
    assert latent["latent_shape"] == [4, 4, 4] and latent["latent_scale"] > 0


def test_samples_are_decoded_images_and_there_is_no_pixel_likelihood(autoencoder_run, tmp_path):
    model, images, _ = build(tmp_path, autoencoder_run)
    assert isinstance(model, Generative) and isinstance(model, EncodedData)
    assert not isinstance(model, Likelihood) and not isinstance(model, ODELikelihood)
    assert model.image_shape == images.image_shape == (1, 16, 16)
    assert model.space_shape == tuple(model.autoencoder.latent_shape) == (4, 4, 4)
    x = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, model.sample(3, generator=torch.Generator().manual_seed(0)))
    described = model.describe()["latent"]
    assert described["latent_shape"] == [4, 4, 4]
    assert described["latent_scale"] == pytest.approx(float(model.autoencoder.latent_scale))


@pytest.mark.parametrize("family", ["latent_diffusion", "latent_edm", "latent_flow"])
def test_every_latent_family_builds_its_net_for_the_latents(autoencoder_run, tmp_path, family):
    model, _, _ = build(tmp_path, autoencoder_run, model=family)
    z = torch.randn(2, *model.space_shape)
    sigma = torch.full((2,), 1.0, dtype=torch.float64)
    assert model.denoiser()(z, sigma).shape == z.shape
    assert model.decode(z).shape == (2, 1, 16, 16)


def test_a_dit_denoises_latents(autoencoder_run, tmp_path):
    model, _, _ = build(tmp_path, autoencoder_run, "model/net=dit", "model.net.depth=1")
    assert type(model.net).__name__ == "DiT"
    z = torch.randn(2, *model.space_shape)
    out = model.denoiser()(z, torch.ones(2, dtype=torch.float64))
    assert out.shape == z.shape


def test_batches_are_scaled_posterior_samples_and_validation_uses_the_mean(tmp_path):
    from genlab.data import SyntheticDataModule

    class Trainer:  # what the hook reads
        training = True
        lightning_module = None

    mean = torch.randn(8, 2, 3, 2, 2)
    std = torch.full_like(mean, 0.5)
    split = EncodedSplit(mean, std, torch.arange(8))
    dm = LatentDataModule(SyntheticDataModule(num_samples=8, num_val=8), {"train": split,
                          "val": split}, scale=2.0)  # fmt: skip
    dm.trainer = Trainer()
    torch.manual_seed(0)
    z, labels = dm.on_after_batch_transfer((mean, std, torch.arange(8)), 0)
    assert z.shape == (8, 3, 2, 2) and torch.equal(labels, torch.arange(8))
    # each latent is 2 * (mean of view 0 or 1 + 0.5 eps): within 2 * 0.5 * 5 of one of them
    off = torch.stack([(z / 2 - mean[:, v]).abs().flatten(1).max(1).values for v in (0, 1)])
    assert (off.min(0).values < 2.5).all() and (off.min(0).values > 0).all()
    picked = off.argmin(0)
    assert 0 < picked.sum() < 8, "both the image's and the mirror's encodings are used"
    Trainer.training = False
    z, _ = dm.on_after_batch_transfer((mean, std, torch.arange(8)), 0)
    assert torch.equal(z, 2 * mean[:, 0])
    assert dm.name == "synthetic" and dm.image_shape == (1, 16, 16)  # the images' module


def test_cfg_and_a_gradient_objective_on_decoded_images_compose(autoencoder_run, tmp_path):
    model, _, _ = build(tmp_path, autoencoder_run, "model.num_classes=4", "model.ema_decay=0")
    with torch.no_grad():  # away from the zero-initialised layers of a new UNet
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.arange(3)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = model.sample(3, y=y, generator=g())
    model.set_guidance(
        build_guidance({"_target_": "genlab.guidance.cfg.ClassifierFree", "scale": 3.0})
    )
    guided = model.sample(3, y=y, generator=g())
    assert guided.shape == plain.shape and not torch.equal(guided, plain)

    seen = []

    class Brighter(GradientGuidance):  # an objective of the decoded image, as CLIP's is
        name = "brighter"

        def targets_for(self, n):
            return [None] * n

        def objective(self, x, sigma, x0, targets):
            seen.append(tuple(x0.shape))
            return x0.flatten(1).mean(1)

    model.set_guidance(Brighter(scale=50.0))
    brighter = model.sample(3, y=y, generator=g())
    assert seen and set(seen) == {(3, 1, 16, 16)}, "the objective reads decoded images"
    model.set_guidance(None)
    assert brighter.mean() > model.sample(3, y=y, generator=g()).mean()


def test_classifier_guidance_is_refused_with_a_reason(autoencoder_run, tmp_path):
    model, _, _ = build(tmp_path, autoencoder_run)
    guidance = build_guidance(
        {"_target_": "genlab.guidance.classifier.ClassifierGuidance", "scale": 1.0}
    )
    with pytest.raises(GuidanceError, match="latents; use guidance=cfg or guidance=clip"):
        model.set_guidance(guidance)


def test_an_autoencoder_of_other_images_or_another_family_is_refused(autoencoder_run, tmp_path):
    with pytest.raises(InstantiationException, match=r"trained on \(1, 16, 16\) images"):
        build(tmp_path, autoencoder_run, "data.image_size=24")
    flow = tmp_path / "flow"
    cfg = compose_cfg([*TINY, "model=flow", f"paths.cache_dir={tmp_path / 'c'}",
                       "metrics.at_end=false", "trainer.max_steps=1"], flow)  # fmt: skip
    train(cfg)
    with pytest.raises(InstantiationException, match="not a model=autoencoder run"):
        build(tmp_path, flow)


def test_an_unmeasured_latent_scale_is_measured_on_the_training_latents(autoencoder_run, tmp_path):
    model, images, _ = build(tmp_path, autoencoder_run)
    model.autoencoder.latent_scale.fill_(1.0)
    model.autoencoder.latent_scale_step.fill_(-1)  # as after a run that never validated
    data = model.encoded_data(images, tmp_path / "latents")
    expected = 1.0 / data.splits["train"].mean[:, 0].double().std()
    assert model.latent_scale == pytest.approx(float(expected), rel=1e-6)
    assert data.scale == pytest.approx(model.latent_scale)
    assert "training posterior means" in model.describe()["latent"]["latent_scale_from"]
