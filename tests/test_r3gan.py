"""R3GAN: the pairing loss and R1/R2 against direct computations, the nets' geometry and
identity-at-init blocks, the cosine schedules, training through the real config (conditional
too) and an exact stop-and-resume with every schedule on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genlab.families.r3gan import (
    R3GANModule,
    cosine_ramp,
    rpgan_d_loss,
    rpgan_g_loss,
    zero_centered_penalty,
)
from genlab.nets.r3gan import (
    InvertedBottleneck,
    R3GANDiscriminator,
    R3GANGenerator,
    Resample,
)
from genlab.runs import load_model
from genlab.train import train


def _nonlinear(net: nn.Module) -> nn.Module:
    """Random weights in the zero-initialised branch ends: at init a residual branch adds
    nothing, which would make D linear and its input gradient constant."""
    torch.manual_seed(1)
    for m in net.modules():
        if isinstance(m, InvertedBottleneck):
            nn.init.normal_(m.project.weight, std=0.3)
            nn.init.normal_(m.act1.bias, std=0.3)
    return net


def _tiny(num_classes: int = 0) -> R3GANModule:
    torch.manual_seed(0)
    g = R3GANGenerator(8, 1, 8, widths=8, blocks=1, groups=2, num_classes=num_classes)
    d = R3GANDiscriminator(1, 8, widths=8, blocks=1, groups=2, num_classes=num_classes)
    return R3GANModule(g, _nonlinear(d), (1, 8, 8), r1_gamma=0.3, r2_gamma=0.7,
                       num_classes=num_classes)  # fmt: skip


def test_pairing_loss_equals_the_direct_formula():
    d_real, d_fake = torch.randn(5), torch.randn(5)
    direct_d = torch.log1p(torch.exp(d_fake - d_real)).mean()  # pairs (i, i), Eq. 2
    direct_g = torch.log1p(torch.exp(d_real - d_fake)).mean()
    torch.testing.assert_close(rpgan_d_loss(d_real, d_fake), direct_d)
    torch.testing.assert_close(rpgan_g_loss(d_real, d_fake), direct_g)
    # relativistic: shifting every logit by a constant changes nothing
    torch.testing.assert_close(rpgan_d_loss(d_real + 3, d_fake + 3), direct_d)
    # the module's losses on a tiny D equal the formula on D's own outputs
    module = _tiny()
    module.r1_gamma = module.r2_gamma = 0.0
    real, fake = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    d = module.discriminator
    loss, _ = module.r3_d_loss(real, fake, None)
    torch.testing.assert_close(loss, torch.log1p(torch.exp(d(fake) - d(real))).mean())
    torch.testing.assert_close(
        module.r3_g_loss(real, fake, None), torch.log1p(torch.exp(d(real) - d(fake))).mean()
    )


@pytest.mark.parametrize("num_classes", [0, 3])
def test_r1_and_r2_equal_direct_autograd_with_the_half_gamma(num_classes):
    module = _tiny(num_classes)
    d = module.discriminator
    real, fake = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    y = torch.tensor([0, 2]) if num_classes else None

    def direct(x):  # one image at a time, plain autograd, no create_graph
        norms = []
        for i in range(x.shape[0]):
            xi = x[i : i + 1].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(d(xi, None if y is None else y[i : i + 1]).sum(), xi)
            norms.append(g.pow(2).sum())
        return torch.stack(norms).mean()

    r1, r2 = direct(real), direct(fake)
    assert r1 > 0 and r2 > 0 and not torch.allclose(r1, r2)
    loss, stats = module.r3_d_loss(real, fake, y)
    torch.testing.assert_close(stats["r1"], r1)
    torch.testing.assert_close(stats["r2"], r2)
    adversarial = rpgan_d_loss(d(real, y), d(fake, y))
    torch.testing.assert_close(loss, adversarial + 0.3 / 2 * r1 + 0.7 / 2 * r2)
    # the penalties are part of D's loss: differentiable with respect to D's parameters
    x = real.clone().requires_grad_(True)
    zero_centered_penalty(d(x, y), x).backward()
    assert all(p.grad is not None for p in d.parameters() if p.requires_grad)
    # a linear critic D(x) = <w, x> has gradient w everywhere: the penalty is ||w||^2
    w = torch.randn(1, 1, 4, 4)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    torch.testing.assert_close(zero_centered_penalty((x * w).flatten(1).sum(1), x), w.norm() ** 2)


@pytest.mark.parametrize("size", [16, 28, 32, 64])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_nets_fit_every_supported_size_and_condition_on_labels(size, num_classes):
    torch.manual_seed(0)
    g = R3GANGenerator(16, 3, size, widths=8, blocks=1, groups=4, num_classes=num_classes)
    d = R3GANDiscriminator(3, size, widths=8, blocks=1, groups=4, num_classes=num_classes)
    y = torch.tensor([1, 7]) if num_classes else None
    z = torch.randn(2, 16)
    x = g(z, y)
    assert x.shape == (2, 3, size, size) and torch.isfinite(x).all()
    logits = d(x, y)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    if num_classes:  # the label changes both networks' outputs
        assert not torch.allclose(g(z, torch.tensor([2, 2])), g(z, torch.tensor([3, 3])))
        assert not torch.allclose(d(x, torch.tensor([2, 2])), d(x, torch.tensor([3, 3])))
        with pytest.raises(ValueError, match="needs labels"):
            g(z)


def test_stage_lists_and_unsupported_sizes_are_refused_in_one_line():
    g = R3GANGenerator(8, 1, 32, widths=[16, 16, 8, 8], blocks=[1, 0, 1, 2], groups=[4, 4, 2, 2])
    d = R3GANDiscriminator(1, 32, widths=[16, 16, 8, 8], blocks=[1, 0, 1, 2], groups=4)
    assert d(g(torch.randn(2, 8))).shape == (2,)
    with pytest.raises(ValueError, match=r"4 \* 2\^k or 7 \* 2\^k.*got 24"):
        R3GANGenerator(8, 1, 24)
    with pytest.raises(ValueError, match="widths has 2 values, this image size has 3 stages"):
        R3GANDiscriminator(1, 28, widths=[8, 8])
    with pytest.raises(ValueError, match="not divisible by groups=3"):
        R3GANGenerator(8, 1, 16, widths=8, groups=3)


def test_residual_blocks_are_the_identity_at_init_and_resampling_keeps_the_mean():
    torch.manual_seed(0)
    block = InvertedBottleneck(64, groups=8, expansion=2, num_blocks=6)
    x = torch.randn(2, 64, 5, 5)
    assert torch.equal(block(x), x)
    gain = math.sqrt(2 / 1.04) * 6 ** (-1 / 4)  # He gain of leaky ReLU 0.2 times L^(-1/4)
    assert block.expand.weight.std().item() == pytest.approx(gain / math.sqrt(64), rel=0.05)
    assert block.grouped.weight.std().item() == pytest.approx(gain / math.sqrt(16 * 9), rel=0.05)
    g = R3GANGenerator(8, 1, 28, widths=8, blocks=2, groups=2)
    assert all(not b.project.weight.any() for b in g.modules() if isinstance(b, InvertedBottleneck))
    ones = torch.ones(1, 2, 8, 8)
    up, down = Resample(up=True)(ones), Resample(up=False)(ones)
    assert up.shape == (1, 2, 16, 16) and down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))  # away from the
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))  # zero border


def test_cosine_schedules_start_end_and_hold():
    assert cosine_ramp(0, 10, 2.0, 1.0) == 2.0
    assert cosine_ramp(5, 10, 2.0, 1.0) == pytest.approx(1.5)
    assert cosine_ramp(10, 10, 2.0, 1.0) == cosine_ramp(99, 10, 2.0, 1.0) == 1.0
    assert cosine_ramp(7, 0, 2.0, 1.0) == 2.0  # no schedule: the start value
    module = _tiny()
    module.schedule_steps, module.gamma_final_scale, module.ema_half_life = 10, 0.1, 4.0
    assert module.gammas(0) == (0.3, 0.7)
    assert module.gammas(10) == pytest.approx((0.03, 0.07))
    assert module.ema_decay_at(0) == 0.0  # a half-life of 0: the EMA copies G
    assert module.ema_decay_at(10) == pytest.approx(0.5**0.25)


def test_trains_conditionally_on_synthetic_data_and_samples_by_class(tiny_cfg):
    cfg = tiny_cfg("model=r3gan", "model.num_classes=${data.num_classes}", "metrics.at_end=false")
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["global_step"] == 4
    module, _, _ = load_model(cfg.paths.output_dir, "last")
    assert module.family == "r3gan" and module.num_classes == 4 and int(module.d_steps) == 4
    y = torch.tensor([0, 1, 2, 3])
    images = module.sample(4, y=y, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    z = module.latents(1, torch.Generator().manual_seed(1)).expand(4, -1)
    per_class = module.sample(4, y=y, z=z)
    assert not torch.allclose(per_class[0], per_class[1])


SCHEDULED = [
    "model=r3gan",
    "metrics.at_end=false",
    "data.num_samples=64",
    "data.batch_size=8",
    "~callbacks.sample_grid",
    "model.schedule_steps=3",
    "model.lr_final=5e-5",
    "model.beta2_final=0.999",
    "model.gamma_final_scale=0.1",
    "model.ema_half_life=2",
    "callbacks.last_checkpoint.every_n_train_steps=2",
    "callbacks.periodic_checkpoint.every_n_train_steps=2",
]


def test_stop_and_resume_with_the_schedules_matches_an_uninterrupted_run(tiny_cfg, tmp_path):
    """Two batches a step (D, then G), four steps per epoch: stop at step 2 and resume to 4,
    against 4 straight; lr, beta2, gamma and the EMA decay follow the step, not the run."""

    def run(sub, steps, ckpt=None):
        cfg = tiny_cfg(*SCHEDULED, f"trainer.max_steps={steps}")
        cfg.paths.output_dir = str(tmp_path / sub)
        cfg.ckpt_path = ckpt
        train(cfg)
        return cfg

    straight = run("straight", 4)
    run("first", 2)
    resumed = run("resumed", 4, str(tmp_path / "first/checkpoints/last.ckpt"))
    a, b = load_model(straight.paths.output_dir)[0], load_model(resumed.paths.output_dir)[0]
    assert int(a.d_steps) == int(b.d_steps) == 4 and int(a.ema.num_updates) == 4
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    state = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    for opt in state["optimizer_states"]:  # the last step (step 3) is at the schedule's end
        group = opt["param_groups"][0]
        assert group["lr"] == pytest.approx(5e-5) and group["betas"][1] == pytest.approx(0.999)
