"""The DiT backbone (genlab.nets.dit, Peebles & Xie 2023) and the FLOP counter: adaLN-Zero
identity at initialisation, shapes, the patch check, class and text conditioning, SDPA use, and
every denoising family training with ``model/net=dit`` through the real config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from genlab.nets.dit import DiT, DiTBlock, sincos_pos_embed_2d
from genlab.nets.flops import count_flops
from genlab.train import train
from genlab.utils import group_overrides

from .conftest import compose_cfg


def tiny(**kw) -> DiT:
    args = dict(in_channels=1, image_size=8, patch_size=2, hidden=32, depth=2, num_heads=4)
    return DiT(**{**args, **kw})


def perturb(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every parameter, the zero-initialised ones included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def inputs(b: int = 3, c: int = 1, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, size, size, generator=g)
    return x, torch.rand(b, generator=g) * 1000


# ------------------------------------------------------------------ adaLN-Zero at init
@pytest.mark.parametrize("context_dim", [None, 12])
def test_every_block_is_the_identity_and_the_net_outputs_zeros_at_init(context_dim):
    torch.manual_seed(0)
    net = tiny(num_classes=5, context_dim=context_dim)
    x, t = inputs()
    context = torch.randn(3, 7, 12) if context_dim else None
    for block in net.blocks:
        h, c = torch.randn(3, 16, 32), torch.randn(3, 32)
        assert torch.equal(block(h, c, context), h)
    out = net(x, t, torch.tensor([0, 4, 5]), context)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))


def test_a_block_with_random_modulation_is_not_the_identity():
    block = perturb(DiTBlock(32, 4))
    h = torch.randn(2, 16, 32)
    assert not torch.allclose(block(h, torch.randn(2, 32)), h)


# ------------------------------------------------------------------ shapes and the patch check
@pytest.mark.parametrize("channels, size, patch", [(1, 28, 2), (3, 32, 2), (4, 32, 4), (3, 64, 8)])
def test_output_shape(channels, size, patch):
    net = perturb(tiny(in_channels=channels, image_size=size, patch_size=patch))
    x, t = inputs(2, channels, size)
    out = net(x, t)
    assert out.shape == (2, channels, size, size) and torch.isfinite(out).all()
    assert net.grid == size // patch
    wide = tiny(in_channels=channels, image_size=size, patch_size=patch, out_channels=2 * channels)
    assert wide(x, t).shape == (2, 2 * channels, size, size)


def test_a_patch_size_that_does_not_divide_the_image_is_refused():
    with pytest.raises(ValueError, match="patch_size 3 does not divide image_size 28") as err:
        DiT(1, 28, patch_size=3, hidden=32, depth=1, num_heads=4)
    assert "divisors of 28: 1, 2, 4, 7, 14" in str(err.value) and "\n" not in str(err.value)
    DiT(1, 28, patch_size=2, hidden=32, depth=1, num_heads=4)  # 14x14 tokens is fine


def test_inputs_of_another_size_are_refused():
    with pytest.raises(ValueError, match=r"built for \(B, 1x8x8\) inputs"):
        tiny()(torch.randn(2, 1, 16, 16), torch.zeros(2))


# ------------------------------------------------------------------ class conditioning
def test_class_conditioning_after_the_zero_init_is_perturbed():
    net = perturb(tiny(num_classes=4))
    x, t = inputs(2)
    a = net(x, t, torch.tensor([0, 0]))
    b = net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, t), net(x, t, torch.tensor([4, 4])))  # y=None: the "no class" token


def test_two_optimizer_steps_leave_the_zero_init():
    torch.manual_seed(0)
    net = tiny(num_classes=3)
    x, t = inputs(4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    target = torch.randn_like(x)
    # step 1 moves only the final Linear (every other gradient passes through its zeros);
    # step 2 then reaches the final and the blocks' adaLN, and the label matters
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(net(x, t, torch.tensor([0, 1, 2, 3])), target).backward()
        opt.step()
    out = net(x, t, torch.tensor([0, 0, 0, 0]))
    assert out.abs().max() > 0
    assert not torch.allclose(out, net(x, t, torch.tensor([1, 1, 1, 1])))


# ------------------------------------------------------------------ position embeddings
def test_fixed_and_learned_position_embeddings():
    fixed, learned = tiny(), tiny(pos_embed="learned")
    assert "pos_embed" not in fixed.state_dict()  # a non-persistent buffer, computed in code
    assert isinstance(learned.pos_embed, nn.Parameter) and "pos_embed" in learned.state_dict()
    assert 0.01 < learned.pos_embed.std().item() < 0.03  # normal(0, 0.02)
    table = sincos_pos_embed_2d(32, 4)  # (16 tokens, 32): token 0 is sin 0 = 0, cos 0 = 1
    assert table.shape == (16, 32) and torch.equal(fixed.pos_embed[0], table)
    assert torch.equal(table[0], torch.tensor(([0.0] * 8 + [1.0] * 8) * 2))
    assert torch.equal(table[1, :16], table[0, :16])  # same row, next column
    x, t = inputs(2)
    for net in (perturb(fixed), perturb(learned)):
        assert net(x, t).shape == x.shape
    with pytest.raises(ValueError, match="pos_embed must be"):
        tiny(pos_embed="rope")


# ------------------------------------------------------------------ cross-attention
def test_cross_attention_depends_on_the_context_and_respects_the_mask():
    net = perturb(tiny(context_dim=12))
    x, t = inputs(2)
    g = torch.Generator().manual_seed(1)
    context = torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    out = net(x, t, context=context, context_mask=mask)
    other = net(x, t, context=torch.randn(2, 5, 12, generator=g), context_mask=mask)
    assert not torch.allclose(out, other)
    changed = context.clone()
    changed[0, 3:] = 100.0  # masked-out tokens: no effect on the output
    changed[1, [1, 4]] = -50.0
    assert torch.allclose(net(x, t, context=changed, context_mask=mask), out, atol=1e-6)
    none = torch.zeros(2, 5, dtype=torch.bool)  # nothing kept: as if there were no context
    assert torch.allclose(net(x, t, context=context, context_mask=none), net(x, t), atol=1e-6)


def test_context_needs_cross_attention():
    net = tiny()
    assert not any("cross" in name for name, _ in net.named_parameters())
    x, t = inputs(2)
    with pytest.raises(ValueError, match="no cross-attention.*context_dim"):
        net(x, t, context=torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"context must be \(B, L, 12\)"):
        tiny(context_dim=12)(x, t, context=torch.randn(2, 5, 7))


# ------------------------------------------------------------------ SDPA and FLOPs
def test_self_attention_runs_through_sdpa(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    net = tiny(depth=3)
    net(*inputs(2))
    assert len(calls) == 3 and calls[0] == (2, 4, 16, 8)  # (B, heads, tokens, head dim)
    calls.clear()
    tiny(depth=3, context_dim=12)(*inputs(2), context=torch.randn(2, 5, 12))
    assert len(calls) == 6  # self- and cross-attention in each block


class Two(nn.Module):
    """A net(x, t) of one layer, to count by hand."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, t, y=None):
        return self.layer(x)


def test_count_flops_by_hand():
    # Linear 5 -> 7 on (B, 5): B * 5 * 7 multiply-adds, 2 FLOPs each; bias adds not counted
    assert count_flops(Two(nn.Linear(5, 7)), torch.randn(4, 5), torch.zeros(4)) == 2 * 5 * 7
    # Conv2d 3 -> 6, 3x3, padding 1 on 8x8: 6 * 8 * 8 outputs of 3 * 3 * 3 multiply-adds
    conv = Two(nn.Conv2d(3, 6, 3, padding=1))
    assert count_flops(conv, torch.randn(2, 3, 8, 8), torch.zeros(2)) == 2 * 6 * 64 * 27
    strided = Two(nn.Conv2d(3, 6, 2, stride=2))  # the patch embedding: 4x4 outputs
    assert count_flops(strided, torch.randn(2, 3, 8, 8), torch.zeros(2)) == 2 * 6 * 16 * 12


def test_count_flops_counts_attention_on_the_cpu():
    net = tiny(depth=1)
    x, t = inputs(2)
    d, tokens, patch_in, out = 32, 16, 4, 4
    # multiply-adds per image: the timestep MLP, the block's and the final layer's adaLN,
    # then per token the patch embedding, qkv + proj + MLP (12 d^2) and the output Linear
    linears = 256 * d + d * d + 6 * d * d + 2 * d * d
    linears += tokens * (patch_in * d + 12 * d * d + d * out)
    attention = 2 * tokens * tokens * d  # q k^T and softmax(.) v over the 4 heads
    assert count_flops(net, x, t) == 2 * (linears + attention)
    assert net.training  # restored


# ------------------------------------------------------------------ through the real config
@pytest.mark.parametrize("family", ["diffusion", "edm", "flow"])
def test_every_denoising_family_trains_with_a_dit(family, tiny_cfg):
    cfg = tiny_cfg(f"model={family}", "model/net=dit", "metrics.at_end=false")
    assert cfg.model.net._target_ == "genlab.nets.dit.DiT"
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["global_step"] == 4
    from genlab.runs import load_model

    module, _, _ = load_model(cfg.paths.output_dir, "last")
    assert isinstance(module.net, DiT)
    images = module.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, *module.image_shape)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1


def test_net_as_a_key_is_the_group_and_its_keys_still_override(tmp_path):
    args = ["model.net=dit", "model.net=unet,dit", "model.net.depth=2"]
    assert group_overrides(args) == ["model/net=dit", "model/net=unet,dit", "model.net.depth=2"]
    cfg = compose_cfg(["model=flow", *group_overrides(["model.net=dit", "model.net.depth=2"])])
    assert cfg.hydra.runtime.choices["model/net"] == "dit"
    net = instantiate(cfg.model.net)
    assert isinstance(net, DiT) and len(net.blocks) == 2
    for option, hidden in (("dit_s", 384), ("dit_b", 768)):
        cfg = compose_cfg(["model=diffusion", f"model/net={option}", "data.image_size=32"])
        assert cfg.model.net.hidden == hidden and cfg.model.net.depth == 12


@pytest.mark.parametrize("net", ["unet", "dit"])
def test_the_protocol_records_the_networks_flops_per_image(net, tmp_path):
    cfg = compose_cfg(["model=flow", f"model/net={net}", "data=mnist"], tmp_path)
    module = instantiate(cfg.model)
    recorded = module.describe()["network"]
    measured = count_flops(module.net, torch.zeros(1, 1, 28, 28), torch.ones(1))
    assert recorded["class"] == {"unet": "UNet", "dit": "DiT"}[net]
    assert recorded["mflops_per_image"] == round(measured / 1e6, 1) > 0
