"""EDM and flow matching: the preconditioning of Karras et al. 2022 (Table 1), the flow path
and its velocity target, the minibatch OT coupling, min-SNR weighting, and each family's
denoiser in the shared sigma frame."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from genlab.diffusion import CosineSchedule
from genlab.families.diffusion import DiffusionModule
from genlab.families.edm import EDMModule
from genlab.families.flow import FlowModule, ot_pairing

from .conftest import compose_cfg


class Recorder(nn.Module):
    """A network that records its inputs and returns a fixed output (or its input)."""

    def __init__(self, out=None):
        super().__init__()
        self.out, self.seen = out, []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, c_noise, y=None):
        self.seen.append((x.detach().clone(), c_noise.detach().clone()))
        return (x if self.out is None else self.out(x, c_noise)) + 0 * self.w


def test_edm_preconditioning_is_table_1():
    model = EDMModule(Recorder(), (1, 2, 2), ema_decay=0)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = model.preconditioning(sigma)
    sd = 0.5
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (s**2 + sd**2))
        assert c_out[i].item() == pytest.approx(s * sd / math.sqrt(s**2 + sd**2))
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2))
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4)
    # lambda(sigma) c_out(sigma)^2 = 1: the effective weight of the F-space loss is uniform
    weight = model.loss_weight(sigma) * c_out**2
    torch.testing.assert_close(weight, torch.ones(3, dtype=torch.float64))


def test_edm_network_target_with_the_ideal_denoiser():
    """If D is the ideal denoiser of a point mass at x0 (D = x0), the network output that
    produces it is (x0 - c_skip x) / c_out: what the loss regresses (Eq. 8); the loss of that
    network is zero and the denoiser built from it returns x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 3, 3, generator=g) * 2 - 1
    model = EDMModule(Recorder(), (1, 3, 3), ema_decay=0)

    def ideal(x_in, c_noise):  # invert c_in and c_noise to the sigma and x the module used
        sigma = (4 * c_noise.double()).exp()
        c_skip, c_out, c_in, _ = model.preconditioning(sigma)
        x = x_in / c_in.view(-1, 1, 1, 1).float()
        return ((x0 - c_skip.view(-1, 1, 1, 1) * x) / c_out.view(-1, 1, 1, 1)).float()

    model.net.out = ideal
    assert model.loss(x0, None, torch.Generator().manual_seed(1)).max().item() < 1e-8
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1).float() * torch.randn(x0.shape, generator=g)
    torch.testing.assert_close(model.denoiser(None, use_ema=False)(x, sigma), x0, atol=1e-4, rtol=0)


def test_edm_training_sigmas_are_log_normal():
    model = EDMModule(Recorder(), (1, 2, 2), ema_decay=0)
    log_sigma = model.sample_sigma(200_000, torch.Generator().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_flow_path_and_velocity_target_are_exact():
    """The network sees x_t = (1 - t) x0 + t eps and its time scaled; the exact velocity
    eps - x0 gives zero loss, and the denoiser built from it maps any point of the path back
    to x0 (through the sigma frame: sigma = t / (1 - t), x = x_t / (1 - t))."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 2, 2, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    model = FlowModule(Recorder(lambda x, c: eps - x0), (1, 2, 2), ema_decay=0,
                       time_sampling="uniform")  # fmt: skip
    loss = model.loss(x0, None, torch.Generator().manual_seed(3), noise=eps)
    assert loss.max().item() < 1e-12
    x_t, c = model.net.seen[-1]
    t = model.sample_time(5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(c, 1000 * t)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64)
    sigma = model.frame.sigma_of(t)
    x = ((1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps) / (1 - t.view(-1, 1, 1, 1))
    torch.testing.assert_close(model.denoiser(None, use_ema=False)(x.float(), sigma), x0,
                               atol=1e-4, rtol=0)  # fmt: skip


def test_logit_normal_time_sampling():
    model = FlowModule(Recorder(), (1, 2, 2), ema_decay=0, time_sampling="logit_normal")
    t = model.sample_time(100_000, torch.Generator().manual_seed(0))
    logit = torch.log(t) - torch.log1p(-t)
    assert logit.mean().item() == pytest.approx(0.0, abs=0.02)
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="time_sampling"):
        FlowModule(Recorder(), (1, 2, 2), time_sampling="cosine")


def test_ot_coupling_is_the_optimal_assignment_and_respects_classes():
    """On 6 points the pairing's cost equals the best of all 720 permutations; with labels
    every image is paired with noise of its own class group."""
    from itertools import permutations

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 2, 2, generator=g), torch.randn(6, 1, 2, 2, generator=g)
    order = ot_pairing(x0, noise, None)
    cost = lambda p: ((x0 - noise[list(p)]) ** 2).sum().item()  # noqa: E731
    assert sorted(order.tolist()) == list(range(6))
    assert cost(order.tolist()) == pytest.approx(min(cost(p) for p in permutations(range(6))))
    assert cost(order.tolist()) <= cost(range(6))
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    paired = ot_pairing(x0, noise, y)
    assert torch.equal(y[paired], y)


def test_min_snr_weighting():
    """min(SNR, gamma) in x0 space, divided by what each parameterisation already weighs x0 by."""
    schedule = CosineSchedule(1000)
    t = torch.tensor([10, 300, 500, 900])
    snr = schedule.log_snr(t).exp()
    for prediction, per in [("eps", snr), ("x0", torch.ones_like(snr)), ("v", snr + 1)]:
        model = DiffusionModule(Recorder(), (1, 2, 2), schedule=schedule, prediction=prediction,
                                loss_weighting="min_snr", min_snr_gamma=5.0)  # fmt: skip
        torch.testing.assert_close(model.loss_weight(t), (snr.clamp(max=5.0) / per).float())
    plain = DiffusionModule(Recorder(), (1, 2, 2), schedule=schedule)
    assert torch.equal(plain.loss_weight(t), torch.ones(4))
    with pytest.raises(ValueError, match="loss_weighting"):
        DiffusionModule(Recorder(), (1, 2, 2), loss_weighting="p2")


@pytest.mark.parametrize("preset", ["edm", "flow"])
def test_cfg_and_every_solver_on_the_new_families(preset, tmp_path):
    """Class-conditional EDM / flow models (random UNets) take classifier-free guidance and
    sample with each solver; guided and unguided samples differ."""
    from functools import partial

    from genlab.diffusion import samplers
    from genlab.guidance.cfg import ClassifierFree

    cfg = compose_cfg([f"model={preset}", "data=synthetic", "model.num_classes=3"], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():  # the UNet starts with a zero output layer: make the labels matter
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.tensor([0, 1, 2])
    for solver in (samplers.euler, samplers.heun, samplers.dpmpp_2m, samplers.unipc):
        model.sampler = partial(solver, steps=3)
        model.set_guidance(None)
        plain = model.sample(3, y=y, generator=torch.Generator().manual_seed(0), use_ema=False)
        model.set_guidance(ClassifierFree(4.0))
        guided = model.sample(3, y=y, generator=torch.Generator().manual_seed(0), use_ema=False)
        assert guided.shape == (3, *model.image_shape) and torch.isfinite(guided).all()
        assert not torch.allclose(guided, plain)
        assert model.describe()["sampler"]["name"] == solver.__name__


def test_a_solver_switch_keeps_the_steps_and_bad_options_are_named(tiny_cfg):
    """A DDIM run (eta in its config) sampled with dpmpp_2m: the switch keeps the run's steps
    and drops eta; a sampler given an option it lacks fails at build time, naming the key."""
    from functools import partial

    from genlab.diffusion.samplers import dpmpp_2m
    from genlab.families.denoising import check_sampler
    from genlab.runs import load_model
    from genlab.train import train

    cfg = tiny_cfg("model=diffusion", "+model.sampler.eta=0.5")
    train(cfg)
    switch = ["sampler._target_=genlab.diffusion.samplers.dpmpp_2m"]
    model = load_model(cfg.paths.output_dir, overrides=switch).model
    assert model.describe()["sampler"]["name"] == "dpmpp_2m"
    assert model.sampler.keywords["steps"] == cfg.model.sampler.steps
    assert "eta" not in model.sampler.keywords
    with pytest.raises(ValueError, match="dpmpp_2m takes no eta"):
        check_sampler(partial(dpmpp_2m, steps=3, eta=1.0))
