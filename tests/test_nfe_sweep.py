"""Quality against NFE: `python -m genlab.evaluate run_dir=<run> "nfe=[...]"` evaluates a
denoising run once per number of network evaluations with any solver, writes the table
<run>/nfe.csv (the NFE counted on the network beside the one asked for; other solvers' rows
kept) and the plot <run>/nfe.png, and the dashboard draws the tables of all runs."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from genlab import dashboard
from genlab.evaluate import main as evaluate_main
from genlab.train import train
from genlab.utils import UsageError

from .conftest import TINY, compose_cfg

SAMPLERS = "genlab.diffusion.samplers"
SMALL_UNET = ["model.net.base_channels=8", "model.net.channel_mult=[1,2]",
              "model.net.attn_resolutions=[]"]  # fmt: skip


def tiny_run(root: Path, model: str, *extra: str) -> Path:
    run = root / "runs" / f"{model}_synthetic"
    tiny = [o for o in TINY if not o.startswith("metrics")]
    overrides = [*tiny, "metrics=none", f"model={model}", "trainer.max_steps=2",
                 "~callbacks.sample_grid", f"paths.cache_dir={root / 'cache'}", *extra]  # fmt: skip
    assert train(compose_cfg(overrides, run))["status"] == "completed"
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("nfe")
    return tiny_run(root, "diffusion", *SMALL_UNET), tiny_run(root, "gan")


def sweep(run: Path, nfe: str, *extra: str) -> dict:
    cache = run.parent.parent / "cache"
    return evaluate_main([
        f"run_dir={run}", f"nfe={nfe}", "device=cpu", "n=8", "metrics=cpu",
        "metrics.sample_batch_size=8", "metrics.reference_samples=32",
        "metrics.digit_datasets=[synthetic]", "+metrics.progress=false",
        f"paths.cache_dir={cache}", *extra,
    ])  # fmt: skip


def solver(name: str) -> str:
    return f"+model.sampler._target_={SAMPLERS}.{name}"


def table(run: Path) -> list[dict]:
    with open(run / "nfe.csv", newline="") as f:
        return list(csv.DictReader(f))


def points(rows: list[dict], name: str) -> list[tuple[int, int, int]]:
    """(requested, steps, counted) NFE of one solver's rows."""
    return [(int(r["nfe_requested"]), int(r["steps"]), int(r["nfe"]))
            for r in rows if r["solver"] == name]  # fmt: skip


def test_nfe_sweep_table_plot_and_dashboard(runs, tmp_path):
    run, _ = runs
    result = sweep(run, "[2,4]", solver("euler"))
    rows = table(run)
    assert points(rows, "euler") == [(2, 2, 2), (4, 4, 4)]  # counted on the network
    assert {(r["spacing"], r["options"]) for r in rows} == {("trailing", "")}  # euler's auto
    assert all(float(r["val/fd_digits"]) >= 0 and r["val/sample_img_per_s"] for r in rows)
    assert "val/sample_nfe" not in rows[0] and "val/bpd" not in rows[0]
    assert {r["num_samples"] for r in rows} == {"8"} and len({r["settings"] for r in rows}) == 1
    assert result["plot"] == str(run / "nfe.png")
    assert (run / "nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second solver appends; its one-evaluation steps give the NFE asked for
    sweep(run, "[2,4]", solver("dpmpp_2m"), "+model.sampler.spacing=karras")
    rows = table(run)
    assert points(rows, "euler") == [(2, 2, 2), (4, 4, 4)]
    assert points(rows, "dpmpp_2m") == [(2, 2, 2), (4, 4, 4)]
    # heun: steps_for_nfe gives (nfe + 1) // 2 steps, counted as 2 steps - 1 evaluations
    sweep(run, "[3,4]", solver("heun"))
    rows = table(run)
    assert points(rows, "heun") == [(3, 2, 3), (4, 2, 3)]
    assert all(int(r["nfe"]) == 2 * int(r["steps"]) - 1 for r in rows if r["solver"] == "heun")
    # the same point again replaces its row; the run's own sampler (ddim) is a fourth line,
    # ancestral euler (an option off its default) a fifth
    sweep(run, "2", solver("euler"))
    sweep(run, "[2]")
    sweep(run, "[2]", solver("euler"), "+model.sampler.eta=1")
    rows = table(run)
    assert len(rows) == 8 and points(rows, "ddim") == [(2, 2, 2)]
    assert {r["spacing"] for r in rows if r["solver"] == "ddim"} == {"time"}
    assert sorted(r["options"] for r in rows if r["solver"] == "euler") == ["", "", "eta=1"]

    page = dashboard.build(run.parent, tmp_path / "dashboard.html")
    html = page.read_text()
    assert 'id="nfe-panel"' in html and "Quality against NFE" in html
    for name in ("euler (trailing) eta=1", "dpmpp_2m (karras)", "heun (trailing)", "ddim (time)"):
        assert name in html
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if browser is None:  # the page's script is checked where a browser is installed
        return
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group()))
    assert body["ready"] == "1" and body["nfe"] == "5"  # one line per run and solver


def test_nfe_needs_a_denoising_model_and_positive_integers(runs):
    diffusion, gan = runs
    with pytest.raises(UsageError) as err:
        sweep(gan, "[2,4,8]")
    assert str(err.value) == (
        "error: nfe=[2,4,8] needs a denoising model (diffusion, EDM, flow); gan samples in one pass"
    )
    for bad in ("[0,2]", "[2.5]", "abc", "[]"):
        with pytest.raises(UsageError, match="nfe= takes positive integers"):
            sweep(diffusion, bad)
    with pytest.raises(UsageError, match="not both"):
        sweep(diffusion, "[2]", "steps=3")
    with pytest.raises(UsageError, match="^error: model.sampler: dpmpp_2m takes no eta"):
        sweep(diffusion, "[2]", solver("dpmpp_2m"), "+model.sampler.eta=1")
