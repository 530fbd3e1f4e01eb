"""Autoregressive nets (PixelCNN, Gated PixelCNN, PixelCNN++, PixelRNN): exact causality per
pixel and RGB channel, no blind spot in the Gated PixelCNN, the discretised mixture of
logistics (masses sum to one, sampling), output shapes and class conditioning."""

from __future__ import annotations

import pytest
import torch

from genlab.discrete import (
    discretized_logistic_nll,
    discretized_mix_logistic_channel_nll,
    discretized_mix_logistic_nll,
    sample_mix_logistic,
)
from genlab.nets.pixelcnn import (
    GatedPixelCNN,
    MaskedConv2d,
    PixelCNN,
    PixelCNNPlusPlus,
    mix_logistic_num_params,
)
from genlab.nets.pixelrnn import PixelRNN

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit grid in [-1, 1]
KINDS = ["pixelcnn", "gated", "pixelcnn++", "row", "diagonal"]


def tiny_net(kind: str, channels: int, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(num_classes=num_classes)
    if kind == "pixelcnn":
        net = PixelCNN(channels, hidden=24, num_layers=2, kernel_size=5, out_hidden=48, **common)
    elif kind == "gated":
        net = GatedPixelCNN(channels, 24, num_layers=2, kernel_size=3, out_hidden=48, **common)
    elif kind == "pixelcnn++":
        net = PixelCNNPlusPlus(channels, 8, num_resnets=1, num_mixtures=2, dropout=0.0, **common)
    else:
        net = PixelRNN(channels, hidden=12, num_layers=2, kind=kind, out_hidden=48, **common)
    return net.eval()


def grid_image(shape: tuple, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, shape, generator=g) / 127.5 - 1).to(dtype)


def input_grad(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d out.sum() / dx as (B, H*W, C): per image, one row per pixel in raster order."""
    (g,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    return g.permute(0, 2, 3, 1).flatten(1, 2)


def assert_sees_neighbours(g: torch.Tensor, i: int, j: int, width: int) -> None:
    """The pixel left of and the pixel above (i, j) influence it, in every channel."""
    if j > 0:
        assert (g[i * width + j - 1] != 0).all(), "ignores the pixel to the left"
    if i > 0:
        assert (g[(i - 1) * width + j] != 0).all(), "ignores the pixel above"


POSITIONS = [(0, 0), (3, 0), (4, 4), (7, 7)]  # first pixel, a row start, mid-row, last pixel


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_causal_per_pixel_and_channel(kind, channels):
    """The output for (pixel p, channel c) has exactly zero gradient with respect to every
    later pixel and to channels >= c of pixel p, and non-zero gradient with respect to the
    earlier channels of p and the neighbours left and above. For the mixture net the output
    is the per-channel NLL -log P(x_c | x_<c), whose target x_c itself is an input (so only
    channels > c must be zero), and the mixture parameters of pixel p must not depend on
    pixel p at all (the RGB dependence is the likelihood's linear term).

    One query (pixel, channel) per copy of the image in the batch, so one backward pass
    gives every query's gradient (the nets treat batch elements independently)."""
    net = tiny_net(kind, channels, num_classes=2).double()
    queries = [(i, j, c) for i, j in POSITIONS for c in range(channels)]
    x = grid_image((1, channels, 8, 8)).expand(len(queries), -1, -1, -1).clone()
    x.requires_grad_(True)
    out = net(x, torch.ones(len(queries), dtype=torch.long))
    mixture = net.output == "logistic_mixture"
    per_channel = (
        discretized_mix_logistic_channel_nll(x, out, net.num_mixtures)[:, None]
        if mixture
        else out  # (Q, 256, C, H, W) logits
    )
    n = torch.arange(len(queries))
    rows, cols, chans = (torch.tensor(v) for v in zip(*queries))
    grads = input_grad(per_channel[n, :, chans, rows, cols], x)  # (Q, H*W, C)
    params_grads = input_grad(out[n, :, rows, cols], x) if mixture else None
    for q, (i, j, c) in enumerate(queries):
        p, g = i * 8 + j, grads[q]
        assert (g[p + 1 :] == 0).all(), f"({i}, {j}) channel {c} sees a later pixel"
        assert (g[p, c + mixture :] == 0).all(), f"({i}, {j}) channel {c} sees itself"
        assert (g[p, :c] != 0).all(), f"({i}, {j}) channel {c} ignores earlier channels"
        assert_sees_neighbours(g, i, j, 8)
        if mixture:
            g = params_grads[q]
            assert (g[p:] == 0).all(), "mixture parameters see the current or a later pixel"
            assert_sees_neighbours(g, i, j, 8)


def test_gated_pixelcnn_has_no_blind_spot_but_pixelcnn_does():
    """Three layers of 3-wide convolutions: the Gated PixelCNN sees every pixel of the three
    rows above within 3 columns (van den Oord et al. 2016b, Fig. 1, right); a PixelCNN of 3x3
    masks never sees (i - 1, j + 2), however deep (Fig. 1, left)."""
    torch.manual_seed(0)
    x = grid_image((1, 1, 8, 8)).requires_grad_(True)
    i, j = 5, 3
    gated = GatedPixelCNN(1, hidden=8, num_layers=3, kernel_size=3, out_hidden=8).double()
    g = input_grad(gated(x)[:, :, 0, i, j], x).view(8, 8)
    assert (g[i - 3 : i, j - 3 : j + 4] != 0).all()
    assert (g[i, j - 3 : j] != 0).all() and (g[i, j:] == 0).all() and (g[i + 1 :] == 0).all()
    plain = PixelCNN(1, hidden=8, num_layers=3, kernel_size=3, out_hidden=8).double()
    g = input_grad(plain(x)[:, :, 0, i, j], x).view(8, 8)
    assert g[i - 1, j + 1] != 0 and g[i - 1, j + 2] == 0 and g[i - 2, j + 3] == 0
    assert g[i - 3, j + 3] != 0  # reached through the residual blocks, not the first layer


@pytest.mark.parametrize("kind", ["pixelcnn++", "row", "diagonal"])
def test_recurrent_and_multiscale_nets_see_the_whole_past(kind):
    """Two LSTM layers (the Row LSTM's triangle, the Diagonal BiLSTM's full dependency field,
    Sec. 3.1-3.2) and three PixelCNN++ scales reach every earlier pixel of an 8x8 image, far
    beyond the first convolution (7 rows above the bottom row)."""
    net = tiny_net(kind, 1).double()
    x = grid_image((1, 1, 8, 8)).requires_grad_(True)
    out = net(x)
    g = input_grad(out[:, :, 0, 7, 4] if net.output == "categorical" else out[:, :, 7, 4], x)
    assert (g[0, : 7 * 8 + 4] != 0).all() and (g[0, 7 * 8 + 4 :] == 0).all()


def test_masked_conv_centre_masks_follow_rgb_order():
    """At the centre, mask A lets G see R and B see R, G; mask B adds each channel itself;
    rows below and pixels to the right are always masked (van den Oord et al. 2016, Fig. 2)."""
    a = MaskedConv2d(3, 3, 3, "A", data_channels=3).mask
    b = MaskedConv2d(3, 3, 3, "B", data_channels=3).mask
    assert torch.equal(a[:, :, 1, 1], torch.ones(3, 3).tril(-1))
    assert torch.equal(b[:, :, 1, 1], torch.ones(3, 3).tril())
    assert (a[:, :, 2] == 0).all() and (a[:, :, 1, 2] == 0).all()
    assert (a[:, :, 0] == 1).all() and (a[:, :, 1, 0] == 1).all()
    grey = MaskedConv2d(1, 1, 3, "A").mask[0, 0]
    assert torch.equal(grey, torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]]))


# ----------------------------------------------------------------- discretised logistic mixture
def extreme_params(channels: int, k: int, width: int, seed: int = 0) -> torch.Tensor:
    """(1, P, 1, width) random parameters: pixel w has log-scales near -10, -7, -4, -1, 2, 7
    (from below the clamp at -7 to very flat) and means up to about +-4, beyond [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(1, mix_logistic_num_params(channels, k), 1, width, generator=g)
    params = params.double()
    log_scales = torch.tensor([-10.0, -7.0, -4.0, -1.0, 2.0, 7.0])[:width].double()
    params[:, k * (1 + channels) : k * (1 + 2 * channels)] += log_scales
    params[:, k : k * (1 + channels)] *= 2  # means up to about +-4
    return params


def channel_probs(x: torch.Tensor, params: torch.Tensor, k: int, c: int) -> torch.Tensor:
    """P(x_c | x_<c) for a batch of images (256, C, 1, W) sharing ``params``. -> (256, W)."""
    params = params.expand(x.shape[0], -1, -1, -1)
    return torch.exp(-discretized_mix_logistic_channel_nll(x, params, k))[:, c, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixture_masses_sum_to_one_grey(dtype):
    params = extreme_params(1, 3, 6).to(dtype)
    x = GRID.to(dtype).view(256, 1, 1, 1).expand(256, 1, 1, 6)
    probs = channel_probs(x, params, 3, 0)
    assert torch.allclose(probs.sum(0).double(), torch.ones(6, dtype=torch.float64), atol=1e-4)


def test_mixture_conditionals_sum_to_one_rgb():
    """P(R), P(G | R = r) and P(B | R = r, G = g) each sum to one over the 256 values."""
    k, width = 4, 6
    params = extreme_params(3, k, width)
    fixed = grid_image((1, 3, 1, width), seed=1)
    for c in range(3):
        x = fixed.expand(256, -1, -1, -1).clone()
        x[:, c] = GRID.view(256, 1, 1)
        probs = channel_probs(x, params, k, c)
        assert torch.allclose(probs.sum(0), torch.ones(width, dtype=torch.float64), atol=1e-5)


def test_mixture_nll_is_the_sum_of_channel_terms_and_reduces_to_one_logistic():
    params = extreme_params(3, 2, 6).expand(2, -1, 3, -1)
    x = grid_image((2, 3, 3, 6), seed=2)
    per_channel = discretized_mix_logistic_channel_nll(x, params, 2)
    total = discretized_mix_logistic_nll(x, params, 2)
    assert torch.allclose(per_channel.flatten(1).sum(1), total)
    one = extreme_params(1, 1, 6).expand(2, -1, 3, -1)  # 1 component, grey: [logit, mean, s]
    xg = x[:, :1]
    expected = discretized_logistic_nll(xg, one[:, 1:2], one[:, 2:3].clamp(min=-7))
    assert torch.allclose(discretized_mix_logistic_nll(xg, one, 1), expected.flatten(1).sum(1))


def test_mixture_layout_and_rgb_dependence_follow_pixelcnn_pp():
    """Layout [logits, means, log-scales, coefficients], coefficients a, b, c = (G|R), (B|R),
    (B|G) after tanh (Salimans et al. 2017, Eq. 3 and their code): one sharp component puts
    its mass on R = r, G = q(mu_G + a r), B = q(mu_B + b r + c g) and samples there."""
    r, g, b = GRID[170], GRID[60], GRID[222]
    a, bb, c = 0.5, -0.4, 0.8
    mu = torch.stack([r, g - a * r, b - bb * r - c * g])
    coeffs = torch.atanh(torch.tensor([a, bb, c], dtype=torch.float64))
    params = torch.cat([torch.zeros(1), mu, torch.full((3,), -7.0), coeffs]).view(1, 10, 1, 1)
    target = torch.stack([r, g, b]).view(1, 3, 1, 1)
    assert discretized_mix_logistic_nll(target, params.double(), 1) < 0.1  # 3 x 0.027 nats
    draws = sample_mix_logistic(params.expand(200, -1, -1, -1), 1, torch.Generator().manual_seed(0))
    assert (draws == target).all(dim=1).double().mean() > 0.8


def test_sample_mix_logistic_is_deterministic_and_on_the_grid():
    params = extreme_params(3, 2, 6).expand(4, -1, 5, -1).float()
    draw = lambda seed: sample_mix_logistic(params, 2, torch.Generator().manual_seed(seed))
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, 3, 5, 6) and torch.equal(a, b) and not torch.equal(a, c)
    k = (a + 1) * 127.5
    assert (a.abs() <= 1).all() and torch.allclose(k, k.round(), atol=1e-4)


def test_sample_mix_logistic_matches_the_likelihood():
    """Empirical frequencies of 40000 draws against the model's masses: the marginal of R and
    the marginal of G = sum_r P(r) P(G | r), which checks the RGB dependence of the sampler."""
    k, n = 2, 40000
    params = torch.randn(
        1, mix_logistic_num_params(3, k), 1, 1, generator=torch.Generator().manual_seed(3)
    )
    params = params.double()
    params[:, k * 4 : k * 7] = -2.5  # log-scales: about 20 bins wide
    params[:, k * 7 :] = 2.0  # strong dependence on R and G
    draws = sample_mix_logistic(params.expand(n, -1, -1, -1), k, torch.Generator().manual_seed(0))
    counts = lambda v: torch.bincount(((v + 1) * 127.5).round().long().flatten(), minlength=256)
    x = torch.zeros(256, 3, 1, 1, dtype=torch.float64)
    x[:, 0] = GRID.view(256, 1, 1)
    p_r = channel_probs(x, params, k, 0)[:, 0]  # (256,)
    x = torch.zeros(256 * 256, 3, 1, 1, dtype=torch.float64)
    x[:, 0] = GRID.repeat_interleave(256).view(-1, 1, 1)
    x[:, 1] = GRID.repeat(256).view(-1, 1, 1)
    p_g = (p_r[:, None] * channel_probs(x, params, k, 1)[:, 0].view(256, 256)).sum(0)
    for c, model in [(0, p_r), (1, p_g)]:
        tv = 0.5 * (counts(draws[:, c]) / n - model).abs().sum()
        assert tv < 0.05, f"channel {c}: total variation {tv:.3f}"


# ------------------------------------------------------------------------ shapes and labels
@pytest.mark.parametrize("size,channels", [(16, 3), (28, 1), (32, 3)])
@pytest.mark.parametrize("kind", KINDS)
def test_output_shapes(kind, size, channels):
    net = tiny_net(kind, channels)
    with torch.no_grad():
        out = net(grid_image((2, channels, size, size), dtype=torch.float32))
    if net.output == "categorical":
        assert out.shape == (2, 256, channels, size, size)
    else:
        assert out.shape == (2, mix_logistic_num_params(channels, 2), size, size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", KINDS)
def test_class_conditioning_uses_the_label(kind):
    net = tiny_net(kind, 1, num_classes=3)
    x = grid_image((2, 1, 8, 8), dtype=torch.float32)
    with torch.no_grad():
        a, b = net(x, torch.tensor([0, 0])), net(x, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError):
        net(x)
