"""Optimizer settings given on resume take effect (issue 18, item 9): a run resumed from a
checkpoint with a lower learning rate, a new weight decay or a new warm-up trains with them,
not with the checkpoint's; a diverged run's error gives the exact command that does so."""

import json
import logging
import shlex

import lightning as L
import pytest
import torch

import genlab.train as train_module
from genlab.families.common import DivergenceError
from genlab.families.optim_state import adopt_configured
from genlab.train import train

from .conftest import compose_cfg

FAST = ["~callbacks.sample_grid", "metrics.at_end=false"]


class RecordLR(L.Callback):
    """The optimizer's learning rate and weight decay at each step, before it is taken."""

    def __init__(self):
        self.seen: dict[int, tuple[float, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        self.seen[trainer.global_step] = (group["lr"], group["weight_decay"])


@pytest.fixture
def record(monkeypatch):
    cb = RecordLR()
    build = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build(cfg), cb])
    return cb


def test_lr_weight_decay_and_warmup_given_on_resume_take_effect(tiny_cfg, tmp_path, record):
    """4 steps at lr 1e-3 and warm-up 8, resumed to 8 with lr 2.5e-4, weight decay 0.1 and
    warm-up 4: from step 4 on, the rates and weight decay equal those of a run trained with
    the new settings from the start (the schedule's position kept)."""
    train(tiny_cfg(*FAST, "model.lr_scheduler.warmup_steps=8", "trainer.max_steps=4"))
    assert record.seen[3][0] == pytest.approx(1e-3 * 4 / 8)
    new = ["model.optimizer.lr=2.5e-4", "model.optimizer.weight_decay=0.1",
           "model.lr_scheduler.warmup_steps=4"]  # fmt: skip
    resumed = tiny_cfg(*FAST, *new, "trainer.max_steps=8")
    resumed.ckpt_path = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    resumed.paths.output_dir = str(tmp_path / "resumed")
    record.seen.clear()
    train(resumed)
    after = dict(record.seen)

    reference = tiny_cfg(*FAST, *new, "trainer.max_steps=8")
    reference.paths.output_dir = str(tmp_path / "reference")
    record.seen.clear()
    train(reference)
    assert sorted(after) == [4, 5, 6, 7]
    for step in after:
        assert after[step] == pytest.approx(record.seen[step]), step
    assert after[4] == pytest.approx((2.5e-4, 0.1))  # warm-up 4 is over at step 4


def test_an_unchanged_config_changes_nothing_on_resume(tiny_cfg, tmp_path):
    """adopt_configured on a restored trainer whose config did not change reports nothing."""
    cfg = tiny_cfg(*FAST, "trainer.max_steps=2")
    train(cfg)
    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["changes"] = adopt_configured(pl_module)

    resumed = tiny_cfg(*FAST, "trainer.max_steps=3")
    resumed.ckpt_path = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    resumed.paths.output_dir = str(tmp_path / "resumed")
    build = train_module.build_callbacks
    train_module.build_callbacks = lambda c: [*build(c), Probe()]
    try:
        train(resumed)
    finally:
        train_module.build_callbacks = build
    assert seen["changes"] == []


class PoisonAt(L.Callback):
    """Makes the network's weights NaN before step ``at``: the loss diverges there."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_a_diverged_run_names_the_command_that_resumes_it_with_a_lower_lr(
    tiny_cfg, tmp_path, monkeypatch
):
    """NaN loss at step 3: the error (raised and in summary.json) gives a command with the
    run's overrides, model.optimizer.lr at a quarter and ckpt_path=<run>/checkpoints/last.ckpt;
    that command trains on from step 2 with lr 2.5e-4. The error is logged (train.log)."""
    build = train_module.build_callbacks
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build(cfg), PoisonAt(3)])
    overrides = [*FAST, "trainer.max_steps=6", "model.lr_scheduler.warmup_steps=0"]
    job_log = logging.FileHandler(tmp_path / "train.log")  # what Hydra installs for a job
    logging.getLogger().addHandler(job_log)
    try:
        with pytest.raises(DivergenceError) as err:
            train(tiny_cfg(*overrides))
    finally:
        logging.getLogger().removeHandler(job_log)
        job_log.close()
    message = str(err.value)
    run = tmp_path / "run"
    assert "at step 3" in message and "model.optimizer.lr=0.00025" in message, message
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in message
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and message in summary["error"]
    logged = (tmp_path / "train.log").read_text()
    assert " ".join(message.split()) in logged  # train.log gets it, not only stderr

    monkeypatch.setattr(train_module, "build_callbacks", build)
    command = message.split("python -m genlab ", 1)[1].split(" (or clip", 1)[0]
    cfg = compose_cfg(shlex.split(command), tmp_path / "again")
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["resumed_from"].endswith("last.ckpt")
    model = torch.load(tmp_path / "again" / "checkpoints" / "last.ckpt", weights_only=True)
    assert model["global_step"] == 6
    assert model["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2.5e-4)
