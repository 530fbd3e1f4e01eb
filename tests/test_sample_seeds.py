"""Samples that do not depend on the batch (issue 18, item 16): with per-sample streams
(``genlab.nets.rng.SampleSeeds``) the images for a seed are the same for any
``sample_batch_size``, and a subset of the indices (a rank's share) draws exactly those
samples of the whole request."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from genlab import evaluation
from genlab.metrics.evaluator import Evaluator
from genlab.nets import rng
from genlab.nets.rng import SampleSeeds

from .conftest import compose_cfg

# every sampling path: DDPM ancestral noise at each step (ddpm), EDM's stochastic churn, flow
# with ancestral Euler steps, a conditional GAN with truncation (redraws), VAE pixels drawn
# from p(x|z), PixelCNN's categorical and PixelCNN++'s logistic-mixture draws, one position at
# a time
CASES = {
    "ddpm": ["model=diffusion", "model.sampler._target_=genlab.diffusion.samplers.ddpm",
             "model.sampler.steps=4"],
    "edm_churn": ["model=edm", "model.sampler.steps=3", "+model.sampler.s_churn=40"],
    "flow_ancestral": ["model=flow", "model.sampler.steps=3", "+model.sampler.eta=1",
                       "model.sampler._target_=genlab.diffusion.samplers.euler"],
    "gan_truncated": ["model=gan", "model.num_classes=4", "model.truncation=0.5"],
    "vae_pixels": ["model=vae", "model.sample_mean=false"],
    "pixelcnn": ["model=pixelcnn", "data.image_size=8"],
    "pixelcnn_pp": ["model=pixelcnn_pp", "data.image_size=8"],
}  # fmt: skip


def build(case: str, tmp_path):
    cfg = compose_cfg(["data=synthetic", *CASES[case]], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample alike
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


# a batched float32 network reassociates its sums with the batch size: differences of a few
# 1e-5 of the image range (EDM's sigma up to 80 amplifies them), never a different sample
ATOL = 1e-4


def draw(model, indices, batch: int, seed: int = 3) -> torch.Tensor:
    model.sample_batch_size = batch
    seeds = SampleSeeds.for_indices(seed, indices)
    return model.sample(len(seeds), generator=seeds, use_ema=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_samples_do_not_depend_on_the_batch_size_or_the_share(case, tmp_path):
    model = build(case, tmp_path)
    whole = draw(model, range(6), batch=6)
    assert whole.shape[0] == 6 and torch.isfinite(whole).all()
    assert not torch.allclose(whole[0], whole[1]), "every sample its own noise"
    for batch in (1, 4):
        torch.testing.assert_close(draw(model, range(6), batch=batch), whole, atol=ATOL, rtol=0)
    # a rank's share (indices 1, 3, 5 of the request) draws exactly those samples
    torch.testing.assert_close(draw(model, [1, 3, 5], batch=2), whole[1::2], atol=ATOL, rtol=0)
    # and another seed, other samples
    other = draw(model, range(6), batch=6, seed=4)
    assert not torch.allclose(other, whole)


def test_a_shared_generator_still_depends_on_the_batch(tmp_path):
    """What the streams fix: one torch.Generator for the request gives other images when the
    batch size changes (noise is drawn chunk by chunk)."""
    model = build("ddpm", tmp_path)

    def shared(batch):
        model.sample_batch_size = batch
        return model.sample(6, generator=torch.Generator().manual_seed(3), use_ema=False)

    assert not torch.allclose(shared(6), shared(2))


def test_streams_match_torch_and_check_their_length():
    seeds = SampleSeeds.for_indices(0, range(3))
    x = rng.randn((3, 2, 5), seeds)
    for i, s in enumerate(seeds.seeds):  # sample i: torch.randn from its own seed
        torch.testing.assert_close(
            x[i], torch.randn(2, 5, generator=torch.Generator().manual_seed(s))
        )
    assert rng.sample_seed(0, 1) != rng.sample_seed(1, 0)
    g = torch.Generator().manual_seed(0)  # a plain generator: exactly torch's own draw
    torch.testing.assert_close(
        rng.randn((4, 3), g), torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    )
    with pytest.raises(ValueError, match="leading dimension must be the number of samples"):
        rng.randn((2, 5), seeds)
    spawned = seeds.spawn(2)
    assert len(spawned) == 6 and len(set(spawned.seeds)) == 6


def test_an_evaluation_does_not_depend_on_its_sample_batch_size(tmp_path):
    """The evaluation's images (uint8) for sample_batch_size 8 and 3 are the same."""
    model = build("ddpm", tmp_path)
    model.sample_batch_size = 256
    chunks = {}
    for batch in (8, 3):
        ev = Evaluator(extractors=[], num_samples=8, sample_batch_size=batch, seed=0)
        stats = {"sample_s": 0.0}
        chunks[batch] = torch.cat(list(evaluation.sample_chunks(model, 8, ev, stats)))
    diff = (chunks[8].int() - chunks[3].int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
