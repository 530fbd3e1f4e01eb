"""Consistency models: the boundary condition by construction, the parameterisation and the
curriculum against the papers' formulas, multistep sampling with an exact consistency function,
the distillation step against the shared solvers, and tiny training runs in both modes."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from genlab.diffusion import consistency as cm
from genlab.diffusion.frame import EDMFrame, NoiseFrame
from genlab.diffusion.samplers import euler, heun
from genlab.evaluate import main as evaluate_main
from genlab.families.consistency import ConsistencyModule
from genlab.metrics.protocol import count_rows
from genlab.nets.unet import UNet
from genlab.runs import load_model
from genlab.train import train

from .conftest import TINY, compose_cfg

SMALL_UNET = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]",
              "model.net.attn_resolutions=[]"]  # fmt: skip


def tiny_unet(dropout: float = 0.1) -> UNet:
    return UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=dropout, num_classes=0,
                num_heads=1)  # fmt: skip


def tiny_model(**kw) -> ConsistencyModule:
    torch.manual_seed(0)
    return ConsistencyModule(tiny_unet(kw.pop("dropout", 0.1)), (1, 8, 8), **kw)


def tiny_run(root: Path, model: str, *extra: str) -> Path:
    """A 2-step run on synthetic 16x16 data, no evaluation and no grids."""
    tiny = [o for o in TINY if not o.startswith("metrics")]
    overrides = [*tiny, "metrics=none", f"model={model}", "trainer.max_steps=2",
                 "~callbacks.sample_grid", f"paths.cache_dir={root / 'cache'}", *SMALL_UNET,
                 *extra]  # fmt: skip
    run = root / model
    assert train(compose_cfg(overrides, run))["status"] == "completed"
    return run


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("teacher"), "edm")


# ------------------------------------------------------------------ the parameterisation
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boundary_condition_holds_exactly_for_any_network(seed):
    """f(x, sigma_min) = x bit for bit, for random weights and inputs, dropout on or off."""
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    for p in model.net.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(3, 1, 8, 8, generator=g) * 10
    sigma = torch.full((3,), model.frame.sigma_min, dtype=torch.float64)
    for train_mode in (True, False):
        model.train(train_mode)
        assert torch.equal(model.consistency(x, sigma), x)
        assert torch.equal(model.denoiser(None, use_ema=True)(x, sigma), x)
    assert not torch.equal(model.consistency(x, sigma * 2), x)  # the net does act above it


def test_coefficients_are_song_et_al_app_c():
    model = tiny_model()
    sd, smin = 0.5, 0.002
    sigma = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = model.preconditioning(sigma)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / ((s - smin) ** 2 + sd**2), rel=1e-12)
        assert c_out[i].item() == pytest.approx((s - smin) * sd / math.sqrt(s**2 + sd**2),
                                                rel=1e-12, abs=0)  # fmt: skip
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sd**2), rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0
    # far above sigma_min they tend to EDM's (Karras et al. 2022, Table 1)
    assert c_skip[-1].item() == pytest.approx(sd**2 / (80**2 + sd**2), rel=1e-4)


def test_discretisation_curriculum_and_pair_probabilities():
    grid = cm.discretisation(11, 0.002, 80.0)
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(80.0)
    assert (grid[1:] > grid[:-1]).all()
    # iCT: K = 400k, s0 = 10, s1 = 1280 -> K' = floor(400000 / 8) = 50000
    want = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 150_000: 81, 349_999: 1281 // 2 + 1,
            350_000: 1281, 399_999: 1281, 10**7: 1281}  # fmt: skip
    for k, n in want.items():
        assert cm.curriculum(k, 400_000) == n, k
    assert cm.curriculum(3, 4) == 81  # a 4-step run: K' = 1, one doubling per step
    probs = cm.lognormal_pair_probs(grid, -1.1, 2.0)
    erf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in grid.tolist()]
    mass = torch.tensor([b - a for a, b in zip(erf, erf[1:])], dtype=torch.float64)
    torch.testing.assert_close(probs, mass / mass.sum())


def test_pseudo_huber_is_its_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    c = 0.00054 * math.sqrt(75)
    want = [math.sqrt(((a[i] - b[i]) ** 2).sum().item() + c**2) - c for i in range(4)]
    torch.testing.assert_close(cm.pseudo_huber(a, b), torch.tensor(want), rtol=1e-6, atol=0)
    assert cm.pseudo_huber(a, a).abs().max().item() == 0.0
    # small differences: ~ |a - b|^2 / 2c; large ones: ~ |a - b| - c
    a = a.double()
    small = cm.pseudo_huber(a, a + 1e-6, c=1.0)
    torch.testing.assert_close(small, torch.full((4,), 75e-12 / 2, dtype=torch.float64))
    norm = (a - b.double()).flatten(1).norm(dim=1)
    torch.testing.assert_close(cm.pseudo_huber(a, b.double(), c=1e-3), norm - 1e-3)


# ------------------------------------------------------------------ sampling
def gaussian_consistency(mu: float, s0: float, sigma_min: float):
    """The exact consistency function of data N(mu, s0^2 I): the probability-flow ODE scales
    x - mu by sqrt(s0^2 + sigma'^2) / sqrt(s0^2 + sigma^2) between noise levels."""

    def f(x, sigma):
        scale = math.sqrt(s0**2 + sigma_min**2) / (s0**2 + sigma.double() ** 2).sqrt()
        return mu + (x - mu) * scale.to(x.dtype).view(-1, 1, 1, 1)

    return f


def test_multistep_sampling_with_the_exact_consistency_function():
    frame, mu, s0 = EDMFrame(), 0.2, 0.3
    f = gaussian_consistency(mu, s0, frame.sigma_min)
    noise = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    one = cm.consistency_sampler(f, noise, frame, steps=1, clip_x0=False)
    scale = math.sqrt(s0**2 + 0.002**2) / math.sqrt(s0**2 + 80.0**2)
    torch.testing.assert_close(one, mu + (noise * 80.0 - mu) * scale)
    # two steps: f at sigma_max, fresh noise to sigma = 0.821, f again (Algorithm 1)
    g = torch.Generator().manual_seed(1)
    two = cm.consistency_sampler(f, noise, frame, steps=2, clip_x0=False, generator=g)
    z = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    s = torch.full((6,), 0.821, dtype=torch.float64)
    torch.testing.assert_close(two, f(one + math.sqrt(0.821**2 - 0.002**2) * z, s))
    # every step lands on the data distribution N(mu, s0^2 + sigma_min^2)
    big = torch.randn(40_000, 1, 1, 1, generator=torch.Generator().manual_seed(2))
    for steps in (1, 2, 4):
        x = cm.consistency_sampler(f, big, frame, steps=steps, clip_x0=False,
                                   generator=torch.Generator().manual_seed(3))  # fmt: skip
        assert x.mean().item() == pytest.approx(mu, abs=0.01)
        assert x.std().item() == pytest.approx(math.hypot(s0, 0.002), rel=0.02)


def test_sampling_levels():
    frame = EDMFrame()
    assert cm.consistency_sigmas(frame, 1) == [80.0]
    assert cm.consistency_sigmas(frame, 2) == [80.0, 0.821]
    assert cm.consistency_sigmas(frame, 2, mid_sigma=None) == pytest.approx(
        cm.consistency_sigmas(frame, 2, spacing="karras", mid_sigma=None))  # fmt: skip
    four = cm.consistency_sigmas(frame, 4)
    karras = frame.sigmas(5, "karras")[:4].tolist()  # 5 levels to sigma_min, the last left out
    assert four == pytest.approx(karras) and four[-1] > frame.sigma_min
    assert cm.consistency_sigmas(frame, 3, sigmas=[10.0, 1.0]) == [80.0, 10.0, 1.0]
    with pytest.raises(ValueError, match="3 steps take 2 levels"):
        cm.consistency_sigmas(frame, 3, sigmas=[1.0])
    with pytest.raises(ValueError, match="must decrease"):
        cm.consistency_sigmas(frame, 3, sigmas=[1.0, 10.0])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_samples_have_the_data_shape_and_range_and_count_steps_evaluations(steps):
    model = tiny_model().eval()
    with count_rows(model.nfe_module()) as rows:
        images = model.sample(5, generator=torch.Generator().manual_seed(0), steps=steps)
    assert images.shape == (5, 1, 8, 8)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert rows[0] / 5 == steps  # NFE = steps, as val/sample_nfe counts it


# ------------------------------------------------------------------ training
class Interval(NoiseFrame):
    """A frame whose grid is the single step sigma_from -> sigma_to (no step to 0)."""

    def __init__(self, sigma_from: float, sigma_to: float):
        self.sigma_max, self.sigma_min = sigma_from, sigma_to

    def sigmas(self, steps: int, spacing: str = "karras", rho: float = 7.0) -> torch.Tensor:
        return torch.tensor([self.sigma_max, self.sigma_min], dtype=torch.float64)


@pytest.mark.parametrize("solver", [heun, euler])
def test_teacher_step_is_one_step_of_the_shared_solver(solver):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 4, 4, generator=g)

    def denoise(x, sigma):  # a nonlinear denoiser that depends on sigma
        return torch.tanh(x * w) / (1 + sigma.to(x.dtype).view(-1, 1, 1, 1))

    s_from, s_to = 2.5, 1.7
    x = torch.randn(3, 1, 4, 4, generator=g) * s_from
    s = torch.full((3,), s_from, dtype=torch.float64)
    ours = cm.ode_step(denoise, x, s, torch.full_like(s, s_to), solver.__name__)
    shared = solver(denoise, x / s_from, Interval(s_from, s_to), steps=1)
    torch.testing.assert_close(ours, shared, rtol=1e-6, atol=1e-6)


def test_the_target_replays_the_online_dropout_mask(monkeypatch):
    """With sigma_n = sigma_{n+1} the online and target passes see the same input; with the
    dropout mask replayed they agree exactly, so the loss is 0 even in training mode."""
    model = tiny_model(dropout=0.5, weighting="uniform", distance="l2").train()
    same = lambda b, g, device=None: (torch.full((b,), 1.0, dtype=torch.float64),) * 2  # noqa: E731
    monkeypatch.setattr(model, "sample_pairs", same)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    assert model.loss(x0, None).abs().max().item() == 0.0


def test_training_pairs_follow_the_curriculum():
    model = tiny_model(curriculum_steps=800)
    assert model.num_levels(0) == 11 and model.num_levels(100) == 21
    assert model.num_levels(799) == 1281
    s, s_next = model.sample_pairs(1000, torch.Generator().manual_seed(0))
    grid = cm.discretisation(11, 0.002, 80.0)
    assert set(s.tolist()) <= set(grid[:-1].tolist()) and (s_next > s).all()
    fixed = tiny_model(curriculum_steps=0, num_scales=18)
    assert fixed.num_levels(10**6) == 18


def test_consistency_training_steps_have_finite_losses():
    model = tiny_model(curriculum_steps=4)
    opt = torch.optim.RAdam(model.net.parameters(), lr=1e-4)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    for _ in range(3):
        loss = model.loss(x0, None).mean()
        assert torch.isfinite(loss) and loss.item() > 0
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_distillation_from_an_edm_run(edm_run, tmp_path):
    """CD from a tiny EDM run: its target step is the teacher's Heun step, the student starts
    from the teacher's EMA network (init_run), the teacher stays out of the checkpoint, and
    the result samples in 1-4 NFE through the evaluation's NFE sweep."""
    teacher = load_model(edm_run).model
    run = tmp_path / "cd"
    tiny = [o for o in TINY if not o.startswith("metrics")]
    cfg = compose_cfg([*tiny, "metrics=none", "model=consistency_distill", *SMALL_UNET,
                       f"model.teacher_run={edm_run}", f"model.init_run={edm_run}",
                       "trainer.max_steps=2", "~callbacks.sample_grid",
                       f"paths.cache_dir={tmp_path / 'cache'}"], run)  # fmt: skip
    model = instantiate(cfg.model)
    model.setup("fit")
    for a, b in zip(model.net.parameters(), teacher.ema.module.parameters()):
        assert torch.equal(a, b)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    loss = model.loss(x0, None, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())

    assert train(cfg)["status"] == "completed"
    student = load_model(run).model
    assert student.mode == "distillation" and not student._teacher  # loaded lazily: not here
    evaluate_main([f"run_dir={run}", "nfe=[1,2,4]", "device=cpu", "n=8", "metrics=cpu",
                   "metrics.sample_batch_size=8", "metrics.reference_samples=32",
                   "metrics.digit_datasets=[synthetic]", "+metrics.progress=false",
                   f"paths.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    rows = list(csv.DictReader(open(run / "nfe.csv", newline="")))
    got = [(int(r["nfe_requested"]), int(r["steps"]), int(r["nfe"])) for r in rows]
    assert got == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert {r["solver"] for r in rows} == {"consistency_sampler"}


def test_modes_are_checked():
    with pytest.raises(ValueError, match="needs teacher_run"):
        tiny_model(mode="distillation")
    with pytest.raises(ValueError, match="mode must be one of"):
        tiny_model(mode="ct")
