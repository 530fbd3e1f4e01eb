"""Reflow (python -m genlab.reflow): pairs drawn by the flow's own ODE, a 2-rectified flow
trained on them from the same weights, written as a run directory the other tools read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genlab.reflow import main as reflow_main
from genlab.runs import load_model
from genlab.sample import main as sample_main
from genlab.train import train
from genlab.utils import UsageError


def test_reflow_writes_a_run_that_samples(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model=flow")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    out = reflow_main([f"run_dir={run}", "n=16", "pair_steps=3", "batch_size=8", "max_steps=3",
                       f"out={tmp_path / 'rf'}"])  # fmt: skip
    pairs = torch.load(out / "pairs.pt", weights_only=True)
    assert pairs["x"].shape == pairs["z"].shape == (16, *load_model(run).model.image_shape)
    # each pair is the 1-rectified flow's ODE from that noise: redraw it from the saved z
    teacher = load_model(run).model
    denoise = teacher.denoiser(None, use_ema=True)
    z = pairs["z"][:4] / teacher.frame.t_max
    redrawn = teacher.sampler(denoise, z, teacher.frame, steps=3)
    torch.testing.assert_close(redrawn.clamp(-1, 1), pairs["x"][:4], atol=1e-5, rtol=0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 3
    assert summary["protocol"]["reflow"]["pairs"] == 16
    student = load_model(out).model
    changed = [not torch.equal(a, b) for a, b in zip(student.net.parameters(),
                                                    teacher.ema.module.parameters())]  # fmt: skip
    assert any(changed), "the 2-rectified flow trained"
    got = sample_main([f"run_dir={out}", "n=4", "steps=1", f"out={tmp_path / 's'}"])
    assert got["images"].shape[0] == 4 and torch.isfinite(got["images"]).all()


def test_reflow_needs_a_flow_run(tiny_cfg):
    cfg = tiny_cfg("model=vae")
    train(cfg)
    with pytest.raises(UsageError, match="reflow needs a flow run"):
        reflow_main([f"run_dir={cfg.paths.output_dir}", "n=4"])
