"""PixelRNN's incremental samplers (genlab.nets.pixelrnn_cached): for the Row LSTM and the
Diagonal BiLSTM, grey and RGB, with and without classes, the cached sampler draws the plain
sampler's images exactly, computes every pixel's logits as the whole network does on the
final image, and never runs the network (or one of its LSTM layers) over the whole map.

Exact image equality is checked in float64, where the two samplers' logits differ by float
reassociation only (about 1e-15 here), far too little to move an inverse-CDF draw."""

from __future__ import annotations

import pytest
import torch

import genlab.families.autoregressive as autoregressive
from genlab.families.autoregressive import AutoregressiveModule
from genlab.nets.cached import cached_sampler, has_cached_sampler
from genlab.nets.pixelrnn import PixelRNN, RowLSTM
from genlab.nets.pixelrnn_cached import CachedPixelRNN

KINDS = ["row", "diagonal"]
SHAPES = {1: (1, 6, 6), 3: (3, 5, 5)}
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}  # reassociation only: ~1e-15 / ~1e-6


def tiny_net(kind: str, channels: int, num_classes: int = 0, **kw) -> PixelRNN:
    """hidden 8, 2 layers; every parameter perturbed so that no bias or weight is at its
    initial value (large enough logits that samples depend on the context)."""
    torch.manual_seed(0)
    net = PixelRNN(channels, 8, 2, kind, out_hidden=16, num_classes=num_classes, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net.eval()


def tiny_model(kind: str, channels: int, num_classes: int, dtype=torch.float64):
    net = tiny_net(kind, channels, num_classes).to(dtype)
    return AutoregressiveModule(net, SHAPES[channels], num_classes=num_classes)


def count_passes(net: PixelRNN) -> tuple[list, list]:
    """Forward hooks on the network and on its LSTM layers (each a pass over the whole map);
    returns (calls, handles)."""
    calls: list = []
    modules = [net, *net.lstms]
    handles = [m.register_forward_hook(lambda m, *a: calls.append(type(m))) for m in modules]
    return calls, handles


@pytest.mark.parametrize("num_classes", [0, 3])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_sampler_gives_the_plain_samplers_images(kind, channels, num_classes):
    model = tiny_model(kind, channels, num_classes)
    assert has_cached_sampler(model.net) and isinstance(cached_sampler(model.net), CachedPixelRNN)
    assert model.sampling_protocol()["sampler"].startswith("cached")
    y = torch.arange(3) % 3 if num_classes else None
    plain = model.sample(3, y=y, generator=torch.Generator().manual_seed(1), fast=False)
    calls, handles = count_passes(model.net)
    fast = model.sample(3, y=y, generator=torch.Generator().manual_seed(1), fast=True)
    for h in handles:
        h.remove()
    assert torch.equal(plain, fast)
    assert calls == [], "the cached sampler must make no pass over the whole map"
    assert len(plain.unique()) > 10  # real draws, not a constant image


class Recorder:
    """Wraps a cached sampler and keeps every step's logits in call order."""

    def __init__(self, inner):
        self.inner, self.steps = inner, []

    def reset(self, x, y):
        self.inner.reset(x, y)

    def step(self, x, i, j):
        out = self.inner.step(x, i, j)
        self.steps.append((i, j, out.clone()))
        return out

    def end_row(self, x, i):
        self.inner.end_row(x, i)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_while_sampling_equal_the_network_on_the_final_image(
    kind, channels, dtype, monkeypatch
):
    """Sub-step c of pixel (i, j) (c-th call there) gives channel c's logits; the network
    run once on the finished images must give the same, to float reassociation."""
    model = tiny_model(kind, channels, 2, dtype)
    recorders: list[Recorder] = []

    def recording(net):
        recorders.append(Recorder(cached_sampler(net)))
        return recorders[-1]

    monkeypatch.setattr(autoregressive, "cached_sampler", recording)
    y = torch.tensor([1, 0])
    images = model.sample(2, y=y, generator=torch.Generator().manual_seed(2), fast=True)
    (rec,) = recorders
    _, height, width = SHAPES[channels]
    assert len(rec.steps) == height * width * channels
    with torch.no_grad():
        full = model.net(images.to(dtype), y)  # (B, 256, C, H, W)
    for n, (i, j, out) in enumerate(rec.steps):
        c = n % channels
        assert (i, j) == divmod(n // channels, width)
        want = full[:, :, c, i, j]
        torch.testing.assert_close(out[:, :, c], want, rtol=TOL[dtype], atol=TOL[dtype])


def assert_steps_match(net: PixelRNN, x: torch.Tensor, y=None) -> None:
    """Fed the whole image x (later pixels too), every step equals the network on x: each
    position is computed once, from earlier pixels only."""
    with torch.no_grad():
        full = net(x, y)
        cache = cached_sampler(net)
        cache.reset(torch.zeros_like(x), y)
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                torch.testing.assert_close(cache.step(x, i, j), full[..., i, j], rtol=1e-12,
                                           atol=1e-12)  # fmt: skip
            cache.end_row(x, i)


@pytest.mark.parametrize("size", [(4, 7), (7, 3), (1, 5), (5, 1)])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_steps_on_non_square_images(kind, size):
    """The skew's geometry depends on H and W apart (left-padding states per row)."""
    net = tiny_net(kind, 3, num_classes=2).double()
    x = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(3))
    assert_steps_match(net, x.double() / 127.5 - 1, torch.tensor([1, 0]))


def test_cached_row_lstm_with_a_wider_kernel():
    """A 1 x 5 input-to-state (mask B: columns j - 2 .. j) and a 5-wide state-to-state."""
    net = tiny_net("row", 3).double()
    torch.manual_seed(1)
    net.lstms[1] = RowLSTM(16, 8, 3, kernel_size=5).double().eval()
    x = torch.rand(2, 3, 5, 6, dtype=torch.float64) * 2 - 1
    assert_steps_match(net, x)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_pixelrnn_as_a_prior_over_codes(kind):
    """As VQPriorModule builds it: channels=1, code embeddings in (in_channels), K values."""
    net = tiny_net(kind, 1, num_classes=2, num_values=7, in_channels=4).double()
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(4)).double()
    assert_steps_match(net, x, torch.tensor([0, 1]))
