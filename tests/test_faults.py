"""Faults and bad inputs around the run directory (issue 18): a run's records that cannot be
read make a failed run, not a crash; a directory that holds a run is never overwritten by a
run of another config; the data's location is part of a run's identity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from genlab import dashboard
from genlab.runs import load_run, read_summary, write_summary
from genlab.train import RunConflictError, config_hash, train

from .conftest import compose_cfg


def test_a_corrupt_summary_is_a_failed_run(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "summary.json").write_text('{"status": "completed", "metr')  # cut mid-write
    record = load_run(run, tmp_path)
    assert record["status"] == "failed" and "cannot be read" in record["error"]
    page = dashboard.build(tmp_path)  # the dashboard shows it instead of crashing
    assert "cannot be read" in page.read_text()
    write_summary(run, {"status": "running"})  # a new attempt replaces it, merges nothing
    assert read_summary(run) == {"status": "running"}
    (run / "summary.json").write_text("[1, 2]")
    assert read_summary(run)["status"] == "failed"


def test_a_run_directory_is_not_overwritten_by_another_config(tiny_cfg):
    first = tiny_cfg("~callbacks.sample_grid", "metrics.at_end=false")
    summary = train(first)
    run = first.paths.output_dir
    before = json.loads(open(f"{run}/summary.json").read())
    changed = tiny_cfg("~callbacks.sample_grid", "metrics.at_end=false", "trainer.max_steps=2")
    changed.paths.output_dir = run
    with pytest.raises(RunConflictError, match="holds a run of another config"):
        train(changed)
    assert json.loads(open(f"{run}/summary.json").read()) == before  # untouched
    assert before["global_step"] == summary["global_step"] == 4
    again = tiny_cfg("~callbacks.sample_grid", "metrics.at_end=false")  # the same config
    again.paths.output_dir = run
    assert train(again)["global_step"] == 4  # completed: skipped, as before


def test_the_data_location_is_part_of_a_runs_identity(tmp_path):
    a = compose_cfg([f"paths.data_dir={tmp_path / 'a'}"], tmp_path / "run")
    b = compose_cfg([f"paths.data_dir={tmp_path / 'b'}"], tmp_path / "run")
    c = compose_cfg([f"paths.data_dir={tmp_path / 'a'}", f"paths.cache_dir={tmp_path}"],
                    tmp_path / "other")  # fmt: skip
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(c)  # outputs and caches are not identity


def test_a_full_disk_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    import torch

    from genlab.runs import atomic_torch_save

    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match=f"no space left on {path.parent}"):
        atomic_torch_save({"step": 2, "big": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}  # the previous file, intact
    assert list(path.parent.glob(".*.tmp")) == []  # no leftover temporary


def test_checkpoints_get_the_usual_permissions_and_stale_temporaries_go(tiny_cfg):
    import os
    import stat

    cfg = tiny_cfg("~callbacks.sample_grid", "metrics.at_end=false", "trainer.max_steps=2")
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")  # a killed write
    train(cfg)
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((ckpts / "last.ckpt").stat().st_mode)
    assert mode == 0o666 & ~umask  # was 0600 (mkstemp's)
    assert not list(ckpts.glob(".*.tmp"))


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["model.num_classes=3"], "model.num_classes=3 but the data has 4 classes"),
        (["model.num_classes=4", "data.num_classes=0"], "has no labels (data.num_classes=0)"),
    ],
)
def test_a_conditional_model_that_does_not_match_the_data_is_refused_at_once(
    tiny_cfg, overrides, says
):
    """Before the trainer, a logger or a checkpoint exists (was: an IndexError in training, or
    silent training on label 0 for an unlabelled folder)."""
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ValueError) as err:
        train(cfg)
    message = str(err.value)
    assert says in message and "model.num_classes=${data.num_classes}" in message
    assert "\n" not in message
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.max_steps=abc", "trainer.max_steps must be an integer (or null), got 'abc'"),
        ("trainer.val_check_interval=often", "trainer.val_check_interval must be a number"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs must be an integer (or null), got 1.5"),
    ],
)
def test_a_trainer_key_of_the_wrong_type_names_the_key(tiny_cfg, override, says):
    """Was Lightning's "TypeError: '<' not supported ..." after the trainer started."""
    cfg = tiny_cfg(override)
    with pytest.raises(ValueError, match=re.escape(says)):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()
