"""VAE family: the Gaussian KL, the decoder likelihoods, the importance-weighted bound against
an exact likelihood, vector quantisation (straight-through, EMA codebook, dead-code restarts),
binarised data, KL warm-up, the conditional VAE, and the VQ-VAE's refusal to sample."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from genlab.data import SyntheticDataModule
from genlab.families.contract import Generative, Likelihood, Reconstructing
from genlab.families.likelihoods import DecoderLikelihood
from genlab.families.vae import VAEModule, gaussian_kl, gaussian_log_prob
from genlab.families.vqvae import VQVAEModule
from genlab.metrics.likelihood import importance_weighted_bound
from genlab.nets import ConvDecoder, ConvEncoder, VectorQuantizer, VQDecoder, VQEncoder
from genlab.runs import load_model
from genlab.sample import main as sample_main
from genlab.train import train
from genlab.utils import UsageError

from .conftest import logged

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit grid in [-1, 1]


def test_analytic_gaussian_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, generator=g, dtype=torch.float64).clamp(-2, 1)
    n = 200_000
    z = mean + torch.exp(0.5 * logvar) * torch.randn(n, 3, 4, generator=g, dtype=torch.float64)
    log_q = gaussian_log_prob(z, mean, logvar)  # (n, 3)
    log_p = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
    samples = log_q - log_p
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    analytic = gaussian_kl(mean, logvar).sum(1)
    assert (analytic - mc).abs().max() < 5 * se.max()
    assert torch.all(analytic > 0)
    assert gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)).abs().max() == 0


@pytest.mark.parametrize("name", ["gaussian", "logistic"])
@pytest.mark.parametrize(
    ("loc", "log_scale"), [(0.0, -2.0), (-0.97, -4.0), (0.999, -6.5), (0.3, 1.0)]
)
def test_discrete_likelihood_masses_sum_to_one(name, loc, log_scale):
    lik = DecoderLikelihood(name, channels=1)
    x = GRID.float().view(256, 1, 1, 1)
    out = torch.tensor([loc, log_scale]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
    mass = torch.exp(-lik.nll(out, x).double())
    assert abs(mass.sum().item() - 1.0) < 2e-3
    assert torch.all(mass >= 0)


def test_bernoulli_likelihood_is_a_mass_on_black_and_white_only():
    lik = DecoderLikelihood("bernoulli", channels=1)
    logits = torch.tensor([0.7]).view(1, 1, 1, 1)
    black, white = torch.full((1, 1, 1, 1), -1.0), torch.ones(1, 1, 1, 1)
    p = torch.exp(-lik.nll(logits, black)) + torch.exp(-lik.nll(logits, white))
    torch.testing.assert_close(p, torch.ones(1))
    with pytest.raises(ValueError, match="data.binarize=dynamic"):
        lik.check(torch.zeros(1, 1, 2, 2))


def _tiny_vae(latent_dim=2, likelihood="logistic", num_classes=0, seed=0):
    torch.manual_seed(seed)
    enc = ConvEncoder(1, 16, latent_dim, base_channels=4, hidden_dim=16, num_classes=num_classes)
    dec = ConvDecoder(
        2 if likelihood != "bernoulli" else 1, 16, latent_dim, 4, 16, num_classes=num_classes
    )
    return VAEModule(enc, dec, (1, 16, 16), likelihood=likelihood, num_classes=num_classes)


def _images(n=4, seed=0):
    data = SyntheticDataModule(image_size=16, channels=1, num_classes=4, seed=seed)
    return data.load_split("val").tensors[0][:n].float() / 127.5 - 1


def test_importance_weighted_bound_sits_between_elbo_and_the_exact_likelihood():
    """A one-dimensional latent: log p(x) by quadrature over z is exact, so the bound must
    rise with K toward it from the ELBO (Burda et al. 2016, Theorem 1)."""
    vae = _tiny_vae(latent_dim=1).double().eval()
    x = _images(3).double()
    with torch.no_grad():  # exact log p(x) = log int p(x|z) N(z) dz on a fine grid
        z = torch.linspace(-9, 9, 4001, dtype=torch.float64)[:, None]
        log_px_z = torch.stack(
            [-vae.likelihood.nll(vae.decode(z), xi.expand(len(z), -1, -1, -1)) for xi in x]
        )
        log_pz = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z))
        exact = torch.logsumexp(log_px_z + log_pz, dim=1) + math.log(18 / 4000)
    g = torch.Generator().manual_seed(0)
    logw = vae.log_weights(x, None, 4000, g)  # (4000, 3)
    bounds = {  # E[L_K], averaged over 4000 / K independent groups of K samples
        k: torch.stack(
            [importance_weighted_bound(logw[i : i + k]) for i in range(0, 4000, k)]
        ).mean(0)
        for k in (1, 10, 100, 1000)
    }
    with torch.no_grad():  # the ELBO with the analytic KL, averaged over 400 draws of z
        elbos = torch.stack(
            [
                -sum(vae.elbo_terms(x, generator=torch.Generator().manual_seed(s))[:2])
                for s in range(400)
            ]
        )
    elbo, elbo_se = elbos.mean(0), elbos.std(0) / 20
    l1_se = logw.std(0) / math.sqrt(4000)
    for i in range(3):
        seq = [bounds[k][i].item() for k in (1, 10, 100, 1000)]
        assert seq == sorted(seq), f"bound must rise with K: {seq}"
        assert seq[-1] <= exact[i].item() + 1e-3, (seq, exact[i].item())
        assert exact[i] - seq[-1] < 0.5 * (exact[i] - seq[0]), "K=1000 closes most of the gap"
        # K = 1 is the ELBO (Monte Carlo KL vs analytic KL: equal in expectation)
        assert abs(bounds[1][i] - elbo[i]) < 5 * (l1_se[i] + elbo_se[i])
    # bits_per_dim is one K-sample estimate of that bound, in the protocol's units
    bpd = vae.bits_per_dim(x, generator=torch.Generator().manual_seed(5), k=100)
    logw = vae.log_weights(x, None, 100, torch.Generator().manual_seed(5))
    expected = -importance_weighted_bound(logw) / (x[0].numel() * math.log(2))
    torch.testing.assert_close(bpd.double(), expected, rtol=1e-6, atol=0)


def test_conditional_vae_marginal_bound():
    vae = _tiny_vae(num_classes=4).eval()
    x = _images(2)
    d = x[0].numel()
    marginal = vae.bits_per_dim(x, generator=torch.Generator().manual_seed(0), k=200)
    for c in range(4):  # log p(x) >= log p(x|c) - log 4 for every class c
        y = torch.full((2,), c)
        cond = vae.bits_per_dim(x, y=y, generator=torch.Generator().manual_seed(0), k=200)
        assert torch.all(marginal <= cond + math.log2(4) / d + 1e-3)
    images = vae.sample(8, y=torch.arange(8) % 4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (8, 1, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_vae_samples_means_or_pixels_and_fixed_latents():
    vae = _tiny_vae(likelihood="bernoulli")
    g = torch.Generator().manual_seed(0)
    pixels = vae.sample(6, generator=g, mean=False)
    assert set(pixels.unique().tolist()) <= {-1.0, 1.0}
    z = vae.latents(6, torch.Generator().manual_seed(0))
    means = vae.sample(6, z=z)
    assert not set(means.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(means, vae.sample(6, z=z))
    logistic = _tiny_vae()
    drawn = logistic.sample(4, generator=g, mean=False)
    torch.testing.assert_close(drawn, (drawn + 1).mul(127.5).round().div(127.5).sub(1))  # 8-bit


def test_kl_warmup_schedule():
    vae = _tiny_vae()
    vae.beta, vae.kl_warmup_steps = 4.0, 100
    assert [vae.kl_weight(s) for s in (0, 50, 100, 500)] == [0.0, 2.0, 4.0, 4.0]


# ---------------------------------------------------------------------- vector quantisation
def test_straight_through_gradients_reach_the_encoder():
    vq = VectorQuantizer(num_codes=8, code_dim=3, decay=0.99, init_from_data=False)
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    q = vq(z_e)
    w = torch.randn_like(q.z_q)
    (q.z_q * w).sum().backward()
    torch.testing.assert_close(z_e.grad, w)  # identity: d z_q / d z_e = I
    # and through a whole VQ-VAE: the reconstruction loss moves the encoder
    model = VQVAEModule(
        VQEncoder(1, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=3),
        VQDecoder(2, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=3),
        VectorQuantizer(num_codes=8, code_dim=3),
        image_shape=(1, 16, 16),
    )
    recon, _ = model.terms(_images(4))
    recon.mean().backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_ema_codebook_update_follows_the_paper_and_moves_codes_toward_encodings():
    decay, eps = 0.9, 1e-5
    vq = VectorQuantizer(2, 2, decay=decay, eps=eps, restart_threshold=0, init_from_data=False)
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    vq.embedding.copy_(codes)
    vq.embed_sum.copy_(codes)  # cluster_size starts at 1
    # three encodings near code 0 and one near code 1
    flat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    z_e = flat.T.reshape(1, 2, 2, 2)  # (B, D, h, w) with h * w = 4 positions
    vq.train()
    q = vq(z_e)
    assert q.codes.flatten().tolist() == [0, 0, 0, 1]
    n = torch.tensor([decay * 1 + (1 - decay) * 3, decay * 1 + (1 - decay) * 1])
    m = decay * codes + (1 - decay) * torch.stack([flat[:3].sum(0), flat[3]])
    smoothed = (n + eps) / (n.sum() + 2 * eps) * n.sum()
    torch.testing.assert_close(vq.embedding, m / smoothed[:, None])
    before = [(codes[0] - flat[:3].mean(0)).norm(), (codes[1] - flat[3]).norm()]
    for _ in range(200):
        vq(z_e)
    after = [(vq.embedding[0] - flat[:3].mean(0)).norm(), (vq.embedding[1] - flat[3]).norm()]
    assert after[0] < 0.01 * before[0] and after[1] < 0.01 * before[1]


def test_dead_codes_are_restarted_on_batch_encodings():
    vq = VectorQuantizer(4, 2, decay=0.99, restart_threshold=1.0, init_from_data=False)
    vq.embedding.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 50.0]]))
    vq.embed_sum.copy_(vq.embedding)
    flat = torch.tensor([[0.1, 0.0], [0.9, 1.0], [0.0, 0.2], [1.1, 0.9]])
    z_e = flat.T.reshape(1, 2, 2, 2)
    vq.eval()
    vq(z_e)  # evaluation never touches the codebook
    assert vq.embedding[2].tolist() == [100.0, 100.0]
    vq.train()
    q = vq(z_e)
    assert q.restarted == 2  # codes 2 and 3 got no encodings: EMA count 0.99 < 1
    for k in (2, 3):
        assert any(torch.equal(vq.embedding[k], row) for row in flat)
    assert q.usage.item() == 0.5 and 1.9 < q.perplexity.item() <= 2.0
    before = vq.embedding.clone()
    vq.codes(z_e)  # lookups for a prior never update either
    assert torch.equal(before, vq.embedding)


def test_learned_codebook_gets_the_codebook_loss_gradient():
    vq = VectorQuantizer(4, 2, decay=0.0, restart_threshold=0, init_from_data=False)
    q = vq(torch.randn(2, 2, 3, 3))
    (q.codebook + 0.25 * q.commitment).backward()
    assert vq.embedding.grad is not None and vq.embedding.grad.abs().sum() > 0


def test_vqvae_bound_and_refusal_to_sample():
    model = VQVAEModule(
        VQEncoder(1, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=3),
        VQDecoder(2, hidden=8, res_hidden=4, num_res_blocks=1, code_dim=3),
        VectorQuantizer(num_codes=16, code_dim=3),
        image_shape=(1, 16, 16),
    )
    x = _images(2)
    recon, _ = model.eval().terms(x)
    bpd = model.bits_per_dim(x)  # -log p(x|z_q) + 16 positions * log 16 codes
    expected = (recon + 16 * math.log(16)) / (256 * math.log(2))
    torch.testing.assert_close(bpd, expected)
    assert model.reconstruct(x).shape == x.shape
    # without a prior over its codes it is no Generative model, but a Likelihood one
    assert not isinstance(model, Generative)
    assert isinstance(model, Likelihood) and isinstance(model, Reconstructing)


# ---------------------------------------------------------------------- data and training
def test_binarised_data():
    static = SyntheticDataModule(binarize="static")
    again = SyntheticDataModule(binarize="static")
    grey = SyntheticDataModule()
    a, b = static.load_split("val").tensors[0], again.load_split("val").tensors[0]
    assert set(a.unique().tolist()) == {0, 255} and torch.equal(a, b)  # fixed seed
    g = grey.load_split("val").tensors[0]
    assert torch.all(a[g == 0] == 0) and torch.all(a[g == 255] == 255)
    assert "binarize" in static.cache_fields("val") and "binarize" not in grey.cache_fields("val")
    assert static.cache_path("val") == grey.cache_path("val")  # one 8-bit cache either way
    # the rate of white pixels is the grey level / 255
    from genlab.data.datamodules import binarize

    many = binarize(torch.full((200_000,), 51, dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert abs((many == 255).float().mean().item() - 0.2) < 0.005
    with pytest.raises(ValueError, match="binarize must be one of"):
        SyntheticDataModule(binarize="yes")


def test_bernoulli_on_grey_data_stops_with_the_fix(tiny_cfg):
    cfg = tiny_cfg("model=vae", "model.likelihood=bernoulli")
    with pytest.raises(ValueError, match="data.binarize=dynamic"):
        train(cfg)


def test_binarised_vae_run_resumes_exactly(tiny_cfg, tmp_path):
    """Dynamic binarisation draws from the global stream, which the checkpoint restores."""
    common = [
        "model=vae",
        "model.likelihood=bernoulli",
        "data.binarize=dynamic",
        "metrics.at_end=false",
        "~callbacks.sample_grid",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]

    def run(sub, steps, ckpt=None):
        cfg = tiny_cfg(*common, f"trainer.max_steps={steps}")
        cfg.paths.output_dir = str(tmp_path / sub)
        cfg.ckpt_path = ckpt
        train(cfg)
        return load_model(tmp_path / sub, "last")[0], logged(tmp_path / sub, "train/loss")

    straight, losses = run("straight", 4)
    run("first", 2)
    resumed, resumed_losses = run("resumed", 4, str(tmp_path / "first/checkpoints/last.ckpt"))
    assert resumed_losses[-2:] == losses[-2:]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_beta_vae_run_logs_terms_and_writes_latent_grids(tiny_cfg):
    cfg = tiny_cfg("model=beta_vae", "model.kl_warmup_steps=4")
    summary = train(cfg)
    run = cfg.paths.output_dir
    betas = [float(v) for v in logged(run, "train/beta")]
    assert betas == sorted(betas) and betas[0] < 4.0 * 0.5 and len(betas) == 4
    assert float(logged(run, "train/kl")[-1]) >= 0 and float(logged(run, "train/recon")[-1]) > 0
    assert "val/active_units" in summary["metrics"] and summary["metrics"]["val/bpd"] > 0
    grids = os.listdir(os.path.join(run, "samples"))
    for name in ("recon_0000004.png", "traverse_0000004.png", "interp_0000004.png"):
        assert name in grids
    protocol = json.load(open(os.path.join(run, "summary.json")))["evaluation"]["protocol"]
    assert protocol["bpd"]["estimator"].startswith("importance-weighted bound")


def test_vqvae_run_reconstructs_and_says_it_cannot_sample(tiny_cfg):
    cfg = tiny_cfg("model=vqvae")
    summary = train(cfg)
    run = cfg.paths.output_dir
    # no sample, interpolation or traversal grids: only reconstructions
    assert os.listdir(os.path.join(run, "samples")) == ["recon_0000004.png"]
    metrics = summary["metrics"]
    assert "val/fd_digits" not in metrics and metrics["val/bpd"] > 0
    assert 0 < metrics["train/code_usage"] <= 1 and metrics["train/perplexity"] >= 1
    protocol = json.load(open(os.path.join(run, "summary.json")))["evaluation"]["protocol"]
    assert "cannot sample" in protocol["not_computed"]["samples"]
    with pytest.raises(UsageError, match="cannot sample"):
        sample_main([f"run_dir={run}"])


def test_vqvae_prior_two_stage_run(tiny_cfg, tmp_path):
    """Stage 1 trains a VQ-VAE; stage 2 trains a class-conditional Gated PixelCNN prior over its
    codes, and the pair then samples, evaluates and bounds the likelihood like any family."""
    stage1 = tiny_cfg("model=vqvae", "metrics.at_end=false")
    train(stage1)
    vq_run = stage1.paths.output_dir
    missing = tiny_cfg("model=vqvae_prior")
    missing.paths.output_dir = str(tmp_path / "missing")  # not stage 1's directory
    with pytest.raises(Exception, match="vqvae_run"):
        train(missing)  # the stage-1 run is required
    stage2 = tiny_cfg(
        "model=vqvae_prior", f"model.vqvae_run={vq_run}", "model.num_classes=${data.num_classes}"
    )
    stage2.paths.output_dir = str(tmp_path / "prior")
    summary = train(stage2)
    run = stage2.paths.output_dir
    assert summary["status"] == "completed" and summary["metrics"]["train/loss"] > 0
    assert {"step_0000002.png", "step_0000004.png"} <= set(os.listdir(os.path.join(run, "samples")))
    assert summary["metrics"]["val/fd_digits"] >= 0 and summary["metrics"]["val/bpd"] > 0

    prior = load_model(run, "last")[0]
    vqvae = load_model(vq_run, "last")[0]
    for (name, a), (_, b) in zip(prior.vqvae.state_dict().items(), vqvae.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"stage 2 changed the frozen VQ-VAE: {name}")
    x, y = _images(3), torch.tensor([0, 1, 2])
    recon, q = vqvae.terms(x)
    expected = (recon + prior.prior_nll(q.codes, y)) / (256 * math.log(2))
    torch.testing.assert_close(prior.bits_per_dim(x, y), expected)
    prior = prior.double()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    fast = prior.sample(4, y=torch.arange(4) % 4, generator=g(), fast=True)
    plain = prior.sample(4, y=torch.arange(4) % 4, generator=g(), fast=False)
    assert torch.equal(fast, plain) and fast.shape == (4, 1, 16, 16)
