"""The GAN family: penalties against direct autograd, spectral norm, EMA rate, DiffAugment,
truncation, conditional presets, divergence handling and exact resume with n_critic > 1
(checkpoints and stop signals at step boundaries), clipping only when asked, images/s."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import pytest
import torch
from torch import nn

import genlab.train as train_module
from genlab.callbacks.checkpoint import LastCheckpoint
from genlab.families.common import DivergenceError
from genlab.families.gan import GANModule, gradient_penalty, r1_penalty
from genlab.nets.augment import diff_augment
from genlab.nets.ema import EMA
from genlab.nets.gan import DCGANDiscriminator, DCGANGenerator, ResNetDiscriminator
from genlab.runs import load_model
from genlab.train import train


def test_gradient_penalty_equals_direct_autograd():
    torch.manual_seed(0)
    d = DCGANDiscriminator(channels=1, image_size=16, base_channels=4, norm="layer")
    real, fake = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    eps = torch.rand(3, 1, 1, 1)
    ours = gradient_penalty(d, real, fake, eps=eps)
    direct = []
    for i in range(3):  # one interpolate at a time, plain autograd
        x = (eps[i] * real[i : i + 1] + (1 - eps[i]) * fake[i : i + 1]).requires_grad_(True)
        (g,) = torch.autograd.grad(d(x).sum(), x)
        direct.append((g.norm() - 1) ** 2)
    torch.testing.assert_close(ours, torch.stack(direct).mean())
    # a linear critic D(x) = <w, x> has gradient w everywhere: GP = (||w|| - 1)^2
    w = torch.randn(1, 1, 4, 4)
    linear = lambda x, y=None: (x * w).flatten(1).sum(1)
    gp = gradient_penalty(linear, torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4))
    torch.testing.assert_close(gp, (w.norm() - 1) ** 2)
    # R1 of the linear critic is ||w||^2
    torch.testing.assert_close(r1_penalty(linear, torch.randn(5, 1, 4, 4)), w.norm() ** 2)
    # the penalty is differentiable with respect to D's parameters (it is part of D's loss)
    ours.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.parameters())


@pytest.mark.parametrize("net", ["dcgan", "resnet"])
def test_spectrally_normalised_layers_have_unit_largest_singular_value(net):
    torch.manual_seed(0)
    d = (
        DCGANDiscriminator(1, 16, 8, spectral_norm=True, norm="none")
        if net == "dcgan"
        else ResNetDiscriminator(1, 16, 8, spectral_norm=True)
    )
    d.train()
    for _ in range(30):  # each training forward pass runs one power iteration per layer
        d(torch.randn(4, 1, 16, 16))
    layers = [m for m in d.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers
    for layer in layers:
        sigma = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.05)
    plain = DCGANDiscriminator(1, 16, 8, spectral_norm=False, norm="none")
    conv = next(m for m in plain.modules() if isinstance(m, nn.Conv2d))
    assert torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2) != pytest.approx(1.0)


def test_ema_moves_toward_the_live_weights_at_the_configured_rate():
    live = nn.Linear(3, 2)
    ema = EMA(live, decay=0.9, warmup=False)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    ema.update(live)
    for old, new, target in zip(before, ema.module.parameters(), live.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * target)


def test_diffaugment_keeps_shape_and_gradient():
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    torch.manual_seed(0)
    out = diff_augment(x, "color,translation,cutout")
    assert out.shape == x.shape and not torch.equal(out, x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    zeros_cut = diff_augment(torch.ones(8, 1, 16, 16), "cutout")
    assert ((zeros_cut == 0).flatten(1).float().mean(1) > 0).all()  # a square was cut out
    with pytest.raises(ValueError, match="unknown DiffAugment policy"):
        diff_augment(x, "rotate")


def test_truncation_and_fixed_latents():
    gan = GANModule(DCGANGenerator(8, 1, 16, 4), DCGANDiscriminator(1, 16, 4), (1, 16, 16))
    z = gan.latents(256, torch.Generator().manual_seed(0), truncation=0.5)
    assert z.abs().max() <= 0.5
    a = gan.sample(3, z=z[:3])
    assert torch.equal(a, gan.sample(3, z=z[:3])) and a.shape == (3, 1, 16, 16)


@pytest.mark.parametrize("model", ["gan", "wgan_gp", "sngan"])
def test_conditional_presets_train_and_sample_by_class(model, tiny_cfg):
    cfg = tiny_cfg(
        f"model={model}", "model.num_classes=${data.num_classes}", "metrics.at_end=false"
    )
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["global_step"] == 4
    module, _, _ = load_model(cfg.paths.output_dir, "last")
    assert module.num_classes == 4
    y = torch.tensor([0, 1, 2, 3])
    images = module.sample(4, y=y, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    # the label changes the image for the same latent
    z = module.latents(1, torch.Generator().manual_seed(1)).expand(4, -1)
    per_class = module.sample(4, y=y, z=z)
    assert not torch.allclose(per_class[0], per_class[1])


def test_nan_loss_stops_with_the_message_and_keeps_the_checkpoint(tiny_cfg, monkeypatch):
    original = GANModule.d_loss

    def poisoned(self, *args):
        loss, stats = original(self, *args)
        return (loss * float("nan") if self.global_step >= 2 else loss), stats

    monkeypatch.setattr(GANModule, "d_loss", poisoned)
    cfg = tiny_cfg("model=gan", "metrics.at_end=false", "~callbacks.sample_grid")
    with pytest.raises(DivergenceError, match="train/loss_d is nan at step 2.*ckpt_path"):
        train(cfg)
    run = cfg.paths.output_dir
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["status"] == "failed" and "DivergenceError" in summary["error"]
    state = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)
    assert state["global_step"] == 2  # the last good checkpoint, loadable
    assert all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )


def test_wgan_gp_stop_and_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    """n_critic=5: a generator step every 5 batches; resuming skips exactly the batches seen."""
    common = [
        "model=wgan_gp",
        "metrics.at_end=false",
        "data.num_samples=64",
        "data.batch_size=8",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "callbacks.periodic_checkpoint.every_n_train_steps=2",
        "~callbacks.sample_grid",
        "model.ema_decay=0",
    ]

    def run(sub, steps, ckpt=None):
        cfg = tiny_cfg(*common, f"trainer.max_steps={steps}")
        cfg.paths.output_dir = str(tmp_path / sub)
        cfg.ckpt_path = ckpt
        train(cfg)
        return load_model(tmp_path / sub, "last")[0]

    straight = run("straight", 4)
    run("first", 2)
    resumed = run("resumed", 4, str(tmp_path / "first/checkpoints/last.ckpt"))
    assert int(resumed.d_steps) == int(straight.d_steps) == 20
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_latent_interpolation_grid(tiny_cfg):
    from genlab.callbacks.interpolation import slerp

    a, b = torch.randn(3, 8), torch.randn(3, 8)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[:, 0], a)
    torch.testing.assert_close(path[:, -1], b)
    cfg = tiny_cfg(
        "model=gan", "metrics.at_end=false", "callbacks.latent_interpolation.every_n_steps=2"
    )
    train(cfg)
    grids = sorted(os.listdir(os.path.join(cfg.paths.output_dir, "samples")))
    assert "interp_0000002.png" in grids and "interp_0000004.png" in grids


WGAN_TINY = [
    "model=wgan_gp",
    "metrics.at_end=false",
    "data.num_samples=64",
    "data.batch_size=8",
    "~callbacks.sample_grid",
    "model.ema_decay=0",
]


def test_n_critic_checkpoints_once_per_step_at_the_batch_that_completes_it(tiny_cfg, monkeypatch):
    """n_critic=5, last.ckpt every step: one save per global step, each holding exactly
    5 discriminator steps per generator step (none at step 0, none after a D-only batch)."""
    saves, original = [], LastCheckpoint._save

    def record(self, trainer):
        saves.append((trainer.global_step, int(trainer.lightning_module.d_steps)))
        original(self, trainer)

    monkeypatch.setattr(LastCheckpoint, "_save", record)
    train(tiny_cfg(*WGAN_TINY, "callbacks.last_checkpoint.every_n_train_steps=1",
                   "trainer.max_steps=3"))  # fmt: skip
    assert saves == [(1, 5), (2, 10), (3, 15)]


def test_gans_clip_only_when_asked_and_count_every_discriminator_batch(tiny_cfg, monkeypatch):
    """The GAN presets do not clip (their papers do not; trainer.gradient_clip_val is not
    theirs); model.gradient_clip_val=1.0 clips D and G at every step. train_images_per_s
    counts the n_critic discriminator batches of each step."""
    calls = []
    original = GANModule.clip_gradients

    def counted(self, opt, *args, **kwargs):
        calls.append(kwargs.get("gradient_clip_algorithm"))
        return original(self, opt, *args, **kwargs)

    monkeypatch.setattr(GANModule, "clip_gradients", counted)
    summary = train(tiny_cfg(*WGAN_TINY, "trainer.max_steps=2"))
    assert calls == []
    steps = summary["global_step"]
    images = summary["train_images_per_s"] * summary["train_time_s"]
    assert steps == 2 and images == pytest.approx(steps * 5 * 8)

    cfg = tiny_cfg("model=gan", "metrics.at_end=false", "~callbacks.sample_grid",
                   "model.gradient_clip_val=1.0", "trainer.max_steps=2")  # fmt: skip
    cfg.paths.output_dir = cfg.paths.output_dir + "_clipped"
    train(cfg)
    assert calls == ["norm"] * 4  # D and G, two steps


def test_sigterm_mid_cycle_stops_at_the_end_of_the_step_and_resumes_exactly(
    tiny_cfg, tmp_path, monkeypatch
):
    """SIGTERM during a discriminator-only batch (batch 7: step 2's third D batch): training
    goes on to the batch that completes step 2, last.ckpt holds 2 G and 10 D steps, and the
    resumed run equals an uninterrupted one."""

    class SignalAtBatch(L.Callback):
        def __init__(self):
            self.batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1
            if self.batches == 8:
                os.kill(os.getpid(), signal.SIGTERM)

    sender = SignalAtBatch()
    build = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build(cfg), sender])
    common = [
        *WGAN_TINY,
        "callbacks.last_checkpoint.every_n_train_steps=100",
        "callbacks.periodic_checkpoint.every_n_train_steps=100",
        "trainer.max_steps=4",
    ]
    cfg = tiny_cfg(*common)
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == 143
    run = tmp_path / "run"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2 and int(state["state_dict"]["d_steps"]) == 10

    sender.batches = -(10**6)  # no signal from here on
    train(tiny_cfg(*common))
    straight = tiny_cfg(*common)
    straight.paths.output_dir = str(tmp_path / "straight")
    train(straight)
    a, b = load_model(run, "last")[0], load_model(tmp_path / "straight", "last")[0]
    assert int(a.d_steps) == int(b.d_steps) == 20
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("warmup", [True, False])
def test_an_ema_loaded_from_a_checkpoint_keeps_counting_its_updates(warmup):
    """After load_state_dict the update count is read back once, with or without warm-up
    (without, the next update used to fail on the host count the load had cleared)."""
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.9, warmup=warmup)
    for _ in range(3):
        ema.update(net)
    restored = EMA(torch.nn.Linear(3, 2), 0.9, warmup=warmup)
    restored.load_state_dict(ema.state_dict())
    restored.update(net)
    ema.update(net)
    assert int(restored.num_updates) == int(ema.num_updates) == 4
    for a, b in zip(restored.parameters(), ema.parameters()):
        assert torch.equal(a, b)
