"""Every user error of `python -m genlab` is one line on the console, printed before W&B, the
trainer or a download starts, with the exit status 1 and a traceback only under
HYDRA_FULL_ERROR=1 (issue 18, item 12; the table in docs/configuration.md). The commands run
through the real CLI, forked from one process (conftest.run_cli_jobs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from genlab.metrics import clip_loader
from genlab.metrics.common import WeightsNotFoundError

from .conftest import TINY, run_cli_jobs

# the tiny run with W&B on (offline): an error before it starts leaves no wandb/ folder
BASE = [o for o in TINY if not o.startswith("logger")] + ["logger=wandb"]


class Payload:
    """Unpickling this runs a shell command: the file a crafted "checkpoint" would be."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def files(root: Path) -> dict[str, Path]:
    """A truncated real checkpoint and a pickle payload, made by torch.save."""
    root.mkdir(parents=True, exist_ok=True)
    good = root / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}, "global_step": 3}, good)
    truncated = root / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    payload = root / "payload.ckpt"
    torch.save({"state_dict": {}, "extra": Payload(root / "pwned")}, payload)
    return {"truncated": truncated, "payload": payload, "missing": root / "nowhere.ckpt"}


# (id, overrides, environment, what the one line says)
CASES = [
    ("missing-folder", ["data=folder", "data.root={tmp}/no_such_dir"], {}, "not found"),
    (
        "missing-mnist",
        ["data=mnist", "data.root={tmp}/empty", "data.download=false"],
        {},
        "MNIST not found: expected {tmp}/empty/MNIST/raw/",
    ),
    (
        "missing-checkpoint",
        ["ckpt_path={tmp}/files/nowhere.ckpt"],
        {},
        "checkpoint {tmp}/files/nowhere.ckpt not found: resume from another",
    ),
    (
        "truncated-checkpoint",
        ["ckpt_path={tmp}/files/truncated.ckpt"],
        {},
        "checkpoint {tmp}/files/truncated.ckpt cannot be loaded (truncated or corrupt",
    ),
    (
        "payload-checkpoint",
        ["ckpt_path={tmp}/files/payload.ckpt"],
        {},
        "checkpoint {tmp}/files/payload.ckpt cannot be loaded (refused: it holds pickled",
    ),
    ("batch-size", ["data.batch_size=0"], {}, "data.batch_size must be a positive integer, got 0"),
    ("num-classes", ["model.num_classes=3"], {}, "model.num_classes=3 but the data has 4 classes"),
    ("trainer-type", ["trainer.max_steps=abc"], {}, "trainer.max_steps must be an integer"),
    ("profile", ["profile=fast"], {}, "profile=fast is not one of auto, cpu, gpu, off"),
    (
        "guidance-cfg-on-gan",
        ["model=gan", "guidance=cfg"],
        {},
        "guidance=cfg needs a diffusion model; GANModule has no denoiser",
    ),
    (
        "clip-offline",
        [
            "guidance=clip",
            "guidance.model=ViT-B-32",
            "guidance.pretrained=openai",
            "guidance.prompts=[a cat]",
            "paths.cache_dir={tmp}/cache",
        ],
        {"HF_HUB_OFFLINE": "1"},  # never a download from a test, even on a machine online
        "CLIP weights ViT-B-32/openai could not be downloaded (HF_HUB_OFFLINE is set",
    ),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    files(tmp / "files")
    (tmp / "empty").mkdir()
    jobs = []
    for name, overrides, env, _ in CASES:
        args = [*BASE, *(o.format(tmp=tmp) for o in overrides), f"hydra.run.dir={tmp / name}"]
        jobs.append(("genlab", args, env))
    # the same bad checkpoint with HYDRA_FULL_ERROR=1: the traceback is there
    full = [*BASE, f"ckpt_path={tmp}/files/truncated.ckpt", f"hydra.run.dir={tmp / 'full'}"]
    jobs.append(("genlab", full, {"HYDRA_FULL_ERROR": "1"}))
    results = run_cli_jobs(jobs, tmp / "jobs", cwd=tmp, timeout=600)
    return tmp, dict(zip([c[0] for c in CASES] + ["full"], results))


def console_errors(result: dict) -> list[str]:
    """Console lines that are not log records, warnings or Lightning's notices."""
    lines = (result["out"] + result["err"]).splitlines()
    noise = re.compile(r"^\[\d{4}-\d\d-\d\d .*\]\[.*\]\[(INFO|WARNING)\]|^Seed set to|^\s*$")
    return [line for line in lines if not noise.search(line)]


@pytest.mark.parametrize("name, says", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_before_anything_starts(outcomes, name, says):
    tmp, results = outcomes
    result = results[name]
    errors = console_errors(result)
    assert result["rc"] == 1, result
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert says.format(tmp=tmp) in errors[0], errors[0]
    run = tmp / name
    assert not (run / "wandb").exists(), "W&B started before the error"
    assert not (run / "checkpoints").exists()
    if name != "profile":  # (refused before a run begins)
        # train.log keeps the reason: a failed run's log is never empty
        assert says.format(tmp=tmp) in (run / "train.log").read_text()


def test_a_pickle_payload_checkpoint_runs_nothing(outcomes):
    tmp, _ = outcomes
    assert not (tmp / "files" / "pwned").exists()


def test_hydra_full_error_keeps_the_traceback(outcomes):
    _, results = outcomes
    text = results["full"]["out"] + results["full"]["err"]
    assert results["full"]["rc"] == 1
    assert "Traceback (most recent call last)" in text and "CheckpointError" in text


def test_clip_offline_fails_at_once_without_hub_retries(monkeypatch, tmp_path):
    """With huggingface.co unreachable (and HF_HUB_OFFLINE unset), open_clip's download runs in
    huggingface_hub's offline mode (the cache or nothing, no 45 s of retries) and the error
    names the URL and the key to set."""
    monkeypatch.setattr(clip_loader.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(clip_loader, "reachable", lambda host, **kw: host != "huggingface.co")
    seen = []

    def download(cfg, cache_dir=None):
        seen.append(clip_loader.hub_constants.HF_HUB_OFFLINE)
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr(clip_loader.open_clip.pretrained, "download_pretrained", download)
    with pytest.raises(WeightsNotFoundError) as err:
        clip_loader.load_clip("ViT-B-32", "openai", cache_dir=str(tmp_path), key="guidance")
    assert seen == [True] and clip_loader.hub_constants.HF_HUB_OFFLINE is False
    message = str(err.value)
    assert "huggingface.co cannot be reached and the file is not in the Hugging Face" in message
    assert "guidance.model=ViT-B-32-quickgelu guidance.pretrained=<path" in message


def test_reachable_is_false_for_a_closed_port():
    assert not clip_loader.reachable("127.0.0.1", port=1, timeout=1.0)
