"""Guidance (the `guidance` group): classifier-free guidance wraps a conditional diffusion
model's denoiser; it is attached after a check, recorded in the protocol, and reaches training
grids, the evaluation and `python -m genlab.sample`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from genlab.guidance import ClassifierFree, GuidanceError, attach, build_guidance
from genlab.sample import UsageError
from genlab.sample import main as sample_main
from genlab.train import train

from .conftest import compose_cfg


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
    t = torch.tensor([10, 200, 500, 900])
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond = model.denoiser(y, use_ema=False)(x, t)
        uncond = model.denoiser(None, use_ema=False)(x, t)
        assert not torch.allclose(cond, uncond), "the label must matter for this check"
        for scale, want in [(0.0, uncond), (1.0, cond), (2.5, uncond + 2.5 * (cond - uncond))]:
            denoise = ClassifierFree(scale).wrap(model, model.denoiser(y, False), y, False)
            torch.testing.assert_close(denoise(x, t), want, rtol=1e-5, atol=1e-6)


def test_guided_sampling_changes_the_samples_and_is_recorded(tmp_path):
    model = conditional_diffusion(tmp_path)
    y = torch.tensor([0, 1])

    def draw():
        return model.sample(
            2, y=y, generator=torch.Generator().manual_seed(0), steps=4, use_ema=False
        )

    plain = draw()
    attach(model, ClassifierFree(1.0))
    torch.testing.assert_close(draw(), plain)  # scale 1: the conditional model itself
    attach(model, ClassifierFree(4.0))
    assert not torch.allclose(draw(), plain)
    from genlab.metrics.protocol import sampling_protocol

    assert sampling_protocol(model)["guidance"] == {"name": "cfg", "scale": 4.0}


def test_cfg_refuses_models_it_cannot_guide(tmp_path):
    uncond = instantiate(compose_cfg(["model=diffusion", "data=synthetic"], tmp_path).model)
    with pytest.raises(GuidanceError, match="model=diffusion_cond"):
        attach(uncond, ClassifierFree(3.0))
    gan = instantiate(compose_cfg(["model=gan", "data=synthetic"], tmp_path).model)
    with pytest.raises(GuidanceError, match="needs a diffusion model"):
        attach(gan, ClassifierFree(3.0))


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
    with pytest.raises(UsageError, match="not an option: one of cfg, none"):
        sample_main([f"run_dir={run}", "guidance=nope"])
    with pytest.raises(UsageError, match="without guidance="):
        sample_main([f"run_dir={run}", "guidance.scale=2"])
