"""ImageGPT (genlab.nets.transformer_ar): causality over the subpixel sequence, the KV-cache
sampler gives the plain sampler's images and the full pass's logits, exact bits/dim, and the
prior-over-codes variant (model=vqvae_prior_gpt)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from genlab.families.autoregressive import AutoregressiveModule, sample_categorical
from genlab.nets.cached import cached_sampler, has_cached_sampler
from genlab.nets.transformer_ar import ImageGPT

from .conftest import compose_cfg

SHAPES = {1: (1, 6, 6), 3: (3, 4, 4)}  # T = 36 and 48 subpixels


def tiny_net(channels: int, num_classes: int = 0, size: int = 6, **kw) -> ImageGPT:
    """Two blocks of width 32, every parameter perturbed (LayerNorm gains, biases, the start
    token and positions all away from their initial values), float64, eval mode."""
    torch.manual_seed(0)
    net = ImageGPT(channels, size, hidden=32, depth=2, num_heads=4, num_classes=num_classes,
                   **kw)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.double().eval()


def grid_image(shape: tuple, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).double() / 127.5 - 1


def sequence(logits: torch.Tensor) -> torch.Tensor:
    """(B, V, C, H, W) -> (B, T, V) in sampling order (pixel, then channel)."""
    return logits.permute(0, 3, 4, 2, 1).flatten(1, 3)


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_change_at_position_i_changes_no_logit_at_or_before_i(channels, num_classes):
    """One copy of the image per position i with the value at i changed: the logits at every
    position <= i are bitwise the same, those at every later position change (the net sees
    the whole past). Over all positions of the tiny image, grey and RGB."""
    net = tiny_net(channels, num_classes)
    c, h, w = SHAPES[channels]
    total = c * h * w
    base = grid_image((1, c, h, w))
    flat = base.permute(0, 2, 3, 1).flatten(1).repeat(total + 1, 1)  # (T + 1, T) in order
    pos = torch.arange(total)
    flat[pos + 1, pos] = -flat[pos + 1, pos]  # level k -> 255 - k, never k
    x = flat.view(total + 1, h, w, c).permute(0, 3, 1, 2)
    y = torch.full((total + 1,), 2) if num_classes else None
    with torch.no_grad():
        out = sequence(net(x, y))  # (T + 1, T, V)
    for i in range(total):
        same = (out[i + 1] == out[0]).all(-1)
        assert same[: i + 1].all(), f"a change at {i} reaches a logit at or before it"
        assert not same[i + 1 :].any(), f"a change at {i} is not seen by a later position"


def test_embedded_inputs_are_causal_by_autograd():
    """As a prior over codes (embeddings in): d logits_t / d input_s = 0 for s >= t, != 0
    for s < t. One query position per copy of the input, so one backward pass answers all."""
    net = tiny_net(1, size=5, in_channels=4, num_values=7)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64).repeat(25, 1, 1, 1).requires_grad_(True)
    out = sequence(net(x))  # (25, 25, 7)
    n = torch.arange(25)
    (g,) = torch.autograd.grad(out[n, n].sum(), x)
    g = g.flatten(2).abs().sum(1)  # (query t, input position s)
    assert torch.equal(g != 0, torch.ones(25, 25, dtype=torch.bool).tril(-1))


@pytest.mark.parametrize(("channels", "num_classes"), [(1, 0), (3, 0), (1, 3), (3, 3)])
def test_cached_sampler_gives_the_plain_samplers_images(channels, num_classes):
    """Same generator, same images, exactly (float64: a categorical draw flips only if a
    uniform falls within ~1e-13 of a CDF step), and the cached sampler never runs the net."""
    net = tiny_net(channels, num_classes)
    model = AutoregressiveModule(net, SHAPES[channels], num_classes=num_classes).double()
    assert has_cached_sampler(model.net)
    y = torch.arange(5) % 3 if num_classes else None
    plain = model.sample(5, y=y, generator=torch.Generator().manual_seed(1), fast=False)
    calls = []
    hook = model.net.register_forward_hook(lambda *a: calls.append(1))
    fast = model.sample(5, y=y, generator=torch.Generator().manual_seed(1), fast=True)
    hook.remove()
    assert torch.equal(plain, fast)
    assert not calls, "the cached sampler must not run the whole network"
    assert len(plain.unique()) > 10  # real draws, not a constant image
    assert "KV cache" in model.sampling_protocol()["sampler"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 3])
def test_cached_logits_equal_the_full_pass(channels, dtype):
    """Fed a whole image (later values too), the step at each position gives the full pass's
    logits there: it runs every position once, from earlier values only. The tolerance is
    float reassociation (one-row matmuls and attention over the cache vs the batched pass):
    1e-12 in float64, 1e-5 in float32; the channels not being drawn are NaN."""
    net = tiny_net(channels, num_classes=2).to(dtype)
    c, h, w = SHAPES[channels]
    x, y = grid_image((2, c, h, w)).to(dtype), torch.tensor([1, 0])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        full = net(x, y)
        cache = cached_sampler(net)
        cache.reset(torch.zeros_like(x), y)
        for i in range(h):
            for j in range(w):
                for ch in range(c):
                    out = cache.step(x, i, j)
                    want = full[:, :, ch, i, j]
                    torch.testing.assert_close(out[:, :, ch], want, rtol=tol, atol=tol)
                    others = [k for k in range(c) if k != ch]
                    assert out[:, :, others].isnan().all()
            cache.end_row(x, i)


def test_steps_out_of_order_fail():
    net = tiny_net(3)
    cache = cached_sampler(net)
    x = torch.zeros(1, *SHAPES[3], dtype=torch.float64)
    cache.reset(x, None)
    cache.step(x, 0, 0)
    with pytest.raises(ValueError, match="out of order"):
        cache.step(x, 0, 1)  # channel G of pixel (0, 0) comes next


def test_bits_per_dim_is_the_exact_categorical_likelihood():
    """The family's bits_per_dim is -log2 softmax of the net's logits at the true values,
    summed over the C * H * W values by hand; without labels, a conditional model reports
    -log2 mean_y p(x | y) / D."""
    net = tiny_net(3, num_classes=2)
    model = AutoregressiveModule(net, SHAPES[3], num_classes=2).double().eval()
    x, d = grid_image((3, *SHAPES[3])), 48
    target = ((x + 1) * 127.5).round().long()
    per_class = []
    for label in range(2):
        y = torch.full((3,), label)
        logp = torch.log_softmax(net(x, y), dim=1).gather(1, target[:, None])[:, 0]
        nats = -logp.sum((1, 2, 3))
        per_class.append(nats)
        bpd = model.bits_per_dim(x, y).double()
        torch.testing.assert_close(bpd, nats / (d * math.log(2)), rtol=1e-6, atol=0)
    marginal = -(torch.logsumexp(-torch.stack(per_class), 0) - math.log(2))
    torch.testing.assert_close(
        model.bits_per_dim(x).double(), marginal / (d * math.log(2)), rtol=1e-6, atol=0
    )


def test_prior_over_codes_preset_builds_and_samples_codes_like_the_plain_sampler(tmp_path):
    """model=vqvae_prior_gpt's prior, called as VQPriorModule calls it (channels=1,
    in_channels=embed_dim, num_values=K), gives logits of the code grid's shape; codes drawn
    through the embedding (VQPriorModule.sample_codes' loop) are the same with both samplers."""
    cfg = compose_cfg(["model=vqvae_prior_gpt", "data=mnist", "model.vqvae_run=x"], tmp_path)
    assert cfg.model.prior._target_ == "genlab.nets.transformer_ar.ImageGPT"
    torch.manual_seed(0)
    k, e = 11, cfg.model.embed_dim
    prior = instantiate(cfg.model.prior, depth=1)(channels=1, in_channels=e, num_values=k)
    prior = prior.double().eval()
    embedding = torch.nn.Embedding(k, e).double()
    codes = torch.randint(0, k, (2, 7, 7))
    assert prior(embedding(codes).permute(0, 3, 1, 2)).shape == (2, k, 1, 7, 7)
    u = torch.rand(3, 7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    drawn = []
    with torch.no_grad():
        for fast in (False, True):
            x = torch.zeros(3, e, 7, 7, dtype=torch.float64)
            out = torch.zeros(3, 7, 7, dtype=torch.long)
            cache = cached_sampler(prior) if fast else None
            if cache is not None:
                cache.reset(x, None)
            for i in range(7):
                for j in range(7):
                    logits = (cache.step(x, i, j) if fast else prior(x)[..., i, j])[:, :, 0]
                    out[:, i, j] = sample_categorical(logits, u[:, i, j])
                    x[:, :, i, j] = embedding(out[:, i, j])
            drawn.append(out)
    assert torch.equal(*drawn) and len(drawn[0].unique()) > 3
