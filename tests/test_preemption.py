"""Preemption (issue 18, item 8): SIGTERM and Ctrl-C write last.ckpt at the step where the run
stopped, record it as interrupted, exit non-zero, and the same command resumes it exactly; a
signal during a long sample grid or evaluation is honoured at once; an evaluation the signal
interrupted is run again on resume, evaluations.jsonl holds each step once, and nothing the
evaluation does draws from the training RNG (issue 18, items 4 and 5)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import genlab.train as train_module
from genlab.callbacks import preemption
from genlab.callbacks.periodic import PeriodicCallback
from genlab.runs import load_model
from genlab.train import train

from .conftest import REPO

COMMON = [
    "data.num_samples=64",
    "data.batch_size=16",
    "~callbacks.sample_grid",
    "callbacks.last_checkpoint.every_n_train_steps=1000",
    "trainer.val_check_interval=3",
    "callbacks.periodic_checkpoint.every_n_train_steps=1000",
    "model.net.dropout=0.1",
]


class SendSignal(PeriodicCallback):
    """At step ``at`` sends ``signum`` to this process, then (``stall_s``) keeps running like a
    long sample grid would, recording whether it ran to the end."""

    def __init__(self, at: int, signum: int, stall_s: float = 0.0):
        super().__init__(every_n_steps=at, at_end=False)
        self.signum, self.stall_s = signum, stall_s
        self.fired_at, self.finished = None, False

    def fire(self, trainer, pl_module):
        if self.fired_at is not None:
            return
        self.fired_at = trainer.global_step
        os.kill(os.getpid(), self.signum)
        end = time.monotonic() + self.stall_s
        while time.monotonic() < end:
            time.sleep(0.05)
        self.finished = True


@pytest.fixture
def with_callback(monkeypatch):
    """Adds a callback to what train() builds."""

    def add(cb):
        build = train_module.build_callbacks
        monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [*build(cfg), cb])
        return cb

    return add


def _evaluated(run) -> list[dict]:
    return [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]


def _ckpt_step(run) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_writes_last_ckpt_and_the_same_command_resumes_exactly(
    tiny_cfg, tmp_path, with_callback, signum, code
):
    """A signal at step 5 (no periodic checkpoint before it): last.ckpt at step 5, status
    interrupted, exit 128 + signum; train() again on the same config and directory resumes
    from it and ends with the weights of an uninterrupted 10-step run."""
    sender = with_callback(SendSignal(at=5, signum=signum))
    cfg = tiny_cfg(*COMMON, "trainer.max_steps=10")
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train(cfg)
    assert stop.value.code == code
    assert signal.getsignal(signum) is not None  # handlers restored
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    assert summary["global_step"] == 5 == sender.fired_at == _ckpt_step(run)
    assert signal.Signals(signum).name in summary["error"] and "last.ckpt" in summary["error"]

    sender.fired_at = -1  # the same command again: no signal this time
    resumed = train(tiny_cfg(*COMMON, "trainer.max_steps=10"))
    assert resumed["status"] == "completed" and resumed["global_step"] == 10
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert (run / "checkpoints" / "best.ckpt").is_file()  # overwritten, no stale best-v1
    assert not list((run / "checkpoints").glob("best-v*.ckpt"))

    straight_cfg = tiny_cfg(*COMMON, "trainer.max_steps=10")
    straight_cfg.paths.output_dir = str(tmp_path / "straight")
    train(straight_cfg)
    a, _, _ = load_model(run, "last")
    b, _, _ = load_model(tmp_path / "straight", "last")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_a_signal_during_a_long_grid_stops_it_at_once(tiny_cfg, tmp_path, with_callback):
    """SIGTERM while a periodic callback (the base of sample grids and evaluations) would run
    for another 120 s: it ends within the callback, last.ckpt is written at that step."""
    stall = with_callback(SendSignal(at=4, signum=signal.SIGTERM, stall_s=120))
    t = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        train(tiny_cfg(*COMMON, "trainer.max_steps=50"))
    assert stop.value.code == 143
    assert not stall.finished and time.monotonic() - t < 120
    run = tmp_path / "run"
    assert _ckpt_step(run) == 4
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_143_with_a_checkpoint(tmp_path):
    """What a scheduler does: SIGTERM to `python -m genlab`; the process exits 143 and leaves a
    last.ckpt at the step it reached, though periodic checkpoints are far apart."""

    run = tmp_path / "cli"
    args = ["data=synthetic", "trainer=cpu", "logger=none", "trainer.max_steps=100000",
            "metrics=none", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "callbacks.sample_grid.every_n_steps=3", "callbacks.sample_grid.num_samples=4",
            "callbacks.last_checkpoint.every_n_train_steps=100000",
            "trainer.val_check_interval=1000", f"hydra.run.dir={run}"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "genlab", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not list(run.glob("samples/step_*.png")):  # training is under way
            assert proc.poll() is None and time.time() < deadline, "no sample grid written"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert _ckpt_step(run) == summary["global_step"] >= 3


# 9, the final evaluation, where the resumed fit loop has nothing left to do: slow
@pytest.mark.parametrize("at", [6, pytest.param(9, marks=pytest.mark.slow)])
def test_an_interrupted_evaluation_is_redone_and_the_resumed_run_equals_a_straight_one(
    tiny_cfg, tmp_path, monkeypatch, at
):
    """Evaluation every 3 of 9 steps, dropout on (training draws from the RNG). SIGTERM at step
    ``at`` before that step's evaluation ran (at 9: the final one, where the resumed fit loop
    has nothing left to do); the resumed run evaluates that step, ends with each step in
    evaluations.jsonl once (a row left from steps the resume trains again, and a line a kill
    cut short, are replaced), and its weights and every evaluation equal an uninterrupted
    run's: building the digit extractor in the new process took nothing from the training
    RNG."""
    sender = SendSignal(at=at, signum=signal.SIGTERM)
    build = train_module.build_callbacks  # first in the list: before evaluation and last.ckpt
    monkeypatch.setattr(train_module, "build_callbacks", lambda cfg: [sender, *build(cfg)])
    args = (*COMMON, "metrics.every_n_steps=3", "trainer.max_steps=9")
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        train(tiny_cfg(*args))
    assert _ckpt_step(run) == at
    assert [row["step"] for row in _evaluated(run)] == [3, 6][: at // 3 - 1]
    if at == 6:  # as a kill after step 9's evaluation, before its checkpoint, would leave it
        with open(run / "evaluations.jsonl", "a") as f:
            f.write(json.dumps({"step": 9, "metrics": {"val/fd_digits": -1.0}}) + "\n")
            f.write('{"step": 9, "metri')

    sender.fired_at = -1
    resumed = train(tiny_cfg(*args))
    straight_cfg = tiny_cfg(*args)
    straight_cfg.paths.output_dir = str(tmp_path / "straight")
    straight = train(straight_cfg)

    rows, reference = _evaluated(run), _evaluated(tmp_path / "straight")
    assert [row["step"] for row in rows] == [row["step"] for row in reference] == [3, 6, 9]
    for row, ref in zip(rows, reference):
        assert row["metrics"]["val/fd_digits"] == pytest.approx(
            ref["metrics"]["val/fd_digits"], rel=1e-5
        ), row["step"]
    for summary in (resumed, straight):
        assert summary["status"] == "completed" and summary["evaluation"]["step"] == 9
    assert resumed["metrics"]["val/fd_digits"] == pytest.approx(
        straight["metrics"]["val/fd_digits"], rel=1e-5
    )
    a, _, _ = load_model(run, "last")
    b, _, _ = load_model(tmp_path / "straight", "last")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_slurms_requeue_signal_checkpoints_then_hands_over_to_submitit(
    tiny_cfg, tmp_path, with_callback
):
    """Under submitit, SIGUSR2 (SLURM's warning before the time limit) is bound to submitit's
    requeue handler, which requeues and exits at once. genlab stops at the step first
    (last.ckpt, status interrupted), then calls that handler; the requeued job (the same
    command and directory) resumes from last.ckpt."""
    calls = []

    def submitit_like(signum, frame):  # what submitit does: requeue, then exit
        calls.append((signum, _ckpt_step(tmp_path / "run")))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with_callback(SendSignal(at=5, signum=signal.SIGUSR2))
        with pytest.raises(SystemExit) as stop:
            train(tiny_cfg(*COMMON, "trainer.max_steps=10"))
        assert stop.value.code == -1  # submitit's exit, after the checkpoint
        assert calls == [(signal.SIGUSR2, 5)]
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # restored
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["global_step"] == 5
        assert "SIGUSR2" in summary["error"]
    finally:
        signal.signal(signal.SIGUSR2, previous)
    resumed = train(tiny_cfg(*COMMON, "trainer.max_steps=10"))  # the requeued job
    assert resumed["status"] == "completed" and resumed["global_step"] == 10
    assert resumed["resumed_from"].endswith("last.ckpt")


def test_without_a_requeue_handler_sigusr2_is_left_alone(tiny_cfg, monkeypatch):
    """No scheduler bound SIGUSR2: genlab does not take it over."""
    seen = {}
    original = preemption.preemptible

    def spy(trainer):
        cm = original(trainer)

        class Wrapped:
            def __enter__(self):
                cm.__enter__()
                seen["usr2"] = signal.getsignal(signal.SIGUSR2)

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(preemption, "preemptible", spy)
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    train(tiny_cfg("trainer.max_steps=2"))
    assert seen["usr2"] == signal.SIG_DFL
