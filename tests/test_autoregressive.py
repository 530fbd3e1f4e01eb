"""Autoregressive family: exact bits/dim, the class-marginal likelihood, sampling draws from
the model's conditionals, and the cached sampler gives the plain sampler's images without
running the network whole."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genlab.families.autoregressive import AutoregressiveModule, sample_categorical
from genlab.metrics.likelihood import categorical_bits_per_dim
from genlab.nets import GatedPixelCNN, PixelCNN, PixelCNNPlusPlus
from genlab.nets.cached import cached_sampler


def tiny(kind: str, channels: int = 1, num_classes: int = 0) -> AutoregressiveModule:
    torch.manual_seed(0)
    if kind == "pixelcnn":
        net = PixelCNN(
            channels, 16, num_layers=3, kernel_size=5, out_hidden=32, num_classes=num_classes
        )
    elif kind == "gated":
        net = GatedPixelCNN(
            channels, 16, num_layers=3, kernel_size=3, out_hidden=32, num_classes=num_classes
        )
    else:
        net = PixelCNNPlusPlus(
            channels, 8, num_resnets=1, num_mixtures=2, dropout=0.0, num_classes=num_classes
        )
    return AutoregressiveModule(net, (channels, 8, 8), num_classes=num_classes)


def grid_images(n: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, 8, 8), generator=g) / 127.5 - 1


@pytest.mark.parametrize("kind", ["pixelcnn", "gated", "mixture"])
@pytest.mark.parametrize(("channels", "num_classes"), [(1, 0), (3, 0), (1, 3), (3, 3)])
def test_cached_sampler_gives_the_plain_samplers_images(kind, channels, num_classes):
    model = tiny(kind, channels, num_classes).double()
    y = torch.arange(5) % 3 if num_classes else None
    plain = model.sample(5, y=y, generator=torch.Generator().manual_seed(1), fast=False)
    calls = []
    hook = model.net.register_forward_hook(lambda *a: calls.append(1))
    fast = model.sample(5, y=y, generator=torch.Generator().manual_seed(1), fast=True)
    hook.remove()
    assert torch.equal(plain, fast)
    assert not calls, "the cached sampler must not run the whole network"
    assert len(plain.unique()) > 10  # real draws, not a constant image


@pytest.mark.parametrize("kind", ["pixelcnn", "gated", "mixture"])
def test_cached_step_equals_the_network_on_a_given_image(kind):
    model = tiny(kind, channels=3, num_classes=3).double().eval()
    x, y = grid_images(2, 3).double(), torch.tensor([0, 2])
    assert_steps_match(model.net, x, y)


def assert_steps_match(net, x, y=None):
    """The cached sampler's output at every pixel, fed the whole image x (later pixels too),
    equals the network's on x: it computes each position once, and only from earlier pixels."""
    with torch.no_grad():
        full = net(x, y)
        cache = cached_sampler(net)
        cache.reset(torch.zeros_like(x), y)
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                want = full[..., i, j]
                torch.testing.assert_close(cache.step(x, i, j), want, rtol=1e-12, atol=1e-12)
            cache.end_row(x, i)


@pytest.mark.parametrize(
    ("size", "num_scales", "num_resnets"),
    [((7, 9), 3, 2), ((9, 11), 3, 1), ((5, 6), 1, 1), ((8, 8), 2, 1), ((13, 4), 3, 1)],
)
def test_cached_pixelcnn_pp_on_odd_sizes_and_scales(size, num_scales, num_resnets):
    """Odd sizes (9 -> 5 -> 3), one to three scales, more resnets per scale: every scale's
    positions are computed at the right image pixel, the transposed convolutions cropped right."""
    torch.manual_seed(0)
    net = PixelCNNPlusPlus(1, 8, num_resnets=num_resnets, num_mixtures=2, dropout=0.0,
                           num_classes=2, num_scales=num_scales).double().eval()  # fmt: skip
    x = torch.randint(0, 256, (2, 1, *size), generator=torch.Generator().manual_seed(3))
    assert_steps_match(net, x.double() / 127.5 - 1, torch.tensor([1, 0]))


def test_bits_per_dim_is_the_exact_categorical_likelihood():
    model = tiny("pixelcnn").eval()
    x = grid_images(3)
    logits = model.net(x)
    target = ((x + 1) * 127.5).round().long()
    manual = -torch.log_softmax(logits.double(), 1).gather(1, target[:, None]).sum((1, 2, 3, 4))
    torch.testing.assert_close(
        model.bits_per_dim(x).double(), manual / (64 * math.log(2)), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(model.bits_per_dim(x), categorical_bits_per_dim(logits, x))


@pytest.mark.parametrize("kind", ["pixelcnn", "mixture"])
def test_conditional_marginal_likelihood_bounds(kind):
    """max_y p(x|y) / C <= p(x) = mean_y p(x|y) <= max_y p(x|y)."""
    model = tiny(kind, num_classes=3).eval()
    x, d = grid_images(4), 64
    marginal = model.bits_per_dim(x)
    cond = torch.stack([model.bits_per_dim(x, torch.full((4,), c)) for c in range(3)])
    best = cond.min(0).values
    assert torch.all(marginal >= best - 1e-4)
    assert torch.all(marginal <= best + math.log2(3) / d + 1e-4)


def test_categorical_draws_follow_the_softmax():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.0, 0.3]])).expand(100_000, 4)
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(sample_categorical(logits, u), minlength=4).float() / 100_000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.0, 0.3]), atol=0.006, rtol=0)


class Constant(nn.Module):
    """A 'network' whose conditionals ignore the context: value 255 * p, p = 0.7, else 0."""

    output = "categorical"

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, y=None):
        logits = torch.full((x.shape[0], 256, *x.shape[1:]), -1e9, dtype=x.dtype)
        logits[:, 255], logits[:, 0] = math.log(0.7), math.log(0.3)
        return logits + self.w


def test_samples_follow_the_models_conditionals():
    model = AutoregressiveModule(Constant(), (1, 8, 8))
    images = model.sample(200, generator=torch.Generator().manual_seed(0))
    assert set(images.unique().tolist()) == {-1.0, 1.0}
    assert abs((images == 1).float().mean().item() - 0.7) < 0.02
    expected = -(0.7 * math.log2(0.7) + 0.3 * math.log2(0.3))  # the entropy per pixel
    assert abs(model.bits_per_dim(images).mean().item() - expected) < 0.05


def test_mixture_model_samples_on_the_8bit_grid():
    model = tiny("mixture", channels=3)
    images = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images, ((images + 1) * 127.5).round() / 127.5 - 1)
    again = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    assert model.sampling_protocol()["sampler"].startswith("cached")
    model.fast_sampling = False
    assert model.sampling_protocol()["sampler"] == "plain"
