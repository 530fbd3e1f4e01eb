"""Hierarchical VAE (VDVAE-style, Child 2021): per-group KLs against their closed form, the
loss as recon + sum of KLs, bits/dim of an untrained model, temperatures, gradient skipping and
clipping, and shapes at 16, 28 and 32 pixels. Tiny networks only (width 8)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlab.families.contract import Generative, Likelihood, Reconstructing
from genlab.families.hvae import HierarchicalVAEModule
from genlab.nets.hvae import Bottleneck, HierarchicalVAE, gaussian_kl_log_std


def _hvae(size=16, num_res=2, blocks=2, seed=0, **kw) -> HierarchicalVAEModule:
    torch.manual_seed(seed)
    net = HierarchicalVAE(
        1, size, 2, width=8, latent_channels=2, blocks_per_res=blocks, num_resolutions=num_res
    )
    return HierarchicalVAEModule(net, (1, size, size), iw_samples=4, **kw)


def _perturb(module: HierarchicalVAEModule, scale: float = 0.3, seed: int = 1) -> None:
    """Random weights in the zero-initialised heads (posterior, prior, output), so q != p and
    the output depends on z: what training would do to them."""
    g = torch.Generator().manual_seed(seed)
    out = module.net.decoder.out
    convs = []
    for m in module.net.modules():
        if isinstance(m, Bottleneck) and not m.residual:
            convs.append(m.c4)
    with torch.no_grad():
        for c in convs:
            c.weight.copy_(scale * torch.randn(c.weight.shape, generator=g))
            c.bias.copy_(scale * torch.randn(c.bias.shape, generator=g))
        out.weight.copy_(0.1 * scale * torch.randn(out.weight.shape, generator=g))
        out.bias.zero_()


def _images(n=3, size=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, size, size), generator=g).float() / 127.5 - 1
    x[:, :, 0, 0], x[:, :, 0, 1] = -1.0, 1.0  # both edge bins
    return x


def test_kl_of_each_group_equals_its_closed_form():
    model = _hvae()
    _perturb(model)
    x = _images()
    recon, kls, groups = model.elbo_terms(x, generator=torch.Generator().manual_seed(0))
    assert kls.shape == (model.num_groups, 3) and len(groups) == 4
    for g, kl in zip(groups, kls, strict=True):
        mq, sq, mp, sp = (t.double() for t in (g.q_mean, g.q_std, g.p_mean, g.p_std))
        terms = torch.log(sp**2 / sq**2) + (sq**2 + (mq - mp) ** 2) / sp**2 - 1
        closed = 0.5 * terms.flatten(1).sum(1)
        torch.testing.assert_close(kl.double(), closed, rtol=1e-5, atol=1e-5)
        assert torch.all(kl > 0)
    # and the elementwise formula against torch.distributions
    q = torch.distributions.Normal(torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]))
    p = torch.distributions.Normal(torch.tensor([-0.2, 0.4]), torch.tensor([1.5, 0.7]))
    ours = gaussian_kl_log_std(q.loc, q.scale.log(), p.loc, p.scale.log())
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(q, p))


def test_training_loss_is_recon_plus_the_sum_of_group_kls_per_dim(monkeypatch):
    model = _hvae()
    _perturb(model)
    logged: dict = {}
    monkeypatch.setattr(model, "log", lambda k, v, **_: logged.__setitem__(k, v))
    monkeypatch.setattr(model, "log_dict", lambda d, **_: logged.update(d))
    x = _images()
    torch.manual_seed(5)
    loss = model.training_step((x, torch.zeros(3).long()), 0)
    torch.manual_seed(5)  # the same posterior noise (the training path draws from the global RNG)
    recon, kls, _ = model.elbo_terms(x)
    d = x[0].numel()
    torch.testing.assert_close(loss, (recon + kls.sum(0)).mean() / d)
    torch.testing.assert_close(logged["train/recon"], recon.mean() / d)
    total = sum(logged[f"train/kl_{i}"] for i in range(model.num_groups))
    torch.testing.assert_close(logged["train/kl"], total)
    torch.testing.assert_close(loss, logged["train/recon"] + logged["train/kl"])
    assert float(logged["train/skipped"]) == 0


def test_untrained_bits_per_dim_is_uniform_plus_what_the_decoder_explains():
    """At init every KL term is exactly 0 (posterior and prior heads start at N(0, I)) and the
    zero output layer gives every pixel the same logistic(loc 0, scale 1) for any z, so the
    importance-weighted bound is exact: bits/dim = 8 + (1/D) sum_d log2((1/256) / P_dec(x_d)),
    the uniform 8.0 moved only by how much more or less mass the decoder puts on each pixel's
    bin than 1/256. Checked against that mass computed here from the logistic CDF."""
    model = _hvae(ema_decay=0.0)
    x = _images(size=16)
    _, kls, _ = model.elbo_terms(x)
    assert torch.equal(kls, torch.zeros_like(kls))
    bpd = model.bits_per_dim(x, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()
    v = x.double()
    upper = torch.where(v > 0.999, torch.ones_like(v), torch.sigmoid(v + 1 / 255))
    lower = torch.where(v < -0.999, torch.zeros_like(v), torch.sigmoid(v - 1 / 255))
    excess = torch.log2((1 / 256) / (upper - lower)).flatten(1).mean(1)
    torch.testing.assert_close(bpd.double(), 8.0 + excess, rtol=0, atol=1e-4)
    # a trained-looking model: the bound is finite and decreases (weakly, on average) with K
    _perturb(model)
    k1 = model.bits_per_dim(x, generator=torch.Generator().manual_seed(0), k=1)
    k16 = model.bits_per_dim(x, generator=torch.Generator().manual_seed(0), k=16)
    assert torch.isfinite(k16).all() and k16.mean() <= k1.mean() + 1e-3


def test_bits_per_dim_with_k_1_is_a_one_sample_elbo():
    """K = 1: -log w = -log p(x|z) + sum_i (log q - log p), whose mean over samples is the
    analytic ELBO (recon + sum of KLs): checked by Monte Carlo."""
    model = _hvae(ema_decay=0.0)
    _perturb(model, scale=0.1)
    x = _images(2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logw = model.log_weights(x, 400, g)  # (400, 2)
        reps = [model.elbo_terms(x, generator=g) for _ in range(100)]
    elbo = torch.stack([r + k.sum(0) for r, k, _ in reps])  # (100, 2)
    mc = -logw.mean(0)
    se = logw.std(0) / math.sqrt(400) + elbo.std(0) / math.sqrt(100)
    assert torch.all((mc - elbo.mean(0)).abs() < 5 * se + 1e-3)


def test_temperature_zero_is_deterministic_and_positive_temperatures_differ():
    model = _hvae(ema_decay=0.0)
    _perturb(model)

    def draw(seed, t):
        return model.sample(3, generator=torch.Generator().manual_seed(seed), temperature=t)

    assert torch.equal(draw(0, 0.0), draw(1, 0.0))
    assert not torch.allclose(draw(0, 1.0), draw(1, 1.0))
    assert torch.equal(draw(0, 0.7), draw(0, 0.7))
    # per-group temperatures, top group first: only the last group random
    last = [0.0] * (model.num_groups - 1) + [1.0]
    assert not torch.allclose(draw(0, last), draw(1, last))
    with pytest.raises(ValueError, match="temperatures"):
        draw(0, [1.0, 1.0])
    images = draw(0, 1.0)
    assert images.shape == (3, 1, 16, 16) and images.abs().max() <= 1


def _backward(model):
    model.zero_grad()
    recon, kls, _ = model.elbo_terms(_images())
    ((recon + kls.sum(0)).mean() / 256).backward()
    return torch.nn.utils.get_total_norm([p.grad for p in model.net.parameters()])


def test_gradient_skipping_skips_large_updates_and_clips_the_others():
    model = _hvae(ema_decay=0.0)
    _perturb(model)
    opt = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.net.parameters()]
    norm = _backward(model)
    model.skip_threshold, model.grad_clip = float(norm) / 2, 1e9
    model.configure_gradient_clipping(opt)
    opt.step()
    assert int(model.skipped) == 1 and model._skipped_now
    assert all(torch.equal(a, p) for a, p in zip(before, model.net.parameters(), strict=True))
    assert not opt.state  # Adam's moments untouched too
    norm = _backward(model)
    model.skip_threshold, model.grad_clip = float(norm) * 2, float(norm) / 4
    got, skipped = model.skip_or_clip()
    assert not skipped and abs(got - float(norm)) < 1e-4 * float(norm)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in model.net.parameters()])
    assert abs(float(clipped) - float(norm) / 4) < 1e-4 * float(norm)
    opt.step()
    assert int(model.skipped) == 1
    assert not all(torch.equal(a, p) for a, p in zip(before, model.net.parameters(), strict=True))


def test_lightning_skips_through_the_hook_and_counts_steps():
    """In a real fit every update over the threshold is skipped: the weights (and the EMA) stay
    where they were, the steps still count."""
    model = _hvae(ema_decay=0.9, skip_threshold=1e-12)
    _perturb(model)
    model.ema.module.load_state_dict(model.net.state_dict())
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    data = TensorDataset(_images(8), torch.zeros(8).long())
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        gradient_clip_val=1.0,
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4))
    assert trainer.global_step == 2 and int(model.skipped) == 2
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in model.ema.module.state_dict().items())


@pytest.mark.parametrize("size", [16, 28, 32])
def test_shapes_at_three_resolutions(size):
    model = _hvae(size=size, num_res=3, blocks=1)
    assert isinstance(model, Generative | Likelihood | Reconstructing)
    assert isinstance(model, Likelihood) and isinstance(model, Reconstructing)
    x = _images(2, size)
    params, groups = model.net(x)
    assert params.shape == (2, 2, size, size)
    assert [g.z.shape[-1] for g in groups] == [size // 4, size // 2, size]
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(2, generator=torch.Generator().manual_seed(0)).shape == x.shape
    assert model.bits_per_dim(x, generator=torch.Generator().manual_seed(0)).shape == (2,)
    with pytest.raises(ValueError, match="halve"):
        HierarchicalVAE(1, 28, 2, width=8, num_resolutions=4)


def test_the_sample_cli_draws_at_a_chosen_temperature(tiny_cfg, tmp_path):
    """`python -m genlab.sample temperature=...`: 0 takes the prior means, so two seeds give one
    grid; a list needs one value per latent group; the .pt records what was used."""
    from pathlib import Path

    from genlab.sample import main as sample_main
    from genlab.train import train
    from genlab.utils import UsageError

    cfg = tiny_cfg("model=hvae", "model.net.width=8", "model.net.latent_channels=2",
                   "model.iw_samples=2")  # fmt: skip
    train(cfg)
    run = Path(cfg.paths.output_dir)
    base = [f"run_dir={run}", "n=4", "device=cpu"]
    cold = [sample_main([*base, "temperature=0", f"seed={s}", f"out={tmp_path / f't0_{s}'}"])
            for s in (0, 1)]  # fmt: skip
    assert torch.equal(cold[0]["images"], cold[1]["images"])
    assert torch.load(cold[0]["pt"], weights_only=False)["temperature"] == 0.0
    groups = cfg.model.net.blocks_per_res * cfg.model.net.num_resolutions
    per_group = [1.0] * (groups // 2) + [0.0] * (groups - groups // 2)  # top groups drawn
    mixed = sample_main([*base, f"temperature={per_group}", f"out={tmp_path / 'mixed'}"])
    assert torch.load(mixed["pt"], weights_only=False)["temperature"] == per_group
    with pytest.raises(UsageError, match=f"lists 2 values; this model has {groups} latent groups"):
        sample_main([*base, "temperature=[1.0,0.5]", f"out={tmp_path / 'bad'}"])
