"""Every option of every config group composes and instantiates; bad options fail clearly."""

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate

from genlab.families import AutoregressiveModule
from genlab.families.contract import Denoising, Generative, Reconstructing
from genlab.utils import CONF_DIR

from .conftest import TINY, compose_cfg, group_options


def test_defaults_are_diffusion_on_mnist(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.hydra.runtime.choices.model == "diffusion"
    assert cfg.hydra.runtime.choices.data == "mnist"
    for group in ("model", "data", "trainer", "guidance", "logger", "callbacks", "paths"):
        assert group in cfg.hydra.runtime.choices, group


@pytest.mark.parametrize("option", group_options("data"))
def test_data_options_instantiate(option, tmp_path):
    cfg = compose_cfg([f"data={option}", f"paths.data_dir={tmp_path}"], tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, L.LightningDataModule)
    assert dm.image_shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert cfg.data.num_classes >= 0


@pytest.mark.parametrize("data", ["synthetic", "mnist", "cifar10", "celeba"])
@pytest.mark.parametrize("model", sorted(set(group_options("model")) - {"vqvae_prior"}))
def test_model_options_instantiate_on_every_geometry(model, data, tmp_path):
    """Model configs interpolate the data geometry, so any model builds for any dataset."""
    cfg = compose_cfg([f"model={model}", f"data={data}"], tmp_path)
    if cfg.model.get("num_classes", 0) and not cfg.data.num_classes:
        pytest.skip(f"{model} is class-conditional and {data} has no labels")
    module = instantiate(cfg.model)
    assert isinstance(module, L.LightningModule)
    assert tuple(module.image_shape) == (
        cfg.data.channels,
        cfg.data.image_size,
        cfg.data.image_size,
    )
    x = torch.zeros(2, *module.image_shape)
    if isinstance(module, AutoregressiveModule):  # one likelihood pass (sampling is H*W*C)
        y = torch.zeros(2, dtype=torch.long) if module.num_classes else None
        bpd = module.bits_per_dim(x, y)
        assert bpd.shape == (2,) and torch.isfinite(bpd).all()
        out = module.net(x, y)
        out = out[:, 0] if module.net.output == "categorical" else out[:, : x.shape[1]]
    elif isinstance(module, Denoising):  # one denoiser call (sampling at 64 px is slow)
        out = module.denoiser()(x, torch.zeros(2, dtype=torch.long))
    elif isinstance(module, Generative):  # one-shot samplers (GANs, VAEs): the contract
        y = torch.zeros(2, dtype=torch.long) if module.num_classes else None
        out = module.sample(2, y=y)
    else:  # a VQ-VAE without a prior
        out = module.reconstruct(x)
    assert out.shape == x.shape
    if isinstance(module, Reconstructing):  # encoders and decoders fit every geometry
        y = torch.zeros(2, dtype=torch.long) if module.num_classes else None
        assert module.reconstruct(x, y).shape == x.shape


@pytest.mark.parametrize("option", group_options("trainer"))
def test_trainer_options_instantiate(option, tmp_path):
    cfg = compose_cfg([f"trainer={option}"], tmp_path)
    overrides = {}
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        overrides = {"accelerator": "cpu", "devices": 1}  # the preset's other settings stay
    if option == "ddp_cpu":
        assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp"
    trainer = instantiate(cfg.trainer, **overrides, enable_progress_bar=False, logger=False)
    assert isinstance(trainer, L.Trainer)
    assert str(trainer.precision) == str(cfg.trainer.precision)


@pytest.mark.parametrize("option", group_options("callbacks"))
def test_callbacks_options_instantiate(option, tmp_path):
    cfg = compose_cfg([f"callbacks={option}"], tmp_path)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert all(isinstance(c, L.Callback) for c in callbacks)
    if option == "default":
        assert {"periodic_checkpoint", "sample_grid", "progress_bar", "lr_monitor"} <= set(
            cfg.callbacks
        )


@pytest.mark.parametrize("option", group_options("metrics"))
def test_metrics_options_instantiate(option, tmp_path):
    from genlab.callbacks import Evaluation

    cfg = compose_cfg([f"metrics={option}"], tmp_path)
    node = cfg.callbacks.evaluation
    if option == "none":
        assert "_target_" not in node  # no evaluation callback
        return
    callback = instantiate(node)
    assert isinstance(callback, Evaluation)
    assert callback.evaluator.num_samples == cfg.metrics.num_samples > 0
    assert callback.evaluator.cache_dir is not None


@pytest.mark.parametrize("option", group_options("logger"))
def test_logger_options_instantiate(option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg([f"logger={option}"], tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    if option == "wandb":
        assert len(loggers) == 1 and cfg.logger.wandb.mode == "offline"
    else:
        assert loggers == []


@pytest.mark.parametrize("option", group_options("guidance"))
def test_guidance_options_compose(option, tmp_path):
    cfg = compose_cfg([f"guidance={option}"], tmp_path)
    assert cfg.guidance.name == option


@pytest.mark.parametrize("option", group_options("experiment"))
def test_experiment_presets_compose_and_build(option, tmp_path):
    cfg = compose_cfg([f"experiment={option}"], tmp_path)
    instantiate(cfg.model)
    instantiate(cfg.data)


def test_unknown_group_option_lists_the_choices(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["data=imagenet"], tmp_path)
    message = str(err.value)
    assert "imagenet" in message and "mnist" in message and "celeba" in message


def test_unknown_key_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["model.learning_rate=0.1"], tmp_path)
    assert "learning_rate" in str(err.value)


def test_every_yaml_is_reachable():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    assert {
        "model",
        "data",
        "trainer",
        "guidance",
        "logger",
        "callbacks",
        "paths",
        "experiment",
        "hydra",
    } <= groups
    assert TINY  # the tiny overrides used by the training tests compose


def test_compare_celeba_per_model_sizes_every_family_it_names(tmp_path):
    """per_model's keys exist in each preset: merged, every model builds at 64x64, larger."""
    from genlab.train import apply_per_model

    for model in ("gan", "sngan", "vae", "pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "diffusion"):
        cfg = compose_cfg(["experiment=compare_celeba", f"model={model}"], tmp_path)
        sized = instantiate(apply_per_model(cfg).model)
        plain = instantiate(cfg.model)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert tuple(sized.image_shape) == (3, 64, 64)
        assert count(sized) > count(plain), model
