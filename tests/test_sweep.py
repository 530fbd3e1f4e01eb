"""Comparison sweeps: a multirun over every model preset survives a failing job and can be
re-run to finish only what did not complete; the dashboard renders the sweep in real headless
Chromium; the comparison notebook executes on it; W&B groups the jobs; the launcher and
Optuna presets compose and run."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from genlab import dashboard
from genlab.runs import find_runs, latest_images, read_curves
from genlab.train import RunConflictError, train, wandb_settings

from .conftest import REPO, TINY, compose_cfg, run_cli, standalone_presets

ALL_PRESETS = standalone_presets()  # a preset with a required key needs another run first
# The fast suite's sweep: one preset of each family (test_train trains every preset; the slow
# test_every_preset_sweeps runs them all as one multirun)
PRESETS = ["gan", "vae", "vqvae", "pixelcnn", "diffusion", "flow"]
BROKEN = "defaults:\n  - gan\ng_optimizer:\n  lr: {lr}\n"  # Adam rejects a negative lr


def sweep_args(root: Path, models: list[str], *extra: str) -> list[str]:
    return [
        "-m",
        f"model={','.join(models)}",
        *TINY,
        "metrics.num_samples=8",
        "callbacks.sample_grid.every_n_steps=4",  # one grid, at the end (PixelRNN is slow)
        f"paths.log_dir={root / 'logs'}",
        f"paths.cache_dir={root / 'cache'}",
        f"hydra.searchpath=[file://{root / 'extra'}]",
        f"hydra.sweep.dir={root / 'multirun'}",
        *extra,
    ]


def broken_preset(root: Path, lr: float = -1.0) -> None:
    (root / "extra" / "model").mkdir(parents=True, exist_ok=True)
    (root / "extra" / "model" / "broken.yaml").write_text(BROKEN.format(lr=lr))


def run_sweep(root: Path, presets: list[str]):
    """The presets and one deliberately broken job, 4 steps each on synthetic data, in one
    `python -m genlab -m` process."""
    broken_preset(root)
    proc = run_cli(sweep_args(root, [*presets, "broken"]), cwd=root, check=False, timeout=1200)
    return root / "multirun", proc


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    return run_sweep(tmp_path_factory.mktemp("compare"), PRESETS)


def check_sweep(sweep: Path, proc, presets: list[str]) -> None:
    """The failed job is recorded, every other one completed with its checkpoint and curves,
    and results.csv has a row per job."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]  # non-zero: one job failed
    assert f"1 of {len(presets) + 1} jobs did not complete" in out
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert [j["model"] for j in jobs] == [*presets, "broken"]
    failed = [j for j in jobs if j["status"] != "completed"]
    assert [j["model"] for j in failed] == ["broken"]
    assert failed[0]["status"] == "failed"
    assert "Invalid learning rate: -1.0" in failed[0]["error"]
    broken_summary = json.loads(
        (sweep / f"{len(presets)}_broken_synthetic" / "summary.json").read_text()
    )
    assert broken_summary["status"] == "failed" and "ValueError" in broken_summary["error"]
    for job in jobs[:-1]:
        run = sweep / job["name"]
        assert job["global_step"] == 4 and job["train_images_per_s"] > 0, job
        assert (run / "checkpoints" / "last.ckpt").exists()
        assert read_curves(run)["train/loss"], "metrics.csv has the loss curve"
    rows = {r["model"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    assert len(rows) == len(jobs) and "val/fd_digits" in rows["gan"]
    likelihood = [m for m in presets if "gan" not in m]  # VAEs, autoregressive, denoising
    assert all(rows[m]["val/bpd"] for m in likelihood), {m: rows[m]["val/bpd"] for m in rows}


def test_sweep_records_the_failure_and_completes_the_rest(tiny_sweep):
    check_sweep(*tiny_sweep, PRESETS)


@pytest.mark.slow
def test_every_preset_sweeps(tmp_path):
    check_sweep(*run_sweep(tmp_path, ALL_PRESETS), ALL_PRESETS)


@pytest.mark.slow
def test_rerun_finishes_only_the_jobs_that_did_not_complete(tmp_path):
    broken_preset(tmp_path)
    args = sweep_args(tmp_path, ["gan", "broken"], "~callbacks.sample_grid", "metrics.at_end=false")
    first = run_cli(args, cwd=tmp_path, check=False)
    assert first.returncode == 1
    sweep = tmp_path / "multirun"
    done = json.loads((sweep / "0_gan_synthetic" / "summary.json").read_text())
    broken_preset(tmp_path, lr=1e-4)  # the user fixes the bad hyperparameter ...
    second = run_cli(args, cwd=tmp_path)  # ... and re-runs the same sweep into its directory
    assert "0_gan_synthetic: already completed, skipped" in second.stdout + second.stderr
    assert json.loads((sweep / "0_gan_synthetic" / "summary.json").read_text()) == done
    fixed = json.loads((sweep / "1_broken_synthetic" / "summary.json").read_text())
    assert fixed["status"] == "completed" and fixed["global_step"] == 4
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "completed"]


def test_unfinished_run_resumes_from_its_last_checkpoint(tiny_cfg, monkeypatch):
    """A job that died at step 2 (here: a NaN loss) resumes from its last.ckpt when the same
    config runs again in its directory; once completed it is skipped; another config in the
    same directory is refused (issue 18: it used to overwrite the completed run)."""
    from genlab.families import GANModule

    original = GANModule.d_loss

    def poisoned(self, *args):
        loss, stats = original(self, *args)
        return (loss * float("nan") if self.global_step >= 2 else loss), stats

    cfg = tiny_cfg("model=gan", "~callbacks.sample_grid")
    run = Path(cfg.paths.output_dir)
    monkeypatch.setattr(GANModule, "d_loss", poisoned)
    with pytest.raises(Exception, match="nan"):
        train(cfg)
    monkeypatch.setattr(GANModule, "d_loss", original)
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    resumed = train(cfg)
    assert resumed["resumed_from"] == str(run / "checkpoints" / "last.ckpt")
    assert resumed["status"] == "completed" and resumed["global_step"] == 4
    assert train(cfg) == json.loads((run / "summary.json").read_text())  # completed: skipped
    with pytest.raises(RunConflictError, match="another config"):
        train(tiny_cfg("model=gan", "~callbacks.sample_grid", "seed=1"))
    assert json.loads((run / "summary.json").read_text())["protocol"]["seed"] == 0


def test_failure_before_fitting_is_recorded(tiny_cfg):
    cfg = tiny_cfg("model=vqvae_prior")  # model.vqvae_run is mandatory and missing
    with pytest.raises(Exception, match="vqvae_run"):
        train(cfg)
    summary = json.loads((Path(cfg.paths.output_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and "vqvae_run" in summary["error"]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def test_dashboard_in_headless_chromium(tiny_sweep, tmp_path):
    sweep, _ = tiny_sweep
    page = dashboard.build(sweep)
    assert page == sweep / "dashboard.html"
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group()))
    runs = find_runs(sweep)
    assert body["ready"] == "1", "the page's script ran to the end"
    assert int(body["runs"]) == len(runs) == len(PRESETS) + 1
    rows = re.findall(r'<tr class="run (\w+)" data-run="([^"]+)"', dom)
    assert sorted(name for _, name in rows) == sorted(r.name for r in runs)
    assert dict((n, s) for s, n in rows)[f"{len(PRESETS)}_broken_synthetic"] == "failed"
    with_grids = sum(bool(latest_images(r)) for r in runs)
    assert with_grids >= len(PRESETS) - 1  # all but the VQ-VAE without prior draw samples
    assert int(body["images-loaded"]) >= with_grids, "every embedded grid decodes"
    assert int(body["curves"]) == len(runs) - 1  # a train/loss curve per completed run
    assert int(body["points"]) >= 1  # the trade-off scatter
    shot = tmp_path / "dashboard.png"
    subprocess.run([*flags, "--window-size=1400,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_dashboard_cli_errors_are_one_line(tmp_path):
    missing = run_cli(
        [f"dir={tmp_path / 'nope'}"], cwd=tmp_path, module="genlab.dashboard", check=False
    )
    assert missing.returncode == 1 and "is not a directory" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    empty = run_cli([f"dir={tmp_path}"], cwd=tmp_path, module="genlab.dashboard", check=False)
    assert empty.returncode == 1 and "no runs under" in empty.stderr
    assert len(empty.stderr.strip().splitlines()) == 1


def test_notebook_executes_on_the_sweep(tiny_sweep, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sweep, _ = tiny_sweep
    monkeypatch.setenv("GENLAB_SWEEP", str(sweep))
    nb = nbformat.read(REPO / "notebooks" / "compare_families.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(sweep))
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"{len(PRESETS) + 1} runs" in text
    assert int(re.search(r"points plotted: (\d+)", text).group(1)) >= 2
    assert (sweep / "compare_families.png").stat().st_size > 10_000


@pytest.mark.slow
def test_wandb_groups_a_sweep_and_logs_a_results_table(tmp_path):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    broken_preset(tmp_path)
    args = sweep_args(tmp_path, ["gan", "vae"], "logger=wandb", "~callbacks.sample_grid",
                      "metrics.at_end=false")  # fmt: skip
    run_cli(args, cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)})
    sweep = tmp_path / "multirun"
    fields = pb.RunRecord.DESCRIPTOR.fields_by_name

    def field(name: str, value: str) -> bytes:  # a string field as protobuf encodes it
        data = value.encode()
        return bytes([(fields[name].number << 3) | 2, len(data)]) + data

    for job, family in (("0_gan_synthetic", "gan"), ("1_vae_synthetic", "vae")):
        runs = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(runs) == 1, f"{job}: one W&B run of its own"
        record = runs[0].read_bytes()  # the run record: group, name and tags as set
        assert field("run_group", sweep.name) in record
        assert field("display_name", job) in record
        assert field("tags", f"family:{family}") in record
    tables = list((sweep / "wandb").glob("offline-run-*/files/media/table/results_*.table.json"))
    assert len(tables) == 1, "the sweep's results table, as a W&B run of its own"
    table = json.loads(tables[0].read_text())
    names = [row[table["columns"].index("name")] for row in table["data"]]
    assert names == ["0_gan_synthetic", "1_vae_synthetic"]


def test_wandb_settings_group_name_and_tags(tmp_path):
    cfg = compose_cfg(["logger=wandb", "hydra.sweep.dir=/x/multiruns/2026-01-01_00-00-00"],
                      tmp_path)  # fmt: skip
    conf = cfg.logger.wandb
    assert wandb_settings(conf, tmp_path / "run", "gan")["tags"][-1] == "family:gan"
    assert "group" not in wandb_settings(conf, tmp_path / "run", "gan")  # a single run
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        extra = wandb_settings(conf, tmp_path / "3_gan_mnist", "gan")
    finally:
        compose_cfg([], tmp_path)  # back to a single run for the tests that follow
    assert extra["group"] == "2026-01-01_00-00-00" and extra["name"] == "3_gan_mnist"


@pytest.mark.parametrize(
    ("override", "target"),
    [
        ("hydra/launcher=local_parallel", "JoblibLauncher"),
        ("hydra/launcher=slurm", "SlurmLauncher"),
        ("experiment=optuna_vae", "OptunaSweeper"),
    ],
)
def test_launcher_and_sweeper_presets_compose(override, target, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_cfg([override], tmp_path)
    node = cfg.hydra.sweeper if "sweeper" in target.lower() else cfg.hydra.launcher
    assert node._target_.endswith(target)


@pytest.mark.slow  # the Optuna sweeper plugin end to end (about 12 s)
def test_optuna_sweep_runs_trials_and_returns_the_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = [
        "-m",
        "experiment=optuna_vae",
        *[a for a in TINY if not a.startswith("metrics")],
        "metrics=cpu",
        "metrics.every_n_steps=0",
        "metrics.metrics=[bpd]",
        "metrics.bpd_images=8",
        "trainer.max_time=null",
        "hydra.sweeper.n_trials=2",
        "model.iw_samples=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    run_cli(args, cwd=tmp_path)
    result = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    values = [json.loads((p / "summary.json").read_text())["metrics"]["val/bpd"]
              for p in find_runs(tmp_path / "multirun")]  # fmt: skip
    assert len(values) == 2 and result.best_value == pytest.approx(min(values), rel=1e-6)


@pytest.mark.slow  # 2 worker processes that each import torch: ~30 s
def test_joblib_launcher_runs_a_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    args = sweep_args(tmp_path, ["gan", "vae"], "hydra/launcher=local_parallel",
                      "~callbacks.sample_grid")  # fmt: skip
    run_cli(args, cwd=tmp_path)
    jobs = json.loads((tmp_path / "multirun" / "sweep.json").read_text())["jobs"]
    assert [j["status"] for j in jobs] == ["completed", "completed"]
