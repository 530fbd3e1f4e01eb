"""Every option of every config group composes and instantiates; bad options fail clearly."""

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genlab.families.contract import Denoising, Latent, Likelihood, Reconstructing
from genlab.utils import CONF_DIR

from .conftest import compose_cfg, group_options, standalone_presets


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
@pytest.mark.parametrize("model", standalone_presets())
def test_model_options_instantiate_on_every_geometry(model, data, tmp_path):
    """Model configs interpolate the data geometry, so any model builds for any dataset; one
    cheap pass per capability checks the shapes (sampling at 64 px is slow). Presets with a
    required key (a finished run) are trained in test_train instead."""
    cfg = compose_cfg([f"model={model}", f"data={data}"], tmp_path)
    if cfg.model.get("num_classes", 0) and not cfg.data.num_classes:
        pytest.skip(f"{model} is class-conditional and {data} has no labels")
    module = instantiate(cfg.model)
    assert isinstance(module, L.LightningModule)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert tuple(module.image_shape) == shape
    x = torch.zeros(2, *shape)
    y = torch.zeros(2, dtype=torch.long) if module.num_classes else None
    checked = []
    if isinstance(module, Denoising):  # one denoiser call
        sigma = torch.full((2,), module.frame.sigma_max, dtype=torch.float64)
        assert module.denoiser(y)(x, sigma).shape == x.shape
        checked.append("denoising")
    if isinstance(module, Latent):  # one decoder / generator pass
        assert module.generate(module.latents(2), y).shape == x.shape
        checked.append("latent")
    if isinstance(module, Likelihood) and not isinstance(module, Denoising):  # one pass
        bpd = module.bits_per_dim(x, y)
        assert bpd.shape == (2,) and torch.isfinite(bpd).all()
        checked.append("likelihood")
    if isinstance(module, Reconstructing):  # encoders and decoders fit every geometry
        assert module.reconstruct(x, y).shape == x.shape
        checked.append("reconstructing")
    assert checked, f"{model}: no capability of the contract to check"


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
    """Every preset builds; a second stage (a latent model) leaves exactly its first stage's
    run required, which test_latent fills with a trained one."""
    cfg = compose_cfg([f"experiment={option}"], tmp_path)
    missing = [k for k in cfg.model if OmegaConf.is_missing(cfg.model, k)]
    if missing:
        assert missing == ["autoencoder_run"], missing
        with pytest.raises(Exception, match="autoencoder_run"):
            instantiate(cfg.model)
    else:
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


ROOTS = ("config", "sample", "evaluate", "dashboard", "reflow")  # the commands' root configs


def reached_by(path) -> tuple[str, list[str]]:
    """The composition that uses conf/<path>: (root config, overrides)."""
    rel = path.relative_to(CONF_DIR).with_suffix("")
    if len(rel.parts) == 1:  # a root; its required values given
        required = {"sample": ["run_dir=x"], "dashboard": ["dir=x"], "reflow": ["run_dir=x"]}
        return rel.name, required.get(rel.name, [])
    group, option = "/".join(rel.parts[:-1]), rel.parts[-1]
    if group == "hydra" and option == "tool":
        return "sample", ["run_dir=x"]
    return "config", [f"{group}={option}"]


def test_every_yaml_is_reachable():
    """Every YAML under conf/ is used by a composition: a root config of one of the commands,
    or an option of a group that one of them selects (its choice is what Hydra records)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    files = sorted(CONF_DIR.rglob("*.yaml"))
    assert len(files) > 40
    unreached = []
    for path in files:
        root, overrides = reached_by(path)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(root, overrides=overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        rel = path.relative_to(CONF_DIR).with_suffix("")
        if len(rel.parts) == 1:
            ok = root in ROOTS
        else:
            ok = choices.get("/".join(rel.parts[:-1])) == rel.parts[-1]
        if not ok:
            unreached.append(str(rel))
    GlobalHydra.instance().clear()
    assert not unreached, f"YAML no composition uses: {unreached}"


def test_compare_celeba_per_model_sizes_every_family_it_names(tmp_path):
    """per_model's keys exist in each preset: merged, every model builds at 64x64, larger."""
    from genlab.train import apply_per_model

    families = ("gan", "sngan", "vae", "pixelcnn", "gated_pixelcnn", "pixelcnn_pp", "diffusion")
    modern = ("r3gan", "hvae", "edm", "flow", "consistency")
    for model in families + modern:
        cfg = compose_cfg(["experiment=compare_celeba", f"model={model}"], tmp_path)
        sized = instantiate(apply_per_model(cfg).model)
        plain = instantiate(cfg.model)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert tuple(sized.image_shape) == (3, 64, 64)
        assert count(sized) > count(plain), model


def test_compare_latent_pairs_the_backbones_by_flops(tmp_path):
    """per_model.<model>/<net> sizes each backbone of compare_latent; the UNet and the DiT of
    each space are within 20% of each other in FLOPs per image, as the preset says."""
    from genlab.nets.flops import count_flops
    from genlab.train import apply_per_model

    flops = {}
    for model, shape in (("flow", (3, 64, 64)), ("latent_flow", (4, 16, 16))):
        for net in ("unet", "dit"):
            cfg = compose_cfg(
                ["experiment=compare_latent", f"model={model}", f"model/net={net}",
                 "autoencoder_run=/some/run"], tmp_path,
            )  # fmt: skip
            merged = apply_per_model(cfg).model
            assert merged.sampler.steps == 20
            if model == "latent_flow":
                assert merged.autoencoder_run == "/some/run"
            built = instantiate(merged.net)
            if not isinstance(built, torch.nn.Module):  # the latent models' partial
                built = built(in_channels=shape[0], image_size=shape[1])
            flops[model, net] = count_flops(built, torch.randn(1, *shape), torch.ones(1))
    for model in ("flow", "latent_flow"):
        ratio = flops[model, "dit"] / flops[model, "unet"]
        assert 0.8 < ratio < 1.2, (model, ratio)
    assert flops["flow", "unet"] > 10 * flops["latent_flow", "unet"]


def test_compare_mnist_gives_consistency_training_a_curriculum_under_its_time_budget(tmp_path):
    """compare_mnist trains by time (max_steps -1), where the consistency preset's curriculum
    length, ${trainer.max_steps}, would switch iCT's curriculum off: per_model sets it."""
    from genlab.train import apply_per_model

    cfg = compose_cfg(["experiment=compare_mnist", "model=consistency"], tmp_path)
    assert cfg.trainer.max_steps == -1 and cfg.model.curriculum_steps == -1
    model = instantiate(apply_per_model(cfg).model)
    assert model.curriculum_steps == 1000
    assert model.num_levels(0) < model.num_levels(999)
