"""Gradient guidance: CLIP guidance of diffusion steps, latent optimisation of GAN and VAE
decoders, classifier guidance with a noise-aware classifier, and val/clip_score for guided
samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from genlab.guidance import GuidanceError
from genlab.guidance.clip import ClipGuidance, cutouts
from genlab.runs import load_model
from genlab.sample import main as sample_main
from genlab.train import train

from .conftest import SHARED, compose_cfg

needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").exists(), reason="needs ../shared/assets/mnist"
)


@pytest.fixture(scope="module")
def digits():
    """200 MNIST test digits in [-1, 1] and their labels."""
    from genlab.data import MNISTDataModule, to_model

    images, labels = MNISTDataModule(root=str(SHARED / "mnist"), download=False,
                                     cache_dir=None).read_split("test")  # fmt: skip
    return to_model(images[:200]), labels[:200]


class PassThrough(nn.Module):
    """A stand-in x0-predicting network that returns its input: the denoiser's x0 is x_t, so
    a test controls exactly what the guidance sees."""

    def forward(self, x_t, t, y=None):
        return x_t


def passthrough_diffusion(tmp_path):
    cfg = compose_cfg(["model=diffusion", "data=mnist"], tmp_path)
    cfg.model.net = {"_target_": "tests.test_guidance_gradient.PassThrough"}
    cfg.model.prediction = "x0"
    cfg.model.ema_decay = 0
    return instantiate(cfg.model).eval()


def last_step(model, x_t, t, guidance=None):
    """The sampler's last step from the VP image x_t at timestep t: DDIM and DDPM both return
    the (clamped) denoiser's x0 there, guided or not."""
    denoise = model.denoiser(None, use_ema=False)
    if guidance is not None:
        denoise = guidance.wrap_denoiser(model, denoise, None, index=slice(0, len(x_t)),
                                         n=len(x_t))  # fmt: skip
    sigma = model.frame.sigma_at(torch.full((len(x_t),), t))
    x = x_t * (1 + sigma**2).sqrt().float().view(-1, 1, 1, 1)  # the same image in the sigma frame
    with torch.no_grad():
        return denoise(x, sigma).clamp(-1, 1)


@needs_mnist
def test_one_clip_guided_step_raises_clip_similarity(digits, tmp_path):
    """The same step from the same noisy digits, guided toward "a handwritten seven" and
    not: the guided result is closer to the prompt in CLIP (the domain CLIP) for every image."""
    images, labels = digits
    x0 = images[labels != 7][:16]
    model = passthrough_diffusion(tmp_path)
    g = torch.Generator().manual_seed(0)
    t = 300
    ab = float(model.schedule.alphas_cumprod[t])
    x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=g)
    guide = ClipGuidance(["a handwritten seven"], scale=2.0, cutouts=4, cut_min=0.8)
    model.set_guidance(guide)
    plain = last_step(model, x_t, t)
    guided = last_step(model, x_t, t, model.guidance)
    with torch.no_grad():
        seven = guide.clip.cosine(guided, "a handwritten seven")
        seven_plain = guide.clip.cosine(plain, "a handwritten seven")
    assert (seven > seven_plain).all(), seven - seven_plain
    assert model.describe()["sampler"]["guidance"]["method"] == "gradient"


def test_clip_gradient_flows_through_the_denoiser(tmp_path):
    """Through a real (random) UNet: guided samples differ from unguided ones, scale 0 gives
    the unguided sampler exactly, and the network's own gradients are left alone."""
    cfg = compose_cfg(["model=diffusion", "data=synthetic"], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()

    def draw():
        return model.sample(3, generator=torch.Generator().manual_seed(0), steps=3, use_ema=False)

    plain = draw()
    model.set_guidance(ClipGuidance(["a handwritten two"], scale=0.0, cutouts=2))
    torch.testing.assert_close(draw(), plain)
    model.set_guidance(ClipGuidance(["a handwritten two"], scale=50.0, cutouts=2))
    guided = draw()
    assert guided.shape == plain.shape and not torch.allclose(guided, plain)
    assert all(p.grad is None for p in model.parameters())


def test_reranking_a_diffusion_model_leaves_its_denoiser_alone(tmp_path):
    model = instantiate(compose_cfg(["model=diffusion", "data=synthetic"], tmp_path).model)
    guide = ClipGuidance(["a handwritten two"], method="rerank", k=2)
    model.set_guidance(guide)
    denoise = model.denoiser(None, use_ema=False)
    assert model.guidance.wrap_denoiser(model, denoise, None, index=slice(0, 2), n=2) is denoise
    assert model.sample(2, generator=torch.Generator().manual_seed(0), steps=2).shape[0] == 2


def test_cutouts_are_crops_of_each_image():
    x = torch.linspace(-1, 1, 2 * 16 * 16).view(2, 1, 16, 16)
    views = cutouts(x, 3, 1.0)  # full-size crops: the images themselves
    torch.testing.assert_close(views, x.repeat(3, 1, 1, 1))
    small = cutouts(x, 5, 0.5, torch.Generator().manual_seed(0))
    assert small.shape == (10, 1, 16, 16)
    for i in range(10):  # a crop's values lie inside its own image's range
        src = x[i % 2]
        assert src.min() - 1e-6 <= small[i].min() and small[i].max() <= src.max() + 1e-6


@pytest.mark.parametrize("preset", ["gan", "vae"])
def test_latent_optimisation_raises_similarity_monotonically(preset, tmp_path):
    cfg = compose_cfg([f"model={preset}", "data=mnist"], tmp_path)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    guide = ClipGuidance(["a handwritten three"], steps=6, lr=0.01, cutouts=0, prior_weight=0.01)
    model.set_guidance(guide)
    assert model.guidance.method == "latent"
    out = model.sample(8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 1, 28, 28) and out.min() >= -1 and out.max() <= 1
    (trace,) = model.guidance.history
    assert all(b > a for a, b in zip(trace, trace[1:])), trace
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # the returned images are the optimised ones, not the prior draws
        z = model.latents(8, torch.Generator().manual_seed(0))
        before = guide.clip.cosine(model.generate(z).clamp(-1, 1), "a handwritten three")
        after = guide.clip.cosine(out, "a handwritten three")
    assert after.mean() > before.mean()
    assert model.describe()["sampler"]["guidance"]["steps"] == 6


def test_clip_method_must_fit_the_model(tmp_path):
    gan = instantiate(compose_cfg(["model=gan", "data=synthetic"], tmp_path).model)
    with pytest.raises(GuidanceError, match="method=gradient needs a diffusion model"):
        gan.set_guidance(ClipGuidance(["a seven"], method="gradient"))
    with pytest.raises(GuidanceError, match="cut_min"):
        ClipGuidance(["a seven"], cut_min=0)


def test_guided_diffusion_run_logs_clip_score(tiny_cfg, tmp_path):
    """guidance=clip on a diffusion run: the evaluation samples with gradient guidance and
    logs val/clip_score, each sample scored against its own prompt by the guiding CLIP."""
    cfg = tiny_cfg("model=diffusion", "guidance=clip", "guidance.cutouts=2",
                   "guidance.prompts=[a handwritten seven,a handwritten one]")  # fmt: skip
    summary = train(cfg)
    run = Path(cfg.paths.output_dir)
    protocol = json.loads((run / "summary.json").read_text())["evaluation"]["protocol"]
    assert protocol["sampler"]["guidance"]["method"] == "gradient"
    assert "guiding CLIP" in protocol["clip"]["scorer"]
    assert 0 <= summary["metrics"]["val/clip_score"] <= 100
    grid = json.loads((run / "samples" / "step_0000004.json").read_text())
    assert grid["columns"] == ["a handwritten seven", "a handwritten one"]  # one per column
    args = ["n=2", "steps=2", "guidance=clip", "guidance.scale=5",
            "guidance.prompts=[a handwritten two]"]  # fmt: skip
    out = sample_main([f"run_dir={run}", *args, f"out={tmp_path / 's'}"])
    saved = torch.load(out["pt"], weights_only=False)
    assert saved["guidance"]["method"] == "gradient" and saved["guidance"]["scale"] == 5.0
    assert saved["columns"] == ["a handwritten two"]


# ------------------------------------------------------------------ classifier guidance
@needs_mnist
def test_classifier_guided_step_moves_toward_the_class(digits, tmp_path):
    """From the same noisy digits (none of them sevens), the step guided toward class 7 by the
    shipped noise-aware classifier comes out more seven-like to the independent digit
    classifier of the evaluation protocol; scale 0 is the unguided step exactly."""
    from genlab.guidance.classifier import ClassifierGuidance
    from genlab.metrics.digits import load_digit_classifier

    images, labels = digits
    x0 = images[labels != 7][:32]
    model = passthrough_diffusion(tmp_path)
    t = 500  # log-SNR about 0 on the cosine schedule
    ab = float(model.schedule.alphas_cumprod[t])
    g = torch.Generator().manual_seed(0)
    x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=g)
    plain = last_step(model, x_t, t)
    torch.testing.assert_close(
        last_step(model, x_t, t, ClassifierGuidance(scale=0.0, classes=[7])), plain
    )
    guide = ClassifierGuidance(scale=20.0, classes=[7])
    model.set_guidance(guide)
    guided = last_step(model, x_t, t, guide)
    with torch.no_grad():
        judge = load_digit_classifier()
        before = judge(plain).log_softmax(1)[:, 7]
        after = judge(guided).log_softmax(1)[:, 7]
    assert (after > before).float().mean() >= 0.9 and after.mean() > before.mean() + 2.0
    assert model.describe()["sampler"]["guidance"]["classes"] == [7]


def test_classifier_guidance_uses_a_conditional_models_labels(tmp_path):
    from genlab.guidance.classifier import ClassifierGuidance

    guide = ClassifierGuidance(classes=[1, 2], weights=[3, 1])
    assert guide.targets_for(8) == [1] * 6 + [2] * 2
    assert guide.batch_targets(8, slice(4, 8), None) == [1, 1, 2, 2]
    assert guide.batch_targets(8, slice(0, 3), torch.tensor([5, 6, 7])) == [5, 6, 7]


def test_classifier_guidance_errors_are_clear(tmp_path):
    from genlab.guidance.classifier import ClassifierGuidance
    from genlab.metrics.common import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="nope.pt.*train_classifier"):
        ClassifierGuidance(classifier=str(tmp_path / "nope.pt"))
    with pytest.raises(GuidanceError, match="classes must be classes in"):
        ClassifierGuidance(classes=[12])
    gan = instantiate(compose_cfg(["model=gan", "data=synthetic"], tmp_path).model)
    with pytest.raises(GuidanceError, match="needs a diffusion model"):
        gan.set_guidance(ClassifierGuidance())
    rgb = instantiate(compose_cfg(["model=diffusion", "data=synthetic", "data.channels=3"],
                                  tmp_path).model)  # fmt: skip
    with pytest.raises(GuidanceError, match="reads 1-channel images"):
        rgb.set_guidance(ClassifierGuidance())


@needs_mnist
def test_shipped_noise_aware_classifier_reads_noisy_digits(digits):
    """The shipped classifier on MNIST test digits noised to log-SNR 2 and 0, and its file
    records what training measured."""
    from genlab.guidance.classifier import WEIGHTS, load_noisy_classifier

    net = load_noisy_classifier()
    images, labels = digits
    g = torch.Generator().manual_seed(0)
    for log_snr, want in [(2.0, 0.9), (0.0, 0.8)]:
        a = torch.sigmoid(torch.tensor(log_snr))
        x_t = a.sqrt() * images + (1 - a).sqrt() * torch.randn(images.shape, generator=g)
        with torch.no_grad():
            pred = net(x_t, torch.full((len(images),), log_snr)).argmax(1)
        assert (pred == labels).float().mean() > want, log_snr
    blob = torch.load(WEIGHTS, weights_only=True)
    assert blob["test_accuracy_at_log_snr"]["2.0"] > 0.9


@needs_mnist
def test_classifier_training_script_writes_a_file_that_loads(tmp_path):
    from genlab.guidance.classifier import ClassifierGuidance
    from genlab.guidance.train_classifier import main

    out = tmp_path / "clf.pt"
    blob = main([f"data_dir={SHARED / 'mnist'}", "epochs=1", "limit=256", "width=8",
                 f"out={out}"])  # fmt: skip
    assert out.exists() and set(blob["test_accuracy_at_log_snr"]) == {
        "-8.0",
        "-4.0",
        "-2.0",
        "0.0",
        "2.0",
        "4.0",
        "8.0",
    }
    guide = ClassifierGuidance(classifier=str(out))
    assert guide.net.config["width"] == 8 and guide.protocol()["classifier"]["file"] == str(out)


def test_classifier_guidance_through_the_sample_cli(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=diffusion")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    args = ["n=3", "guidance=classifier", "guidance.scale=2", "guidance.classes=[3]",
            "+model.sampler.eta=1", "+model.sampler.steps=2"]  # fmt: skip
    out = sample_main([f"run_dir={run}", *args, f"out={tmp_path / 's'}"])
    saved = torch.load(out["pt"], weights_only=False)
    assert saved["model_overrides"] == ["sampler.eta=1", "sampler.steps=2"]
    model, _, _ = load_model(run, overrides=["sampler.eta=1", "sampler.steps=2"])
    assert model.sampler.keywords["eta"] == 1 and model.sampler.keywords["steps"] == 2
    assert saved["images"].shape == (3, 1, 16, 16)
    assert saved["guidance"]["name"] == "classifier" and saved["guidance"]["scale"] == 2.0


def test_one_clip_guidance_guides_two_families_each_its_own_way(tmp_path):
    """The same ClipGuidance(method=auto) bound to a diffusion model and to a GAN: the first
    follows the CLIP gradient inside its sampler, the second optimises its latents; neither
    binding changes the other, and nothing replaces either model's sample method."""
    diffusion = instantiate(compose_cfg(["model=diffusion", "data=mnist"], tmp_path).model)
    gan = instantiate(compose_cfg(["model=gan", "data=mnist"], tmp_path).model)
    guide = ClipGuidance(["a handwritten two"], scale=50.0, cutouts=0, steps=2)
    diffusion.set_guidance(guide)
    gan.set_guidance(guide)
    assert diffusion.guidance.method == "gradient" and gan.guidance.method == "latent"
    assert diffusion.describe()["sampler"]["guidance"]["method"] == "gradient"
    assert gan.describe()["sampler"]["guidance"]["method"] == "latent"
    assert "sample" not in vars(diffusion) and "sample" not in vars(gan)

    def draw(model, **kw):
        return model.sample(2, generator=torch.Generator().manual_seed(0), use_ema=False, **kw)

    guided = draw(diffusion, steps=2), draw(gan)
    assert len(gan.guidance.history) == 1 and len(gan.guidance.history[0]) == 2
    diffusion.set_guidance(None)
    gan.set_guidance(None)
    plain = draw(diffusion, steps=2), draw(gan)
    for g, p in zip(guided, plain):
        assert g.shape == p.shape and not torch.allclose(g, p)
