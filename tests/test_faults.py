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


def test_wandb_online_without_a_network_logs_offline_with_one_warning(tmp_path):
    """W&B set online with its server unreachable (here a closed local port, refused at once;
    a dropped connection waits the 3 s probe at most): the run logs offline and says so once,
    instead of waiting for wandb's online retries (minutes) before it starts."""
    import socket

    from .conftest import REPO, TINY, run_cli

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    plain = [x for x in TINY if not x.startswith("metrics") and x != "logger=none"]
    env = {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{port}",
           "WANDB_API_KEY": "x" * 40}  # fmt: skip
    proc = run_cli(["model=diffusion", *plain, "metrics=none", "logger=wandb",
                    "model.sampler.steps=2", f"hydra.run.dir={run}"], cwd=REPO, env=env,
                   timeout=300)  # fmt: skip
    said = (proc.stdout + proc.stderr).count("W&B is set online but 127.0.0.1")
    assert said == 1, proc.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert list((run / "wandb").glob("offline-run-*")), sorted(p.name for p in run.rglob("*"))


def test_the_wandb_probe_sees_a_listening_server(monkeypatch):
    import socket

    from genlab.utils import wandb_unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert wandb_unreachable(timeout=2) is None
    assert wandb_unreachable(timeout=2) == f"127.0.0.1:{port} cannot be reached within 2 s"


# A genlab process whose checkpoint writes stall halfway (the kill -9 below then lands inside
# a write for certain): the first half of the bytes goes to the temporary file, a marker file
# says so, and the write waits before it finishes.
SLOW_WRITE = r"""
import io, runpy, sys, time
from pathlib import Path
import torch
import genlab.callbacks.checkpoint as ckpt
from genlab.runs import atomic_file

MARKER = Path(sys.argv[1])

def stalled(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    with atomic_file(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        MARKER.touch()
        time.sleep(60)
        f.write(data[len(data) // 2 :])
    return Path(path)

ckpt.atomic_torch_save = stalled
sys.argv = ["genlab", *sys.argv[2:]]
runpy.run_module("genlab", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow  # five processes killed or run to the end (about 90 s)
def test_kill_9_at_random_moments_and_mid_write_loses_nothing(tmp_path):
    """The same command in the same run directory, killed with SIGKILL three times at random
    moments and once inside a checkpoint write, then run to the end: the run completes, no
    temporary file is left, metrics.csv holds every step once, and the weights equal an
    uninterrupted run's."""
    import csv
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import torch

    from genlab.runs import load_model

    from .conftest import REPO, TINY, run_cli

    plain = [x for x in TINY if not x.startswith(("metrics", "trainer.max_steps", "callbacks."))]
    args = ["model=diffusion", *plain, "metrics=none", "~callbacks.sample_grid",
            "trainer.max_steps=400", "callbacks.last_checkpoint.every_n_train_steps=2",
            "callbacks.periodic_checkpoint.every_n_train_steps=1000",
            "model.net.dropout=0.0", "trainer.val_check_interval=1000"]  # fmt: skip
    run, straight = tmp_path / "run", tmp_path / "straight"
    last = run / "checkpoints" / "last.ckpt"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(18)

    def start(*prefix):
        cmd = [sys.executable, *prefix, *args, f"hydra.run.dir={run}"]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip

    def step_of_last() -> int:
        return torch.load(last, weights_only=True)["global_step"] if last.exists() else -1

    def wait_for(cond, proc, what):
        deadline = time.time() + 300
        while not cond():
            assert proc.poll() is None, f"the run ended before {what}"
            assert time.time() < deadline, f"no {what} in 300 s"
            time.sleep(0.1)

    kills = []
    for target in sorted(rng.sample(range(20, 300), 3)):  # at random moments of the run
        proc = start("-m", "genlab")
        wait_for(lambda t=target: step_of_last() >= t, proc, f"step {target}")
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere between two checkpoints, or inside one
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(step_of_last())
    marker = tmp_path / "writing"
    proc = start("-c", SLOW_WRITE, str(marker))
    wait_for(marker.exists, proc, "a checkpoint write")
    held = step_of_last()
    proc.send_signal(signal.SIGKILL)  # inside the write: half the bytes are in the .tmp file
    proc.wait()
    assert step_of_last() == held  # the old last.ckpt is whole
    assert list(run.glob("checkpoints/.*.tmp"))  # the interrupted write's leftover
    assert kills == sorted(kills) and kills[-1] < 400, kills

    run_cli([*args, f"hydra.run.dir={run}"], cwd=REPO)  # the same command, to the end
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 400
    assert not list(run.rglob("*.tmp"))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 400, steps[:50]

    run_cli([*args, f"hydra.run.dir={straight}"], cwd=REPO)
    a, _, _ = load_model(run, "last")
    b, _, _ = load_model(straight, "last")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
