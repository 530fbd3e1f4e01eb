"""The KL autoencoder (model=autoencoder): shapes and value ranges at 28, 32 and 64 px, the KL
in closed form, the discriminator switching on at disc_start, latent_scale from the validation
posterior means, the loss going down, feature matching, PSNR/SSIM, and exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlab.data import SyntheticDataModule
from genlab.families.autoencoder import AutoencoderModule, gaussian_kl
from genlab.families.contract import Generative, Reconstructing
from genlab.metrics.reconstruction import psnr, ssim
from genlab.nets.autoencoder import KLDecoder, KLEncoder, PatchDiscriminator
from genlab.runs import load_model
from genlab.train import train
from genlab.utils import ConfigError

from .conftest import logged


def _module(channels=1, size=16, mult=(1, 2, 2), seed=0, **kw) -> AutoencoderModule:
    torch.manual_seed(seed)
    net = dict(hidden=8, channel_mult=mult, num_res_blocks=1, latent_channels=3)
    return AutoencoderModule(
        KLEncoder(channels, **net),
        KLDecoder(channels, image_size=size, **net),
        PatchDiscriminator(channels, hidden=8, n_layers=2),
        image_shape=(channels, size, size),
        **kw,
    )


def _images(n=32, seed=0) -> torch.Tensor:
    data = SyntheticDataModule(image_size=16, channels=1, num_classes=4, seed=seed)
    return data.load_split("val").tensors[0][:n].float() / 127.5 - 1


def _loader(x: torch.Tensor, batch_size=8) -> DataLoader:
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size)


class _Record(L.Callback):
    """Per global step: the training step's outputs and a copy of the discriminator weights."""

    def __init__(self):
        self.outputs, self.disc = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.outputs.append({k: float(v) for k, v in outputs.items()})
        self.disc.append([p.detach().clone() for p in module.discriminator.parameters()])


def _fit(module, x, steps, callbacks=()) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=list(callbacks),
    )  # fmt: skip
    trainer.fit(module, _loader(x))
    return trainer


@pytest.mark.parametrize(("size", "latent"), [(28, 7), (32, 8), (64, 16), (13, 4)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_ranges_factor_4(size, latent, channels):
    module = _module(channels, size)
    x = torch.rand(2, channels, size, size) * 2 - 1
    mean, logvar = module.encode_posterior(x)
    assert mean.shape == logvar.shape == (2, 3, latent, latent)
    assert module.latent_shape == (3, latent, latent)
    assert module.encode(x).shape == mean.shape
    z = module.encode(x, torch.Generator().manual_seed(0), sample=True)
    assert z.shape == mean.shape and not torch.equal(z, mean)
    again = module.encode(x, torch.Generator().manual_seed(0), sample=True)
    assert torch.equal(z, again)
    images = module.decode(3 * torch.randn_like(mean))
    assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    recon = module.reconstruct(x)
    assert recon.shape == x.shape and recon.min() >= -1 and recon.max() <= 1
    assert isinstance(module, Reconstructing) and not isinstance(module, Generative)


def test_factor_8_and_the_decoder_is_differentiable():
    module = _module(1, 28, mult=(1, 2, 2, 2))
    assert module.encoder.downsample == 3 and module.latent_shape == (3, 4, 4)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    module.decode(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    logvar = module.encode_posterior(1e4 * torch.randn(2, 1, 28, 28))[1]
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_bad_configuration_is_one_clear_error():
    with pytest.raises(ValueError, match="latent_channels"):
        KLEncoder(1, latent_channels=0)
    with pytest.raises(ConfigError, match="recon"):
        _module(recon="l3")
    with pytest.raises(ConfigError, match="feature_extractor"):
        _module(feature_weight=1.0)


def test_kl_equals_its_closed_form():
    module = _module()
    x = _images(4)
    mean, logvar = module.encode_posterior(x)
    mu, lv = mean.double(), logvar.double()
    closed = 0.5 * (mu**2 + lv.exp() - 1 - lv).sum((1, 2, 3))
    torch.testing.assert_close(gaussian_kl(mean, logvar).double(), closed, rtol=1e-5, atol=1e-5)
    out = module.decoder(mean)
    l1 = (out - x).abs().sum((1, 2, 3))
    torch.testing.assert_close(module.recon_loss(x, out), l1)


def test_discriminator_is_off_before_disc_start_and_on_from_it():
    module = _module(disc_weight=0.5, disc_start=3)
    record = _Record()
    _fit(module, _images(32), 6, [record])
    on = ["train/g_adv" in out for out in record.outputs]
    assert on == [False, False, False, True, True, True]  # global steps 0..5
    assert all("train/disc" in out for out, o in zip(record.outputs, on, strict=True) if o)
    unchanged = [
        all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        for before, after in zip(record.disc, record.disc[1:], strict=False)
    ]
    assert unchanged == [True, True, False, False, False]  # the step at 3 is the first change
    assert module.global_step == 6  # discriminator steps are not counted


def test_disc_weight_zero_never_trains_the_discriminator():
    module = _module(disc_weight=0.0, disc_start=0)
    start = [p.detach().clone() for p in module.discriminator.parameters()]
    record = _Record()
    _fit(module, _images(16), 3, [record])
    assert not any("train/g_adv" in out for out in record.outputs)
    assert all(torch.equal(a, b) for a, b in zip(start, module.discriminator.parameters()))


def test_latent_scale_is_one_over_the_std_of_the_validation_posterior_means():
    module = _module()
    x = _images(30)
    assert float(module.latent_scale) == 1.0 and int(module.latent_scale_step) == -1
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.validate(module, _loader(x, batch_size=8))  # 4 batches, the last one short
    with torch.no_grad():
        std = module.encode(x).double().std()
    torch.testing.assert_close(module.latent_scale.double(), 1 / std, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        trainer.callback_metrics["val/latent_std"].double(), std, rtol=1e-5, atol=0
    )
    assert "latent_scale" in module.state_dict() and int(module.latent_scale_step) == 0
    measured = module.measure_latent_scale(_loader(x, batch_size=16))  # the same, by hand
    assert measured == pytest.approx(float(1 / std), rel=1e-5)
    for key in ("val/loss", "val/recon", "val/kl", "val/psnr", "val/ssim"):
        assert torch.isfinite(trainer.callback_metrics[key]), key


def test_a_few_steps_make_the_reconstruction_loss_go_down():
    module = _module(gradient_clip_val=10.0)
    x = _images(32)
    with torch.no_grad():
        before = module.recon_loss(x, module.decoder(module.encode(x))).mean()
    _fit(module, x, 40)
    with torch.no_grad():
        after = module.recon_loss(x, module.decoder(module.encode(x))).mean()
    assert after < 0.7 * before


def test_feature_matching_is_zero_for_identical_images_and_positive_otherwise():
    module = _module(feature_weight=1.0, feature_extractor="digits")
    x = _images(4)
    assert module.feature_loss(x, x.clone()) == 0
    assert module.feature_loss(x, x.flip(-1)) > 0
    assert not any(k.startswith("_features") for k in module.state_dict())
    record = _Record()
    _fit(module, x, 2, [record])
    assert all(out["train/feature"] > 0 for out in record.outputs)


def test_psnr_and_ssim_on_images_in_unit_range():
    x = _images(4)
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    mse = ((noisy - x) / 2).pow(2).mean((1, 2, 3))  # in [0, 1] units
    torch.testing.assert_close(psnr(x, noisy), (10 * torch.log10(1 / mse)).mean())
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, noisy) < 1


def test_preset_stop_and_resume_with_the_discriminator_matches_an_uninterrupted_run(
    tiny_cfg, tmp_path
):
    common = [
        "model=autoencoder",
        "model.disc_weight=0.5",
        "model.disc_start=2",
        "metrics.at_end=false",
        "data.num_samples=64",
        "data.batch_size=8",
        "callbacks.last_checkpoint.every_n_train_steps=3",
        "callbacks.periodic_checkpoint.every_n_train_steps=1000",
        "~callbacks.sample_grid",
    ]

    def run(sub, steps, ckpt=None):
        cfg = tiny_cfg(*common, f"trainer.max_steps={steps}")
        cfg.paths.output_dir = str(tmp_path / sub)
        cfg.ckpt_path = ckpt
        train(cfg)
        return load_model(tmp_path / sub, "last")[0]

    straight = run("straight", 5)
    run("first", 3)
    resumed = run("resumed", 5, str(tmp_path / "first/checkpoints/last.ckpt"))
    assert logged(tmp_path / "straight", "train/g_adv")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.describe()["autoencoder"]["latent_shape"] == [4, 4, 4]
