"""Guidance (the `guidance` group): classifier-free guidance wraps a conditional diffusion
model's denoiser; it is attached after a check, recorded in the protocol, and reaches training
grids, the evaluation and `python -m genlab.sample`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from genlab.guidance import ClassifierFree, GuidanceError, build_guidance
from genlab.guidance.clip import ClipGuidance, prompt_schedule
from genlab.metrics.common import WeightsNotFoundError
from genlab.sample import main as sample_main
from genlab.train import train
from genlab.utils import UsageError

from .conftest import SHARED, compose_cfg


def conditional_diffusion(tmp_path):
    cfg = compose_cfg(["model=diffusion_cond", "data=synthetic"], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():  # a non-trivial class embedding (it starts at zero in some nets)
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_cfg_scale_0_is_unconditional_and_1_conditional(tmp_path):
    model = conditional_diffusion(tmp_path)
    x = torch.randn(4, *model.image_shape)
    t = model.frame.sigma_at(torch.tensor([10, 200, 500, 900]))  # noise levels (sigma frame)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond = model.denoiser(y, use_ema=False)(x, t)
        uncond = model.denoiser(None, use_ema=False)(x, t)
        assert not torch.allclose(cond, uncond), "the label must matter for this check"
        for scale, want in [(0.0, uncond), (1.0, cond), (2.5, uncond + 2.5 * (cond - uncond))]:
            guide = ClassifierFree(scale).bind(model)
            denoise = guide.wrap_denoiser(model, model.denoiser(y, use_ema=False), y)
            torch.testing.assert_close(denoise(x, t), want, rtol=1e-5, atol=1e-6)


def test_guided_sampling_changes_the_samples_and_is_recorded(tmp_path):
    model = conditional_diffusion(tmp_path)
    y = torch.tensor([0, 1])

    def draw():
        return model.sample(
            2, y=y, generator=torch.Generator().manual_seed(0), steps=4, use_ema=False
        )

    plain = draw()
    model.set_guidance(ClassifierFree(1.0))
    torch.testing.assert_close(draw(), plain)  # scale 1: the conditional model itself
    model.set_guidance(ClassifierFree(4.0))
    assert not torch.allclose(draw(), plain)
    assert model.describe()["sampler"]["guidance"] == {"name": "cfg", "scale": 4.0}
    model.set_guidance(None)
    torch.testing.assert_close(draw(), plain)


def test_cfg_refuses_models_it_cannot_guide(tmp_path):
    uncond = instantiate(compose_cfg(["model=diffusion", "data=synthetic"], tmp_path).model)
    with pytest.raises(GuidanceError, match="model=diffusion_cond"):
        uncond.set_guidance(ClassifierFree(3.0))
    gan = instantiate(compose_cfg(["model=gan", "data=synthetic"], tmp_path).model)
    with pytest.raises(GuidanceError, match="needs a diffusion model"):
        gan.set_guidance(ClassifierFree(3.0))


def test_guidance_group_builds(tmp_path):
    assert build_guidance(compose_cfg([], tmp_path).guidance) is None  # guidance=none
    guided = build_guidance(compose_cfg(["guidance=cfg", "guidance.scale=2"], tmp_path).guidance)
    assert isinstance(guided, ClassifierFree) and guided.scale == 2.0


def test_guided_training_run_and_sample_cli(tiny_cfg, tmp_path):
    """A conditional diffusion run with guidance=cfg: its evaluation samples guided (twice
    the network evaluations per step) and records the scale; the sample CLI takes another."""
    cfg = tiny_cfg("model=diffusion_cond", "guidance=cfg", "guidance.scale=2")
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    protocol = json.loads((run / "summary.json").read_text())["evaluation"]["protocol"]
    assert protocol["sampler"]["guidance"] == {"name": "cfg", "scale": 2.0}
    assert summary["metrics"]["val/sample_nfe"] == 2 * cfg.model.sampler.steps
    out = sample_main([f"run_dir={run}", "n=4", "steps=3", "guidance=cfg", "guidance.scale=5",
                       f"out={tmp_path / 's'}"])  # fmt: skip
    assert torch.load(out["pt"], weights_only=False)["guidance"] == {"name": "cfg", "scale": 5.0}
    with pytest.raises(UsageError, match="'guidance/nope'.*options.*cfg classifier clip none"):
        sample_main([f"run_dir={run}", "guidance=nope"])
    with pytest.raises(UsageError, match="override 'guidance.scale'"):
        sample_main([f"run_dir={run}", "guidance.scale=2"])
    with pytest.raises(UsageError, match="temperature= is for hierarchical VAEs"):
        sample_main([f"run_dir={run}", "temperature=0.5"])


# ------------------------------------------------------------------ CLIP guidance (rerank)
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").exists(), reason="needs ../shared/assets/mnist"
)


def test_prompt_schedule_follows_the_weights():
    assert prompt_schedule(["a", "b"], None, 5) == ["a", "b", "a", "b", "a"]
    assert prompt_schedule(["a", "b"], [3, 1], 8) == ["a"] * 6 + ["b"] * 2
    with pytest.raises(GuidanceError, match="one per prompt"):
        prompt_schedule(["a", "b"], [1], 4)


class DigitPool:
    """A stand-in Generative family whose samples are real MNIST test digits drawn with the
    generator."""

    image_shape, num_classes = (1, 28, 28), 0

    def __init__(self, images):
        self.images, self.calls = images, []

    def describe(self) -> dict:
        return {"family": "pool"}

    def sample(self, n, y=None, generator=None, **kw):
        self.calls.append(n)
        return self.images[torch.randint(0, len(self.images), (n,), generator=generator)]


@needs_mnist
def test_rerank_returns_the_highest_scoring_samples():
    from genlab.data import MNISTDataModule, to_model
    from genlab.metrics.digits import load_digit_classifier

    images, _ = MNISTDataModule(root=str(SHARED / "mnist"), download=False,
                                cache_dir=None).read_split("test")  # fmt: skip
    pool = DigitPool(to_model(images[:2000]))
    guide = ClipGuidance(["a handwritten seven", "the digit 2"], k=8).bind(pool)
    out = guide.sample(pool, pool.sample, 40, generator=torch.Generator().manual_seed(0))
    assert pool.calls == [320] and out.shape == (40, 1, 28, 28)
    # each output is the best of its 8 candidates (the same draws, scored again)
    cand = DigitPool.sample(pool, 320, generator=torch.Generator().manual_seed(0)).view(
        40, 8, 1, 28, 28
    )
    prompts = prompt_schedule(guide.prompts, None, 40)
    pairs = [p for p in prompts for _ in range(8)]
    scores = guide.clip_objective.scores(cand.flatten(0, 1), pairs).view(40, 8)
    torch.testing.assert_close(out, cand[torch.arange(40), scores.argmax(1)])
    # and the prompted digits come out: wherever the 8 candidates held one (by the digit
    # classifier), the pick is it; unguided, a sample is the prompted digit 1 time in 10
    with torch.no_grad():
        classify = load_digit_classifier()
        digits = classify(out).argmax(1)
        cand_digits = classify(cand.flatten(0, 1)).argmax(1).view(40, 8)
    target = torch.tensor([7 if "seven" in p else 2 for p in prompts])
    hit = digits == target
    possible = (cand_digits == target[:, None]).any(1)
    assert possible.sum() >= 15 and hit[possible].float().mean() > 0.85
    assert hit.float().mean() > 0.3
    assert guide.protocol()["method"] == "rerank"


def test_clip_guidance_errors_are_clear(tmp_path):
    with pytest.raises(GuidanceError, match="needs prompts"):
        build_guidance(compose_cfg(["guidance=clip"], tmp_path).guidance)
    with pytest.raises(GuidanceError, match="prompts given with guidance=none"):
        build_guidance(compose_cfg(["guidance.prompts=[a seven]"], tmp_path).guidance)
    missing = ClipGuidance(["a seven"], model=f"local-dir:{tmp_path / 'no_clip'}")
    with pytest.raises(WeightsNotFoundError, match="no_clip"):
        missing.bind(DigitPool(torch.zeros(4, 1, 28, 28)))


def test_clip_guidance_on_a_gan_run_and_through_the_sample_cli(tiny_cfg, tmp_path):
    """Training with guidance=clip: the evaluation and grids sample reranked (k network
    evaluations per image), latent interpolation grids keep their given latents; the sample
    CLI takes other settings."""
    cfg = tiny_cfg("model=gan", "guidance=clip", "guidance.prompts=[a handwritten seven]",
                   "guidance.method=rerank", "guidance.k=2",
                   "callbacks.latent_interpolation.every_n_steps=4")  # fmt: skip
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    protocol = json.loads((run / "summary.json").read_text())["evaluation"]["protocol"]
    assert protocol["sampler"]["guidance"]["method"] == "rerank"
    assert summary["metrics"]["val/sample_nfe"] == 2
    assert (run / "samples" / "interp_0000004.png").exists()
    args = [
        "n=4",
        "guidance=clip",
        "guidance.method=rerank",
        "guidance.k=3",
        "guidance.prompts=[a handwritten two]",
    ]
    out = sample_main([f"run_dir={run}", *args, f"out={tmp_path / 'g'}"])
    saved = torch.load(out["pt"], weights_only=False)
    assert saved["images"].shape == (4, 1, 16, 16)
    assert saved["guidance"]["k"] == 3 and saved["guidance"]["prompts"] == ["a handwritten two"]
    args = ["n=2", "guidance=clip", "guidance.steps=3", "guidance.prompts=[a handwritten two]"]
    out = sample_main([f"run_dir={run}", *args, f"out={tmp_path / 'l'}"])
    saved = torch.load(out["pt"], weights_only=False)  # method=auto: latent optimisation
    assert saved["guidance"]["method"] == "latent" and saved["guidance"]["steps"] == 3
