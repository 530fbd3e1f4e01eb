"""Text-to-image (genlab.families.text): UNet cross-attention, the frozen text encoder, caption
dropout, classifier-free guidance on the text, caption sources (digit templates, a captioned
folder), and a few training steps of model=text_flow followed by sampling from prompts."""

import hashlib
import json

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from genlab.data import FolderDataModule
from genlab.families.text import EMPTY, TextFlowModule, digit_caption
from genlab.families.text_encoder import TextEncoder
from genlab.guidance.cfg import ClassifierFree
from genlab.metrics.train_clip import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES
from genlab.nets.dit import DiT
from genlab.nets.text import TextContext
from genlab.nets.unet import UNet
from genlab.train import train
from genlab.utils import ConfigError

from .conftest import compose_cfg

# conf/model/net/unet.yaml at 28x28 with 10 classes, as before cross-attention existed
UNET_CFG = dict(in_channels=1, image_size=28, base_channels=16, channel_mult=[1, 2, 4],
                num_res_blocks=1, attn_resolutions=[7], num_classes=10)  # fmt: skip
UNET_KEYS_SHA1 = "67a58cb4f41cdf6608e7a51a7803997761e5e5ee"  # sha1 of " ".join(state dict keys)


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder("genlab-digits")


@pytest.fixture
def model(tmp_path):
    cfg = compose_cfg(["model=text_flow", "data=synthetic", "model.sampler.steps=2"], tmp_path)
    return instantiate(cfg.model)


def _perturb(net, std=0.5, only="cross."):
    """Add noise to the parameters whose name contains ``only`` (all of them for "")."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if only in name:
                p.add_(std * torch.randn(p.shape, generator=g))


def test_unet_without_context_dim_keeps_its_parameters_and_keys():
    net = UNet(**UNET_CFG)
    keys = list(net.state_dict())
    assert hashlib.sha1(" ".join(keys).encode()).hexdigest() == UNET_KEYS_SHA1
    assert len(keys) == 169 and sum(p.numel() for p in net.parameters()) == 687473
    with pytest.raises(ValueError, match="no cross-attention.*context_dim"):
        net(torch.zeros(1, 1, 28, 28), torch.zeros(1), context=torch.zeros(1, 3, 8))
    with_cross = UNet(**UNET_CFG, context_dim=8)
    assert set(keys) < set(with_cross.state_dict())
    assert all(".cross." in k for k in set(with_cross.state_dict()) - set(keys))


def test_unet_cross_attention_is_identity_at_init_then_conditions_and_ignores_masked_tokens():
    torch.manual_seed(0)
    net = UNet(**UNET_CFG, context_dim=8).eval()
    _perturb(net.conv_out, 0.1, only="")  # a non-zero output, so differences show
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10.0, 500.0])
    ctx = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    plain = net(x, t)
    assert torch.equal(net(x, t, context=ctx, context_mask=mask), plain)  # zero-init proj
    _perturb(net)
    out = net(x, t, context=ctx, context_mask=mask)
    assert not torch.allclose(out, plain, atol=1e-4)
    other = ctx.clone()
    other[0, 2:] = torch.randn(3, 8) * 10  # only masked tokens of sample 0 change
    again = net(x, t, context=other, context_mask=mask)
    assert torch.allclose(again, out, atol=1e-5)
    other[0, :2] = torch.randn(2, 8)  # a kept token changes: the output does
    assert not torch.allclose(net(x, t, context=other, context_mask=mask)[0], out[0], atol=1e-4)
    nothing = torch.zeros_like(mask)  # every token masked: nothing added
    assert torch.allclose(net(x, t, context=ctx, context_mask=nothing), plain, atol=1e-6)
    with pytest.raises(ValueError, match=r"context must be \(B, L, 8\)"):
        net(x, t, context=torch.randn(2, 5, 7))


def test_text_encoder_gives_per_token_features_and_the_padding_mask(encoder):
    ctx = encoder(["", "a handwritten seven", ""])
    assert ctx.tokens.shape == (3, encoder.context_length, encoder.width) == (3, 16, 64)
    tokens = encoder.tokenizer(["", "a handwritten seven"])
    assert torch.equal(ctx.mask[:2], tokens != 0)  # id 0 pads open_clip's SimpleTokenizer
    assert ctx.mask.sum(1).tolist() == [2, 5, 2]  # "" is [start, end]; 3 words + 2
    assert torch.equal(ctx.tokens[0], ctx.tokens[2])  # the cache
    assert len(encoder._cache) == 2


def test_caption_dropout_reaches_the_unconditional_branch(model):
    y = torch.arange(8) % 4
    empty = model.context(None)  # the unconditional branch: one "" row
    model.cond_drop_prob = 1.0
    dropped = model._labels(y, drop=True)
    assert torch.equal(dropped.tokens, empty.tokens.expand(8, -1, -1))
    assert torch.equal(dropped.mask, empty.mask.expand(8, -1))
    model.cond_drop_prob = 0.0
    kept = model._labels(y, drop=True)
    assert not any(torch.equal(kept.tokens[i], empty.tokens[0]) for i in range(8))
    assert model.drop_captions(["a", "b"]) == ["a", "b"]
    model.cond_drop_prob = 1.0
    assert model.drop_captions(["a", "b"]) == [EMPTY, EMPTY]


def test_cfg_scale_0_and_1_are_the_unconditional_and_conditional_predictions(model):
    model.eval()
    prompts = ["a handwritten two", "the digit 3"]
    _perturb(model.net, 0.1, only="")  # a net (and cross-attention) that does something
    x = torch.randn(2, 1, 16, 16)
    sigma = torch.full((2,), 2.0, dtype=torch.float64)
    cond = model.denoiser(prompts, use_ema=False)(x, sigma)
    uncond = model.denoiser(None, use_ema=False)(x, sigma)
    assert not torch.allclose(cond, uncond, atol=1e-5)

    def guided(scale):
        wrapped = ClassifierFree(scale).wrap_denoiser(
            model, model.denoiser(prompts, False), prompts
        )
        return wrapped(x, sigma)

    assert torch.equal(guided(0.0), uncond)
    assert torch.equal(guided(1.0), cond)
    assert torch.allclose(guided(3.0), uncond + 3.0 * (cond - uncond), atol=1e-6)
    ClassifierFree(3.0).check(model)  # trained with caption dropout: CFG accepts it


def test_held_out_templates_at_sampling_and_training_templates_in_training(model):
    y = torch.arange(40) % 4
    train = {digit_caption(t, c) for t in TRAIN_TEMPLATES for c in range(4)}
    held = [digit_caption(HELD_OUT_TEMPLATES[i % 4], int(c)) for i, c in enumerate(y)]
    training = model.captions_for(y, training=True)
    assert set(training) <= train and len(set(training)) > 4
    assert model.captions_for(y, training=False) == held
    assert not set(held) & train
    x = torch.randn(4, 1, 16, 16)
    sigma = torch.full((4,), 1.0, dtype=torch.float64)
    by_labels = model.denoiser(y[:4], use_ema=False)(x, sigma)
    assert torch.equal(by_labels, model.denoiser(held[:4], use_ema=False)(x, sigma))
    assert model.describe()["text"]["sampling_templates"] == HELD_OUT_TEMPLATES


def _write_folder(root, names):
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), color=30 * i).save(root / name)


def test_a_folder_reads_captions_jsonl_and_image_txt(tmp_path):
    root = tmp_path / "images"
    _write_folder(root, ["a.png", "b.png", "sub/c.png", "sub/d.png"])
    lines = [{"file": "a.png", "caption": "a red square"}, {"file": "sub/c.png", "caption": "c"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(e) for e in lines) + "\n")
    (root / "b.txt").write_text("a blue circle\n")
    (root / "sub" / "d.txt").write_text("d")
    dm = FolderDataModule(root=str(root), image_size=8, channels=1, captions=True,
                          val_fraction=0.25, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert dm.captions == ["a red square", "a blue circle", "c", "d"]
    labels = torch.cat([dm.load_split(s).tensors[1] for s in ("train", "val")])
    assert sorted(labels.tolist()) == [0, 1, 2, 3]  # labels index the captions
    with pytest.raises(ConfigError, match="data.num_classes=0"):
        FolderDataModule(root=str(root), captions=True, num_classes=2)


def test_a_missing_caption_is_a_clear_error(tmp_path):
    root = tmp_path / "images"
    _write_folder(root, ["a.png", "b.png"])
    (root / "a.txt").write_text("an a")
    dm = FolderDataModule(root=str(root), image_size=8, channels=1, captions=True)
    with pytest.raises(ConfigError) as err:
        _ = dm.captions
    message = str(err.value)
    assert "no caption for b.png" in message and "captions.jsonl" in message
    assert "b.txt beside the image" in message and "\n" not in message
    (root / "captions.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match=r"captions.jsonl:1: expected a JSON line"):
        _ = FolderDataModule(root=str(root), captions=True).captions


def test_dataset_captions_are_indexed_by_labels(model):
    model.set_captions(["a cat", "a dog", "a bird"])
    assert model.captions_for(torch.tensor([2, 0]), training=True) == ["a bird", "a cat"]
    assert model.describe()["text"]["captions"] == "dataset captions"


def test_text_flow_trains_a_few_steps_and_samples_from_prompts(model):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-3)
    x, y = torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 4
    model.train()
    for _ in range(3):
        loss = model.loss(x, model._labels(y, drop=True)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    g = torch.Generator().manual_seed(0)
    images = model.sample(3, generator=g, prompts=["a handwritten one", "the digit 2"])
    assert images.shape == (3, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    labelled = model.sample(2, y=torch.tensor([0, 3]), generator=g)
    assert labelled.shape == (2, 1, 16, 16) and torch.isfinite(labelled).all()


def test_a_dit_conditions_on_text_through_its_cross_attention(tmp_path):
    cfg = compose_cfg(["model=text_flow", "model/net=dit", "data=synthetic"], tmp_path)
    model = instantiate(cfg.model)
    assert isinstance(model.net.net, DiT) and model.net.net.context_dim == 64
    x = torch.randn(2, 1, 16, 16)
    sigma = torch.full((2,), 1.0, dtype=torch.float64)
    assert model.denoiser(["a seven", "a two"])(x, sigma).shape == x.shape
    assert isinstance(model.context(["a"]), TextContext)


def test_a_net_without_the_encoders_width_is_a_clear_error(encoder):
    with pytest.raises(ConfigError, match="model.net.context_dim=64"):
        TextFlowModule(
            UNet(1, 16, 16, (1, 2), 1, (), context_dim=32), encoder, image_shape=(1, 16, 16)
        )


def test_a_text_flow_run_samples_prompts_with_cfg_through_the_sample_cli(tiny_cfg):
    """A tiny run (train.py hands the captions over; the evaluation's labels become held-out
    captions), then `python -m genlab.sample ... prompts=[...]` with guidance on the text."""
    from genlab.sample import main as sample_main

    cfg = tiny_cfg("model=text_flow", "guidance=cfg", "guidance.scale=2")
    summary = train(cfg)
    assert summary["status"] == "completed"
    assert summary["metrics"]["val/sample_nfe"] == 2 * cfg.model.sampler.steps  # CFG: 2 calls
    out = sample_main([f"run_dir={cfg.paths.output_dir}", "n=4", "steps=2",
                       "prompts=[a handwritten one,the digit 2]"])  # fmt: skip
    saved = torch.load(out["pt"], weights_only=False)
    assert saved["prompts"] == ["a handwritten one", "the digit 2"]
    assert saved["guidance"] == {"name": "cfg", "scale": 2.0}
    assert out["images"].shape == (4, 1, 16, 16)
    assert json.loads(out["png"].with_suffix(".json").read_text())["columns"] == saved["prompts"]


def test_unlabelled_data_without_captions_is_a_clear_error(model):
    model.num_classes = 0  # e.g. CelebA: no labels to caption, no captions files
    with pytest.raises(ConfigError, match="needs captions.*data.captions=true"):
        model.set_captions(None)


def test_cfg_guides_a_text_model_without_classes_and_refuses_an_unconditional_one(tmp_path):
    """A captioned folder's text model has no classes (num_classes 0) and still takes
    classifier-free guidance on its captions; an unconditional flow model does not."""
    from genlab.guidance.base import GuidanceError

    cfg = compose_cfg(["model=text_flow", "data=celeba", "model.sampler.steps=2"], tmp_path)
    text_model = instantiate(cfg.model)
    assert text_model.num_classes == 0
    text_model.set_guidance(ClassifierFree(3.0))
    assert text_model.guidance is not None
    plain = instantiate(compose_cfg(["model=flow", "data=celeba"], tmp_path).model)
    with pytest.raises(GuidanceError, match="class- or text-conditional"):
        plain.set_guidance(ClassifierFree(3.0))
