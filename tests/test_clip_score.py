"""CLIP score: a tiny random open_clip model saved as a local-dir and loaded through the real
path; per-pair definition, clamping, prompts, gradients and missing-weights errors. Offline."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import huggingface_hub.constants
import numpy as np
import open_clip
import open_clip.factory
import open_clip.pretrained
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genlab.data import to_model
from genlab.metrics.clip import CLIPScore
from genlab.metrics.clip_loader import load_clip
from genlab.metrics.common import WeightsNotFoundError, sha256_file, sha256_state

CONTEXT = 16  # small, so that long prompts are easy to write
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {
        "context_length": CONTEXT,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },
}
PROMPTS = ["a red square", "a photo of a dog", "two cats on a sofa", "a blue circle"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A randomly initialised tiny CLIP written as an open_clip folder (config + state dict)."""
    directory = tmp_path_factory.mktemp("tiny_clip")
    config = {"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(f"local-dir:{directory}")  # no weights yet: random init
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return directory


@pytest.fixture(scope="module")
def clip(tiny_dir):
    return CLIPScore(model=f"local-dir:{tiny_dir}", batch_size=3)


def images(n=4, c=3, h=40, w=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


def test_loads_saved_weights_through_local_dir(tiny_dir, clip):
    weights = tiny_dir / "open_clip_pytorch_model.bin"
    saved = torch.load(weights, weights_only=True)
    loaded = clip.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    info = clip.info
    assert info["weights_sha256"] == sha256_file(weights)
    assert info["weights_file"] == str(weights)
    assert (info["image_size"], info["context_length"]) == (32, CONTEXT)
    assert np.allclose(info["mean"], MEAN) and np.allclose(info["std"], STD)
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert not clip.train().model.training  # stays a frozen feature extractor
    protocol = clip.protocol()
    assert (protocol["weight"], protocol["clamp"], protocol["long_prompts"]) == (
        100.0,
        "per pair",
        "truncate",
    )
    # a plain directory path is read as local-dir
    _, _, info2 = load_clip(str(tiny_dir))
    assert info2["weights_sha256"] == info["weights_sha256"]


def test_preprocess_matches_open_clip_eval_transform(clip):
    """Tensor preprocessing == open_clip's PIL transform (resize shorter side, centre crop,
    normalise) up to uint8 rounding and PIL-vs-torch bicubic differences."""
    transform = open_clip.image_transform(32, is_train=False, mean=MEAN, std=STD)
    rng = np.random.default_rng(0)
    for shape in [(45, 70, 3), (70, 45, 3), (32, 32, 3), (50, 50, 1)]:
        small = rng.integers(0, 256, (8, 8, shape[2]), dtype=np.uint8).squeeze()
        pil = Image.fromarray(small).resize(shape[1::-1], Image.BILINEAR)  # smooth content
        ref = transform(pil)
        array = torch.from_numpy(np.array(pil)).reshape(shape).permute(2, 0, 1)
        ours = clip.preprocess(to_model(array)[None])[0]
        assert ours.shape == ref.shape == (3, 32, 32)
        diff = (ours - ref).abs()
        assert diff.max() < 0.05 and diff.mean() < 0.01, shape  # ~1/255 in [0, 1] / std


def test_pairs_equal_direct_computation_and_score_is_their_mean(clip):
    x = images()
    pairs = clip.score_pairs(x, PROMPTS)
    assert pairs.shape == (4,) and ((pairs >= 0) & (pairs <= 100)).all()
    with torch.no_grad():
        fi = F.normalize(clip.model.encode_image(clip.preprocess(x)), dim=-1)
        ft = F.normalize(clip.model.encode_text(clip.tokenizer(PROMPTS)), dim=-1)
    direct = 100 * (fi * ft).sum(-1).clamp(min=0)
    torch.testing.assert_close(pairs, direct, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip(x, PROMPTS), pairs)
    # batch_size=3: two batches; the mean of the per-pair scores
    assert clip.score(x, PROMPTS) == pytest.approx(pairs.mean().item(), abs=1e-4)
    cos = clip.cosine(x, PROMPTS)
    assert clip.score(x, PROMPTS) == pytest.approx((100 * cos.clamp(min=0)).mean().item(), abs=1e-4)


def test_each_pair_is_clamped_before_averaging(clip, monkeypatch):
    """genlab: mean(100 * max(cos, 0)); torchmetrics: max(mean(100 * cos), 0)."""
    texts = {"a": [0.6, 0.8], "b": [-1.0, 0.0], "c": [-0.8, 0.6]}  # cos with e1: .6, -1, -.8
    e1 = torch.tensor([[1.0, 0.0]])
    monkeypatch.setattr(clip, "encode_images", lambda im: e1.expand(len(im), 2))
    monkeypatch.setattr(clip, "_encode_text", lambda ps: torch.tensor([texts[p] for p in ps]))
    x, prompts = images(3), ["a", "b", "c"]
    cos = clip.cosine(x, prompts)
    torch.testing.assert_close(cos, torch.tensor([0.6, -1.0, -0.8]))
    torch.testing.assert_close(clip.score_pairs(x, prompts), torch.tensor([60.0, 0.0, 0.0]))
    assert clip.score(x, prompts) == pytest.approx(20.0)
    torchmetrics_style = max((100 * cos).mean().item(), 0.0)
    assert torchmetrics_style == 0.0 != clip.score(x, prompts)


def test_single_prompt_broadcasts_and_mismatch_raises(clip):
    x = images(3)
    one = clip.score_pairs(x, ["a photo of a dog"])
    torch.testing.assert_close(one, clip.score_pairs(x, ["a photo of a dog"] * 3))
    torch.testing.assert_close(one, clip.score_pairs(x, "a photo of a dog"))
    assert clip.score(x, ["a photo of a dog"]) == pytest.approx(one.mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        clip.score_pairs(x, PROMPTS[:2])
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        clip.score(x, PROMPTS[:2])
    with pytest.raises(ValueError, match="C in"):
        clip.score_pairs(torch.zeros(3, 2, 8, 8), "x")


def test_long_prompts_truncate_keeping_eot_or_raise(clip, monkeypatch):
    long = "cat " * 30  # "cat" is one token: 32 tokens with start/end, context is 16
    fits = "cat " * (CONTEXT - 2)
    assert clip.count_tokens(long) == 32 and clip.count_tokens(fits) == CONTEXT
    # open_clip's SimpleTokenizer truncates to the context and puts end-of-text last; the text
    # tower pools at the end-of-text token, so the truncated prompt embeds like the one that fits
    tokens = clip.tokenizer([long, fits])
    assert tokens[0, -1] == clip.tokenizer.eot_token_id
    assert torch.equal(tokens[0], tokens[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = clip.score(images(2), [long, "a dog"])
        torch.testing.assert_close(clip.encode_text([long]), clip.encode_text([fits]))
    messages = [str(w.message) for w in caught if "context length" in str(w.message)]
    assert len(messages) == 2  # one per call (score, first encode_text), not one per prompt
    assert "1 of 2 prompts" in messages[0] and "truncated" in messages[0]
    assert "cat cat" in messages[0] and "(32 tokens)" in messages[0]
    assert math.isfinite(score)
    monkeypatch.setattr(clip, "long_prompts", "error")
    with pytest.raises(ValueError, match=r"32 tokens .*context length is 16"):
        clip.score_pairs(images(2), [long, "a dog"])
    clip.score_pairs(images(2), [fits, "a dog"])  # exactly the context length is fine


def test_gradient_reaches_the_input_images(clip):
    x = images(4, c=1, h=40, w=56).requires_grad_()  # grey, non-square: resize + crop path
    cos = clip.cosine(x, PROMPTS)
    positive = cos.detach() > 0
    assert positive.any() and not positive.all()  # fixed seed: both kinds of pair present
    clip.score_pairs(x, PROMPTS).sum().backward()
    grad = x.grad
    assert torch.isfinite(grad).all()
    norms = grad.flatten(1).norm(dim=1)
    assert (norms[positive] > 0).all() and (norms[~positive] == 0).all()  # clamped pairs: none
    x.grad = None
    clip.cosine(x, PROMPTS).sum().backward()  # the unclamped cosine, for guidance
    assert (x.grad.flatten(1).norm(dim=1) > 0).all()


def test_missing_weights_raise_with_the_fix(tiny_dir, tmp_path):
    with pytest.raises(WeightsNotFoundError, match=r"/nonexistent/file\.pt.*metrics\.clip"):
        CLIPScore(model="ViT-B-32", pretrained="/nonexistent/file.pt")
    with pytest.raises(WeightsNotFoundError, match=r"/nonexistent.*metrics\.clip\.model"):
        CLIPScore(model="local-dir:/nonexistent")
    with pytest.raises(WeightsNotFoundError, match="metrics.clip.pretrained"):
        CLIPScore(model="ViT-B-32", pretrained=None)
    # a folder with a config but no weights: open_clip would only warn and initialise randomly
    shutil.copy(tiny_dir / "open_clip_config.json", tmp_path / "open_clip_config.json")
    with pytest.raises(WeightsNotFoundError, match="no weights file.*metrics.clip.model"):
        CLIPScore(model=f"local-dir:{tmp_path}")


def test_builtin_tag_offline_names_url_and_setting(tmp_path, monkeypatch):
    """The real open_clip download path for ViT-B-32/openai, into an empty cache. Offline
    mode is switched on because otherwise huggingface_hub retries for ~45 s with no network
    before open_clip gives up; the failure is the same one."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as err:
        CLIPScore(model="ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "ViT-B-32/openai" in message
    assert "huggingface.co/timm/vit_base_patch32_clip_224.openai" in message
    # OpenAI weights need QuickGELU, which the plain ViT-B-32 config lacks
    assert "metrics.clip.model=ViT-B-32-quickgelu metrics.clip.pretrained=<path" in message


def test_builtin_tag_path_with_a_fake_tag(tiny_dir, monkeypatch):
    """A built-in name + tag, with the tiny model registered in open_clip's tables (restored by
    monkeypatch) and the download replaced by the saved file: the tag's QuickGELU flag and
    mean/std are applied and the file is fingerprinted; no tag and no file means an error."""
    weights = tiny_dir / "open_clip_pytorch_model.bin"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "genlab-tiny", TINY_CFG)
    tag_cfg = {"url": "https://example.invalid/tiny.pt", "quick_gelu": True}
    tag_cfg.update(mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "genlab-tiny", {"fake": tag_cfg})
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", lambda cfg, **kw: str(weights))
    clip = CLIPScore(model="genlab-tiny", pretrained="fake")
    assert clip.info["pretrained"] == "fake"
    assert clip.info["weights_sha256"] == sha256_file(weights)
    assert np.allclose(clip.info["mean"], (0.1, 0.2, 0.3))
    act = clip.model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(act, open_clip.transformer.QuickGELU)
    # a weights file instead of a tag: the config as is
    by_file = CLIPScore(model="genlab-tiny", pretrained=str(weights))
    assert isinstance(by_file.model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert by_file.info["weights_sha256"] == sha256_file(weights)
    with pytest.raises(WeightsNotFoundError, match=r"neither a known open_clip tag \(fake\)"):
        CLIPScore(model="genlab-tiny", pretrained="nope")
    # random weights only on request, fingerprinted by their values
    with pytest.raises(WeightsNotFoundError):
        CLIPScore(model="genlab-tiny", pretrained="")
    rand = CLIPScore(model="genlab-tiny", pretrained=None, allow_random=True)
    assert rand.info["pretrained"] is None and rand.info["weights_file"] is None
    assert rand.info["weights_sha256"] == sha256_state(rand.model)


def test_evaluator_logs_clip_score_of_samples(tiny_dir):
    """``metrics=[clip]`` in the evaluation protocol: prompts cycled over the images."""
    from genlab.metrics import Evaluator

    from .test_metrics import ArrayData

    u8 = ((images(6, c=1, h=28, w=28) + 1) * 127.5).round().to(torch.uint8)
    ev = Evaluator(
        metrics=["clip"],
        clip={"model": f"local-dir:{tiny_dir}", "prompts": PROMPTS[:2]},
        progress=False,
    )
    result = ev.evaluate_images(u8, ArrayData(u8))
    scorer = CLIPScore(model=f"local-dir:{tiny_dir}")
    expected = scorer.score_pairs(to_model(u8), [PROMPTS[i % 2] for i in range(6)]).mean()
    assert result["metrics"]["val/clip_score"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["protocol"]["clip"]["prompts"] == PROMPTS[:2]
    assert result["protocol"]["clip"]["clamp"] == "per pair"
