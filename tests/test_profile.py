"""Defaults that fit the machine (issue 18, item 13): without a GPU the command line's defaults
become a CPU budget, with one the GPU preset; every override, a chosen trainer and an
experiment preset win; the saved config holds what applied."""

import pytest
import torch
from omegaconf import OmegaConf

from genlab import profile

from .conftest import compose_cfg


def _apply(overrides: list[str], gpu: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    cfg = compose_cfg(overrides)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return cfg, profile.apply(cfg, overrides, choices)


def test_no_gpu_means_minutes_the_cpu_protocol_and_an_early_grid(monkeypatch):
    cfg, applied = _apply([], gpu=False, monkeypatch=monkeypatch)
    assert cfg.profile == "cpu" and cfg.trainer.max_time == profile.CPU_TIME
    assert cfg.metrics.num_samples == 1000 and list(cfg.metrics.extractors) == ["digits", "faces"]
    assert cfg.callbacks.sample_grid.every_n_steps == 100
    assert f"trainer.max_time={profile.CPU_TIME}" in applied
    assert "metrics.num_samples=1000" in applied
    line = profile.describe(cfg.profile, applied)
    assert line.startswith("no GPU found: profile=cpu sets") and "profile=off" in line


def test_overrides_a_chosen_trainer_and_experiments_win(monkeypatch):
    cfg, applied = _apply(["trainer.max_steps=300", "metrics.num_samples=64"], False, monkeypatch)
    assert cfg.trainer.max_time is None and cfg.trainer.max_steps == 300
    assert cfg.metrics.num_samples == 64 and list(cfg.metrics.extractors) == ["digits", "faces"]
    assert not any(a.startswith("trainer.") for a in applied)

    cfg, applied = _apply(["trainer=cpu", "metrics=default"], False, monkeypatch)
    assert cfg.trainer.max_time is None and cfg.metrics.num_samples == 5000
    assert applied == ["callbacks.sample_grid.every_n_steps=100"]

    cfg, applied = _apply(["experiment=mnist_ddpm_cpu"], False, monkeypatch)
    assert applied == [] and cfg.profile == "off"

    cfg, applied = _apply(["profile=off"], False, monkeypatch)
    assert applied == [] and cfg.trainer.max_steps == 20000 and cfg.trainer.max_time is None


def test_a_gpu_means_the_gpu_trainer_preset(monkeypatch):
    cfg, applied = _apply([], gpu=True, monkeypatch=monkeypatch)
    assert cfg.profile == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.trainer.accelerator == "gpu" and cfg.metrics.num_samples == 5000
    assert "trainer.precision=bf16-mixed" in applied
    _, applied = _apply(["trainer=cpu"], gpu=True, monkeypatch=monkeypatch)
    assert applied == []
    cfg, _ = _apply(["profile=cpu"], gpu=True, monkeypatch=monkeypatch)
    assert cfg.trainer.max_time == profile.CPU_TIME  # forced


def test_an_unknown_profile_is_one_line(monkeypatch):
    with pytest.raises(ValueError, match="profile=fast is not one of auto, cpu, gpu, off"):
        _apply(["profile=fast"], gpu=False, monkeypatch=monkeypatch)


def test_the_saved_config_holds_what_applied(tmp_path, monkeypatch, caplog):
    """What sample, evaluate and a resume read is the config that trained."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg(["data=synthetic"], tmp_path / "run")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with caplog.at_level("INFO", logger="genlab"):
        profile.machine_defaults(cfg, ["data=synthetic"], choices)
    saved = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert saved.profile == "cpu" and saved.trainer.max_time == profile.CPU_TIME
    assert saved.metrics.num_samples == 1000 and "hydra" not in saved
    assert any("no GPU found" in r.getMessage() for r in caplog.records)
