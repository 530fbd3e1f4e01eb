"""Exact tests of the diffusion math: schedules, conversions, samplers, the bound."""

import math

import pytest
import torch

from genlab.diffusion import CosineSchedule, LinearSchedule, VPFrame, ddim, ddpm, process


@pytest.mark.parametrize(
    "schedule", [LinearSchedule(1000), CosineSchedule(1000), LinearSchedule(50)]
)
def test_schedule_endpoints_and_monotonicity(schedule):
    ab = schedule.alphas_cumprod
    assert ab.shape == (schedule.num_timesteps,)
    assert torch.all(ab[1:] < ab[:-1]), "alpha-bar must strictly decrease"
    assert ab[0] > 0.99 and ab[-1] < 1e-2, (ab[0], ab[-1])
    assert torch.all((schedule.betas > 0) & (schedule.betas < 1))


def test_linear_schedule_matches_ho_et_al():
    s = LinearSchedule(1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    # alpha-bar_T of the DDPM linear schedule is ~4.0e-5 (Ho et al. 2020)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-2)


def test_cosine_schedule_matches_closed_form():
    s, T, off = CosineSchedule(1000), 1000, 0.008
    f = lambda t: math.cos((t / T + off) / (1 + off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction):
    s = CosineSchedule(1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 10, 500, 900, 999])
    x_t = process.q_sample(s, x0, t, noise)
    target = process.training_target(prediction, s, x0, t, noise)
    # an exact network output in any parameterisation maps back to the true x0 and eps
    x0_back = process.predict_x0(prediction, s, x_t, t, target)
    torch.testing.assert_close(x0_back, x0, atol=2e-3, rtol=0)
    eps_back = process.eps_from_x0(s, x_t, t[:], x0)
    torch.testing.assert_close(eps_back[1:], noise[1:], atol=2e-3, rtol=0)
    torch.testing.assert_close(
        process.v_from_x0(s, x_t, t, x0),
        process.training_target("v", s, x0, t, noise),
        atol=2e-3,
        rtol=0,
    )


def test_time_spacing_is_the_respaced_ddim_grid():
    """spacing=time of a discrete schedule: the trained timesteps T-1 .. 0, evenly, then
    sigma = 0 (alpha-bar 1), whose sigmas are exactly the table's."""
    frame = VPFrame(LinearSchedule(1000))
    full = frame.sigmas(1000, "time")
    torch.testing.assert_close(full[:-1], frame.table.flip(0))
    grid = frame.timestep(frame.sigmas(10, "time")[:-1])
    assert grid[0] == 999 and grid[-1] == 0 and len(set(grid.tolist())) == 10
    assert torch.equal(grid, grid.round())  # trained sigmas map back to integer timesteps
    with pytest.raises(ValueError, match="steps in"):
        VPFrame(LinearSchedule(50)).sigmas(51, "time")


@pytest.mark.parametrize("steps", [1000, 50, 5])
def test_ddim_eta0_with_oracle_denoiser_recovers_data_exactly(steps):
    frame = VPFrame(LinearSchedule(1000))
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, (4, 1, 8, 8), generator=g).float() / 127.5 - 1).double()
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    oracle = lambda x, sigma: x0  # noqa: E731 - knows the data
    out = ddim(oracle, noise, frame, steps=steps, eta=0.0)
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)


def _gaussian_oracle(mu, var):
    """Exact E[x0 | x] in the sigma frame when x0 ~ N(mu, var) elementwise."""

    def denoise(x, sigma):
        s2 = (sigma**2).to(x.dtype).view(-1, 1, 1, 1)
        return mu + var / (var + s2) * (x - mu)

    return denoise


# Ancestral samplers plug E[x0 | x] into q(x_s | x_t, x0) and so drop Var[x0 | x]: exact
# only as steps get small, hence the full chain for them; DDIM (eta=0) is exact on fewer.
@pytest.mark.parametrize(
    "sampler,opts,steps",
    [(ddim, {"eta": 0.0}, 200), (ddim, {"eta": 1.0}, 1000), (ddpm, {"variance": "small"}, 1000)],
)
def test_samplers_with_exact_denoiser_reach_the_data_distribution(sampler, opts, steps):
    frame = VPFrame(LinearSchedule(1000))
    mu, var = 0.3, 0.04
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(4000, 1, 2, 2, generator=g, dtype=torch.float64)
    out = sampler(
        _gaussian_oracle(mu, var), noise, frame, steps=steps, generator=g, clip_x0=False, **opts
    )
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.var().item() == pytest.approx(var, rel=0.1)


def test_discretized_gaussian_is_a_distribution_over_256_values():
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_std in [(0.0, math.log(0.1)), (0.9, math.log(0.02)), (-1.2, math.log(0.5))]:
        nll = process.discretized_gaussian_nll(
            values, torch.full_like(values, mean), torch.full_like(values, log_std)
        )
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_stratified_bpd_is_unbiased_for_the_exact_bound():
    """The cheap estimate (few timesteps) averages to the exact T-term bound."""
    from genlab.families import DiffusionModule
    from genlab.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        1,
        4,
        base_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
        groups=8,
    )
    for p in net.conv_out.parameters():  # a non-trivial denoiser
        torch.nn.init.normal_(p, std=0.05)
    model = DiffusionModule(net, (1, 4, 4), schedule=LinearSchedule(40), ema_decay=0)
    x = torch.randint(0, 256, (1, 1, 4, 4)).float() / 127.5 - 1
    x = x.expand(4096, -1, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    exact = model.bits_per_dim(x, generator=g, timesteps=40)
    estimate = model.bits_per_dim(x, generator=g, timesteps=6)
    stderr = (exact.var() / len(x) + estimate.var() / len(x)).sqrt().item()
    assert abs(estimate.mean().item() - exact.mean().item()) < 4 * stderr, stderr
    assert stderr < 0.05 * exact.mean().item()  # the check has teeth: errors are small
    assert 0 < exact.mean().item() < 20
