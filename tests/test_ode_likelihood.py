"""``genlab.diffusion.ode_likelihood`` against exact answers.

Gaussian data have a closed-form denoiser in the sigma frame, D(x, s) = mu + Sigma (Sigma +
s^2 I)^-1 (x - mu), a closed-form marginal p_s = N(mu, Sigma + s^2 I), and a closed-form
probability-flow solution (each eigen-direction scales by sqrt((lam + s^2) / (lam + s0^2))),
so the ODE likelihood is checked against the density it should give and against the exact
solution of the ODE it integrates. An elementwise Gaussian mixture (the oracle of
tests/test_solvers.py) has a nonlinear denoiser and a closed-form density. A small conv net
checks the two divergence estimators against each other, and a narrow Gaussian on the 8-bit
grid checks the bits/dim bookkeeping against discretized_gaussian_nll.

The ODE gives the density of x0 + sigma_start eps, sigma_start = frame.sigma_min: every
analytic reference below is that of N(mu, Sigma + sigma_start^2 I), not of N(mu, Sigma).
"""

from __future__ import annotations

import math

import pytest
import torch

from genlab.diffusion.frame import EDMFrame, FlowFrame, VPFrame
from genlab.diffusion.ode_likelihood import (
    ode_bits_per_dim,
    ode_nll,
    prior_std,
    protocol,
    resolve_divergence,
    sigma_grid,
)
from genlab.diffusion.process import discretized_gaussian_nll
from genlab.diffusion.schedules import CosineSchedule
from genlab.metrics.likelihood import continuous_to_bits_per_dim

F64 = torch.float64
SHAPE = (1, 4, 4)  # 16 dimensions: exact divergence is 16 backward passes per evaluation
DIMS = math.prod(SHAPE)
FRAMES = {
    "edm": EDMFrame(),  # sigma in [0.002, 80]
    "vp_cosine": VPFrame(CosineSchedule(1000)),  # [0.0064, 20291], prior std sqrt(1 + s^2)
    "flow": FlowFrame(),  # [0.001, 999]
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a busy machine: intra-op threads only add synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bits(nats: torch.Tensor, dims: int = DIMS) -> torch.Tensor:
    return nats / (dims * math.log(2))


# ------------------------------------------------------------------ Gaussian data
class Gaussian:
    """N(mu, Sigma) on (B, *SHAPE) images, Sigma = Q diag(lam) Q^T."""

    def __init__(self, mu: torch.Tensor, lam: torch.Tensor, q: torch.Tensor):
        self.mu, self.lam, self.q = mu, lam, q

    @classmethod
    def isotropic(cls, mean: float, var: float) -> Gaussian:
        return cls(torch.full((DIMS,), mean, dtype=F64), torch.full((DIMS,), var, dtype=F64),
                   torch.eye(DIMS, dtype=F64))  # fmt: skip

    @classmethod
    def correlated(cls, seed: int = 0) -> Gaussian:
        """A random rotation, eigenvalues log-uniform in [0.04, 0.12] (std 0.2 to 0.35)."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DIMS, DIMS, generator=g, dtype=F64))
        lam = torch.exp(torch.empty(DIMS, dtype=F64).uniform_(math.log(0.04), math.log(0.12),
                                                               generator=g))  # fmt: skip
        return cls(0.1 * torch.randn(DIMS, generator=g, dtype=F64), lam, q)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        eps = torch.randn(n, DIMS, generator=generator, dtype=F64)
        return (self.mu + (eps * self.lam.sqrt()) @ self.q.T).view(n, *SHAPE)

    def _rotated(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).double() - self.mu) @ self.q

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x0 + sigma eps = x] = mu + Q diag(lam / (lam + s^2)) Q^T (x - mu)."""
        coef = self.lam / (self.lam + sigma.double()[:, None] ** 2)
        out = self.mu + (self._rotated(x) * coef) @ self.q.T
        return out.view_as(x).to(x.dtype)

    def log_density(self, x: torch.Tensor, s0: float) -> torch.Tensor:
        """log N(x; mu, Sigma + s0^2 I), (B,)."""
        var = self.lam + s0**2
        y = self._rotated(x)
        return -0.5 * (y**2 / var).sum(1) - 0.5 * torch.log(2 * math.pi * var).sum()

    def ode_solution_nll(self, x: torch.Tensor, frame, s0: float) -> torch.Tensor:
        """What the ODE computes without discretisation error: x carried to sigma_max along
        the exact flow, the frame's prior there, plus the exact log-determinant."""
        s1, std = frame.sigma_max, prior_std(frame)
        scale = ((self.lam + s1**2) / (self.lam + s0**2)).sqrt()
        x1 = self.mu + (self._rotated(x) * scale) @ self.q.T
        log_prior = -0.5 * (x1 / std).pow(2).sum(1) - DIMS * math.log(std * math.sqrt(2 * math.pi))
        return -(log_prior + scale.log().sum())


@pytest.mark.parametrize("name", FRAMES)
def test_isotropic_gaussian_matches_its_density(name):
    """N(0.2, 0.09 I): the ODE NLL at 128 steps is log N(mu, (v + sigma_min^2) I) within
    0.01 bits/dim at every test point (measured max 0.0025 EDM, 0.0049 VP, 0.0042 flow).
    Hutchinson is exact here: dD/dx = v / (v + s^2) I, so z^T J z = |z|^2 v / (v + s^2) =
    div D for every Rademacher z (variance 2 sum_{i != j} J_ij^2 = 0)."""
    frame, data = FRAMES[name], Gaussian.isotropic(0.2, 0.09)
    x = data.sample(16, torch.Generator().manual_seed(1))
    ref = -data.log_density(x, frame.sigma_min)
    exact = ode_nll(data.denoise, x, frame, steps=128, divergence="exact")
    assert bits(exact - ref).abs().max() < 0.01
    # Hutchinson equals exact at any steps; 16 keep it cheap
    exact16 = ode_nll(data.denoise, x, frame, steps=16, divergence="exact")
    hutch = ode_nll(data.denoise, x, frame, steps=16, divergence="hutchinson",
                    generator=torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(hutch, exact16, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["edm", "vp_cosine"])
def test_correlated_gaussian_exact_and_hutchinson(name):
    """A full covariance (eigenvalues 0.04..0.12, random rotation): the exact divergence needs
    the off-diagonal Jacobian right, and Hutchinson is now random. Exact: every point within
    0.01 bits/dim of log N(mu, Sigma + sigma_min^2 I). Hutchinson: one Rademacher probe has
    a std of ~0.1 bits/dim here (2 sum_{i != j} M_ij^2 with M = int dD/dx dlog sigma), so 32
    probes on each of 64 points: its mean within 0.01 of the analytic mean, and its
    difference from exact (same trajectory, so zero in expectation) within 4 standard
    errors, with a standard error small enough (< 0.003 bits/dim) for that to mean
    something."""
    frame, data = FRAMES[name], Gaussian.correlated()
    x = data.sample(64, torch.Generator().manual_seed(3))
    ref = -data.log_density(x, frame.sigma_min)
    exact = ode_nll(data.denoise, x, frame, steps=128, divergence="exact")
    assert bits(exact - ref).abs().max() < 0.01
    hutch = ode_nll(data.denoise, x, frame, steps=128, divergence="hutchinson", probes=32,
                    generator=torch.Generator().manual_seed(4))  # fmt: skip
    diff = bits(hutch - exact)
    se = diff.std() / math.sqrt(len(diff))
    assert diff.std() > 1e-4  # the estimator is random here
    assert se < 0.003
    assert diff.mean().abs() < 4 * se
    assert bits(hutch - ref).mean().abs() < 0.01


# ------------------------------------------------------------------ a Gaussian mixture
# Elementwise sum_k pi_k N(mu_k, v_k), the oracle of tests/test_solvers.py.
PI = torch.tensor([0.3, 0.7], dtype=F64)
MU = torch.tensor([-0.6, 0.5], dtype=F64)
VAR = torch.tensor([0.01, 0.04], dtype=F64)


def mixture_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] = x - sum_k w_k s^2 (x - mu_k) / (v_k + s^2), w_k the posterior weights."""
    s2 = sigma.to(F64).view(-1, *([1] * x.ndim)) ** 2
    var = VAR + s2
    d = x.unsqueeze(-1) - MU
    w = torch.softmax(PI.log() - 0.5 * d * d / var - 0.5 * var.log(), dim=-1)
    return x - (w * d * (s2 / var)).sum(-1)


def mixture_log_density(x: torch.Tensor, s0: float) -> torch.Tensor:
    """log prod_i sum_k pi_k N(x_i; mu_k, v_k + s0^2), (B,)."""
    var = VAR + s0**2
    d = x.unsqueeze(-1) - MU
    terms = PI.log() - 0.5 * d * d / var - 0.5 * torch.log(2 * math.pi * var)
    return torch.logsumexp(terms, -1).flatten(1).sum(1)


def mixture_sample(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(PI, n * DIMS, replacement=True, generator=generator)
    eps = torch.randn(n * DIMS, generator=generator, dtype=F64)
    return (MU[k] + VAR[k].sqrt() * eps).view(n, *SHAPE)


@pytest.mark.parametrize("name", FRAMES)
def test_mixture_matches_its_density(name):
    """Against the mixture's density (convolved with sigma_min), at 128 steps: every point
    within 0.01 bits/dim. The denoiser is nonlinear (the posterior weights switch as a
    trajectory crosses between the modes), but no looser bound is needed: measured over 128
    points, max 0.0029 EDM, 0.0043 VP, 0.0037 flow, as small as the Gaussian's. The prior
    mismatch at sigma_max (data mean 0.17, var 0.29) is < 2e-3 bits/dim per point (EDM)."""
    frame = FRAMES[name]
    x = mixture_sample(32, torch.Generator().manual_seed(5))
    err = bits(
        ode_nll(mixture_denoiser, x, frame, steps=128) + mixture_log_density(x, frame.sigma_min)
    )
    assert err.abs().max() < 0.01


# ------------------------------------------------------------------ convergence
@pytest.mark.parametrize("name", FRAMES)
def test_error_falls_when_steps_double(name):
    """Heun is second order: against the exact ODE solution (correlated Gaussian), and the
    mixture against its density, the largest error falls by more than 3 each time the steps
    double (16 -> 32 -> 64; 4 in the limit). The exact solution and the analytic density
    differ only by the prior mismatch, which for one point is first order in mu / sigma_max
    (log N(x1; 0, s^2) - log N(x1; mu, Sigma + s^2) ~ sum_i eps_i mu_i / s, zero on average):
    < 2e-3 bits/dim at sigma_max = 80 (EDM) with |mu_i| ~ 0.1, < 2e-4 in VP and flow."""
    frame, data = FRAMES[name], Gaussian.correlated()
    x = data.sample(8, torch.Generator().manual_seed(6))
    solution = data.ode_solution_nll(x, frame, frame.sigma_min)
    mismatch = bits(solution + data.log_density(x, frame.sigma_min)).abs().max()
    assert mismatch < (2e-3 if name == "edm" else 2e-4)
    xm = mixture_sample(8, torch.Generator().manual_seed(7))
    mix_ref = -mixture_log_density(xm, frame.sigma_min)
    gauss_err, mix_err = [], []
    for steps in (16, 32, 64):
        gauss_err.append(bits(ode_nll(data.denoise, x, frame, steps=steps) - solution).abs().max())
        mix_err.append(
            bits(ode_nll(mixture_denoiser, xm, frame, steps=steps) - mix_ref).abs().max()
        )
    for errs in (gauss_err, mix_err):
        assert errs[0] > 3 * errs[1] > 9 * errs[2], errs


# ------------------------------------------------------------------ a conv net denoiser
class TinyDenoiser(torch.nn.Module):
    """A random conv net with EDM-style preconditioning (sigma_data = 1): D = x / (1 + s^2)
    + s / sqrt(1 + s^2) net(x / sqrt(1 + s^2)); float32, as a family's network runs."""

    def __init__(self, channels: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.Tanh(),
            torch.nn.Conv2d(8, channels, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_in = (1 + s**2).rsqrt()
        return x * c_in**2 + s * c_in * self.net(x * c_in)


def test_conv_net_exact_divergence_is_the_jacobian_trace_and_hutchinson_agrees():
    """(1) The exact divergence is the trace of the full Jacobian (autograd.functional); one
    image's divergence does not see the others. (2) Exact and Hutchinson (Rademacher, 4
    probes, 48 images of 2x4x4 = 32 dims, 16 steps on EDM) agree in expectation: the mean
    difference within 4 standard errors, which are < 0.02 bits/dim."""
    from genlab.diffusion.ode_likelihood import _denoise_and_div

    den = TinyDenoiser().eval()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    _, div = _denoise_and_div(den, x, 0.7, None)
    sigma = torch.full((1,), 0.7, dtype=F64)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: den(v, sigma), x[i : i + 1])
        torch.testing.assert_close(
            div[i], jac.reshape(32, 32).trace().double(), rtol=1e-5, atol=1e-5
        )

    frame = FRAMES["edm"]
    x = torch.randn(48, 2, 4, 4, generator=torch.Generator().manual_seed(9))
    assert resolve_divergence("auto", 32) == "exact"
    exact = ode_nll(den, x, frame, steps=16, divergence="exact")
    hutch = ode_nll(den, x, frame, steps=16, divergence="hutchinson", probes=4,
                    generator=torch.Generator().manual_seed(10))  # fmt: skip
    diff = bits(hutch - exact, 32)
    se = diff.std() / math.sqrt(len(diff))
    assert 0 < se < 0.02
    assert diff.mean().abs() < 4 * se
    assert torch.isfinite(exact).all() and exact.dtype == F64


# ------------------------------------------------------------------ bits/dim on 8-bit data
def test_bits_per_dim_of_a_narrow_gaussian_on_8bit_data():
    """Data N(0.1, 0.02^2 I) (std 2.55 bins of w = 2/255) quantised to the 8-bit grid; EDM,
    128 steps, 16 points each dequantised 32 times (512 images).

    - bookkeeping, per image: (-log p(x + u) - D log w) / (D ln 2) with u in (-1/255, 1/255)
      (read off the denoiser's first input), p = N(mu, (0.02^2 + 0.002^2) I), within 0.01;
      equal to metrics.likelihood's continuous_to_bits_per_dim of ode_nll(x + u);
    - against the discrete truth, -log2 of N(mu, 0.02^2) integrated over each bin
      (discretized_gaussian_nll): dequantisation's expectation over u (closed form for a
      Gaussian: (x - mu)^2 -> (x - mu)^2 + w^2 / 12) is an upper bound, above it by the
      Jensen gap, w^2 (x - mu)^2 / (24 sigma^4) nats per dimension to second order in w,
      about w^2 / (24 sigma^2 ln 2) = 0.009 bits/dim on average. So the ODE's mean bits/dim
      is the discrete one plus that gap, within 0.005 of ODE error (measured 0.0013) and 4
      standard errors of the dequantisation noise (0.0018 here), i.e. within ~0.02 of it."""
    frame, sd, w = FRAMES["edm"], 0.02, 2 / 255
    data = Gaussian.isotropic(0.1, sd**2)
    k = ((data.sample(16, torch.Generator().manual_seed(11)) + 1) * 127.5).round().clamp(0, 255)
    x = (k / 127.5 - 1).repeat(32, 1, 1, 1)
    seen = []

    def spy(v, sigma):
        if not seen:
            seen.append(v.detach().clone())
        return data.denoise(v, sigma)

    bpd = ode_bits_per_dim(spy, x, frame, steps=128, generator=torch.Generator().manual_seed(12))
    x_in = seen[0]
    u = (x_in - x) * 255  # uniform on (-1, 1): mean 0, mean square 1/3
    assert u.abs().max() <= 1 + 1e-9 and abs(float(u.mean())) < 0.05
    assert abs(float(u.pow(2).mean()) - 1 / 3) < 0.02
    at_input = bits(-data.log_density(x_in, frame.sigma_min) - DIMS * math.log(w))
    assert (bpd - at_input).abs().max() < 0.01
    nll = ode_nll(data.denoise, x_in, frame, steps=128)
    torch.testing.assert_close(bpd, continuous_to_bits_per_dim(nll, DIMS), rtol=0, atol=1e-12)

    var = sd**2 + frame.sigma_min**2
    expected = bits((0.5 * math.log(2 * math.pi * var) + ((x - 0.1) ** 2 + w**2 / 12) / (2 * var))
                    .flatten(1).sum(1) - DIMS * math.log(w))  # fmt: skip
    log_sd = torch.full_like(x, math.log(sd))
    discrete = bits(discretized_gaussian_nll(x, torch.full_like(x, 0.1), log_sd).flatten(1).sum(1))
    gap = float((expected - discrete).mean())
    assert abs(gap - w**2 / (24 * sd**2 * math.log(2))) < 0.002, gap
    se = float((at_input - expected).std()) / math.sqrt(len(x))
    assert abs(float(bpd.mean() - discrete.mean()) - gap) < 0.005 + 4 * se
    assert 2.5 < float(discrete.mean()) < 4.5  # log2(sd sqrt(2 pi e) / w) = 3.4 bits/dim


def test_no_dequantisation_is_the_density_at_the_bin_centre():
    frame, data = FRAMES["edm"], Gaussian.isotropic(0.1, 0.02**2)
    x = torch.full((2, *SHAPE), 0.1, dtype=F64)
    bpd = ode_bits_per_dim(data.denoise, x, frame, dequantize=False, steps=32)
    nll = ode_nll(data.denoise, x, frame, steps=32)
    torch.testing.assert_close(bpd, continuous_to_bits_per_dim(nll, DIMS), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ the API
def test_calls_grid_grad_mode_and_protocol():
    """2 * steps denoiser calls with sigma (B,) float64 on a log-spaced grid from sigma_min to
    sigma_max; works under torch.no_grad (a family's bits_per_dim runs there); a denoiser
    without gradients is refused; the protocol records what ran."""
    frame, data = FRAMES["vp_cosine"], Gaussian.isotropic(0.0, 0.1)
    calls = []

    def counted(v, sigma):
        assert sigma.shape == (v.shape[0],) and sigma.dtype == F64
        calls.append(float(sigma[0]))
        return data.denoise(v, sigma)

    x = data.sample(2, torch.Generator().manual_seed(13))
    with torch.no_grad():
        nll = ode_nll(counted, x, frame, steps=8)
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    assert len(calls) == 16
    grid = sigma_grid(frame, 8)
    assert grid[0] == frame.sigma_min and grid[-1] == frame.sigma_max
    torch.testing.assert_close(grid.log().diff(), torch.full((8,), float(grid.log().diff()[0]),
                                                             dtype=F64))  # fmt: skip
    assert sorted(set(calls)) == pytest.approx(grid.tolist())

    def detached(v, sigma):
        return data.denoise(v.detach(), sigma)

    with pytest.raises(RuntimeError, match="no gradient"):
        ode_nll(detached, x, frame, steps=2)
    with pytest.raises(ValueError, match="divergence"):
        ode_nll(counted, x, frame, steps=2, divergence="trace")
    assert resolve_divergence("auto", 65) == "hutchinson"

    kw = {"steps": 8, "divergence": "hutchinson", "probes": 2}
    p = protocol(frame, generator=torch.Generator(), **kw)
    assert p["estimator"] == "probability-flow ODE" and p["solver"] == "heun"
    assert p["steps"] == 8 and p["nfe"] == 16 and p["divergence"] == "hutchinson"
    assert p["probes"] == 2 and p["dequantization"] == "uniform"
    assert p["sigma_start"] == frame.sigma_min and p["sigma_max"] == frame.sigma_max
    assert p["prior_std"] == pytest.approx(math.sqrt(1 + frame.sigma_max**2))
    assert protocol(FRAMES["edm"], num_dims=16)["divergence"] == "exact"
    assert "probes" not in protocol(FRAMES["edm"], num_dims=16)
    assert protocol(FRAMES["flow"], num_dims=3 * 32 * 32)["divergence"] == "hutchinson"
    assert protocol(FRAMES["flow"])["divergence"].startswith("auto")


def test_bpd_ode_is_reported_next_to_ddpms_bound_and_is_edms_own(tiny_cfg, tmp_path):
    """metrics=[bpd, bpd_ode]: a DDPM run reports its variational bound (val/bpd) and the ODE
    likelihood (val/bpd_ode) with their own protocols; an EDM run's bits/dim is the ODE's
    already, reported once and copied."""
    from genlab.train import train

    ddpm = train(tiny_cfg("metrics.metrics=[bpd,bpd_ode]", "~callbacks.sample_grid"))
    protocol = ddpm["evaluation"]["protocol"]
    assert "variational bound" in protocol["bpd"]["estimator"]
    assert protocol["bpd_ode"]["estimator"] == "probability-flow ODE"
    assert protocol["bpd_ode"]["steps"] == 4  # tiny_cfg's ode_steps
    bound, ode = ddpm["metrics"]["val/bpd"], ddpm["metrics"]["val/bpd_ode"]
    assert math.isfinite(bound) and math.isfinite(ode) and bound != ode

    cfg = tiny_cfg("model=edm", "metrics.metrics=[bpd,bpd_ode]", "~callbacks.sample_grid")
    cfg.paths.output_dir = str(tmp_path / "edm")
    edm = train(cfg)
    assert edm["metrics"]["val/bpd_ode"] == edm["metrics"]["val/bpd"]
    assert edm["evaluation"]["protocol"]["bpd_ode"] == edm["evaluation"]["protocol"]["bpd"]
