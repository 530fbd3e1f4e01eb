"""Spread across seeds and metric agreement (issue 17): runs that differ only in ``seed`` are
one group with mean ± std (numpy's, ddof=1) in the sweep's groups.json / groups.csv and log,
which says whether two groups' intervals overlap; the dashboard shows the groups as
``mean ± std`` rows and ± std bands (in real headless Chromium); Kendall τ between metric
rankings equals scipy's and respects which way each metric is better."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.stats import kendalltau

from genlab import dashboard
from genlab.groups import metric_agreement, overlaps, pm, summarize
from genlab.runs import find_runs, load_run
from genlab.sweep import SweepSummary

from .conftest import REPO
from .test_sweep import chromium

# fd_digits per seed 0, 1, 2: vae and diffusion overlap (11 ± 1 and 12.5 ± 1), gan is apart
FD = {"vae": [10.0, 11.0, 12.0], "gan": [20.0, 23.0, 21.0], "diffusion": [11.5, 12.5, 13.5]}
IS = {"vae": [3.0, 3.2, 3.1], "gan": [2.0, 2.5, 2.2], "diffusion": [2.9, 3.0, 3.3]}


def write_run(run: Path, model: str, seed: int, metrics: dict, data_seed="${seed}") -> None:
    """A run directory as genlab writes it: .hydra/config.yaml (unresolved, seeds following
    ${seed}) and overrides.yaml, summary.json, metrics.csv."""
    config = {
        "seed": seed,
        "model": {"_target_": f"genlab.families.{model}", "lr": 1e-3},
        "data": {"name": "synthetic", "seed": data_seed},
        "metrics": {"seed": "${seed}", "num_samples": 8},
        "paths": {"output_dir": str(run)},
    }
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(config), run / ".hydra" / "config.yaml")
    overrides = [f"model={model}", f"seed={seed}", "data=synthetic", f"paths.log_dir={run}"]
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    summary = {"status": "completed", "metrics": metrics, "global_step": 4, "parameters": 1000,
               "train_images_per_s": 100.0 + seed, "family": f"{model.upper()}Module",
               "choices": {"model": model, "data": "synthetic"}}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train/loss"])
        writer.writerows([[s, 1.0 / s + 0.1 * seed] for s in (1, 2, 3, 4)])


def make_sweep(root: Path) -> Path:
    """Three models x seeds 0, 1, 2 (job names as Hydra numbers them), and one vae run whose
    data seed is set apart (it is another config: not in the vae group)."""
    job = 0
    for model in FD:
        for seed in range(3):
            metrics = {"val/fd_digits": FD[model][seed], "val/is_digits": IS[model][seed],
                       "val/is_digits_std": 0.05, "val/sample_img_per_s": 500.0 + job}  # fmt: skip
            # a resolved data seed equal to the run's own seed is the same config
            data_seed = seed if (model, seed) == ("vae", 2) else "${seed}"
            write_run(root / f"{job}_{model}_synthetic", model, seed, metrics, data_seed)
            job += 1
    write_run(root / f"{job}_vae_synthetic", "vae", 0, {"val/fd_digits": 30.0}, data_seed=7)
    return root


@pytest.fixture
def sweep(tmp_path) -> Path:
    return make_sweep(tmp_path / "multirun")


def runs_of(sweep: Path) -> list[dict]:
    return [load_run(p, sweep) for p in find_runs(sweep)]


def test_runs_that_differ_only_in_seed_are_one_group_with_numpys_mean_and_std(sweep):
    groups = summarize(runs_of(sweep))
    assert [g["name"] for g in groups] == ["model=vae", "model=gan", "model=diffusion",
                                           "9_vae_synthetic"]  # fmt: skip
    assert [g["seeds"] for g in groups] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0]]
    for g in groups[:3]:
        model = g["name"].removeprefix("model=")
        for metric, values in (("val/fd_digits", FD[model]), ("val/is_digits", IS[model])):
            s = g["metrics"][metric]
            assert s["n"] == 3 and s["spread"] == "seeds"
            assert s["mean"] == pytest.approx(np.mean(values), rel=1e-12)
            assert s["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert "val/is_digits_std" not in g["metrics"], "a spread column is not a metric"
        assert g["fields"]["train_images_per_s"]["mean"] == pytest.approx(101.0)
    alone = groups[3]["metrics"]["val/fd_digits"]
    assert alone == {"mean": 30.0, "std": None, "n": 1, "spread": None}
    assert pm(groups[0]["metrics"]["val/fd_digits"]) == "11 ± 1" and pm(alone) == "30"


def test_a_single_run_keeps_the_spread_it_reports(tmp_path):
    metrics = {"val/fd_digits": 7.5, "val/fd_digits_std": 0.25, "val/kid_digits_mean": 0.02,
               "val/kid_digits_std": 0.004}  # fmt: skip
    write_run(tmp_path / "run", "vae", 0, metrics)
    (group,) = summarize(runs_of(tmp_path))
    assert group["metrics"]["val/fd_digits"] == {"mean": 7.5, "std": 0.25, "n": 1, "spread": "run"}
    assert group["metrics"]["val/kid_digits_mean"]["std"] == 0.004
    assert set(group["metrics"]) == {"val/fd_digits", "val/kid_digits_mean"}


def test_overlap_statements(sweep):
    groups = summarize(runs_of(sweep))
    assert overlaps(groups[:3], "val/fd_digits") == [
        "fd_digits: model=vae vs model=gan: apart (difference larger than the spread)",
        "fd_digits: model=vae vs model=diffusion: intervals overlap (difference within the spread)",
        "fd_digits: model=gan vs model=diffusion: apart (difference larger than the spread)",
    ]
    # a run without a spread is the point at its value: 12 is inside vae's 11 ± 1, 12.1 is not
    point = {"name": "one", "metrics": {"m": {"mean": 12.0, "std": None, "n": 1}}}
    vae = {"name": "vae", "metrics": {"m": {"mean": 11.0, "std": 1.0, "n": 3}}}
    assert overlaps([vae, point], "m") == [
        "m: vae vs one: intervals overlap (difference within the spread)"
    ]
    point["metrics"]["m"]["mean"] = 12.1
    apart = "m: vae vs one: apart (difference larger than the spread)"
    assert overlaps([vae, point], "m") == [apart]
    assert overlaps([point, point], "m") == [
        "m: one vs one: no spread to compare (one run each, no repeats)"
    ]


def test_sweep_summary_writes_groups_and_says_which_intervals_overlap(sweep, caplog):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level("INFO", logger="genlab"):
        SweepSummary().on_multirun_end(config)
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 10 and len(list(csv.DictReader((sweep / "results.csv").open()))) == 10
    rows = {r["group"]: r for r in csv.DictReader((sweep / "groups.csv").open())}
    assert list(rows) == ["model=vae", "model=gan", "model=diffusion", "9_vae_synthetic"]
    gan = rows["model=gan"]
    assert gan["seeds"] == "0 1 2" and gan["n_runs"] == "3" and gan["val/fd_digits_n"] == "3"
    assert float(gan["val/fd_digits"]) == pytest.approx(np.mean(FD["gan"]))
    assert float(gan["val/fd_digits_std"]) == pytest.approx(np.std(FD["gan"], ddof=1))
    assert rows["9_vae_synthetic"]["val/fd_digits_std"] == ""
    doc = json.loads((sweep / "groups.json").read_text())
    assert [g["name"] for g in doc["groups"]] == list(rows)
    assert (
        "fd_digits: model=vae vs model=gan: apart (difference larger than the spread)"
        in (doc["overlaps"])
    )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "4 groups (runs that differ only in seed)" in text
    assert re.search(r"model=gan\s+3\s+0,1,2\s+21\.33 ± 1\.5", text), text
    assert "fd_digits: model=vae vs model=diffusion: intervals overlap" in text
    assert not list(sweep.glob(".*.tmp")), "written atomically"


def test_kendall_tau_equals_scipys_and_respects_the_direction_of_each_metric():
    fd = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]  # lower is better
    prec = [0.2, 0.9, 0.4, 0.5, 0.1, 0.6]  # higher is better
    recall = [0.3, 0.1, 0.8, 0.7, 0.2, 0.5]
    runs = [{"metrics": {"val/fd_digits": a, "val/precision_digits": b, "val/recall_digits": c,
                         "val/fd_digits_std": 0.1, "val/sample_img_per_s": 10.0 * i,
                         **({"val/bpd": 1.0} if i < 2 else {})}}
            for i, (a, b, c) in enumerate(zip(fd, prec, recall))]  # fmt: skip
    result = metric_agreement(runs)
    # spreads, costs and a metric fewer than 3 runs have are left out
    assert result.metrics == ["val/fd_digits", "val/precision_digits", "val/recall_digits"]
    assert result.tau[0, 1] == pytest.approx(kendalltau(-np.array(fd), prec).statistic)
    assert result.tau[1, 2] == pytest.approx(kendalltau(prec, recall).statistic)
    assert (
        result.tau[0, 2] == result.tau[2, 0] == pytest.approx(kendalltau(fd, recall).statistic * -1)
    )
    assert np.allclose(np.diag(result.tau), 1.0) and (result.n == 6).all()
    # a lower-is-better and a higher-is-better metric that order the runs alike: τ = +1
    agree = [{"metrics": {"val/fd_digits": x, "val/is_digits": 10 - x, "val/cmmd": x / 10}}
             for x in (1, 5, 2, 8)]  # fmt: skip
    result = metric_agreement(agree)
    assert result.metrics == ["val/fd_digits", "val/is_digits", "val/cmmd"]
    assert np.allclose(result.tau, 1.0), "CMMD is a distance: lower is better"


def test_bench_metric_agreement_writes_the_tau_table(sweep, capsys):
    spec = importlib.util.spec_from_file_location("metric_agreement", REPO / "bench" /
                                                  "metric_agreement.py")  # fmt: skip
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([str(sweep)]) == 0
    rows = list(csv.DictReader((sweep / "metric_agreement.csv").open()))
    assert [r["metric"] for r in rows] == ["val/fd_digits", "val/is_digits"]
    runs = [r for r in runs_of(sweep) if "val/is_digits" in r["metrics"]]
    expected = kendalltau([-r["metrics"]["val/fd_digits"] for r in runs],
                          [r["metrics"]["val/is_digits"] for r in runs]).statistic  # fmt: skip
    assert float(rows[0]["val/is_digits"]) == pytest.approx(expected, abs=1e-4)
    assert rows[0]["n_val/is_digits"] == "9" and rows[0]["n_val/fd_digits"] == "10"
    assert "Kendall τ" in capsys.readouterr().out
    out = sweep / "by_group.csv"
    assert bench.main([str(sweep), "--by-group", "--out", str(out)]) == 0
    by_group = list(csv.DictReader(out.open()))
    assert float(by_group[0]["val/is_digits"]) == pytest.approx(1.0)  # the means agree
    assert bench.main([str(sweep / "nope")]) == 1


def test_dashboard_shows_seed_groups_as_mean_and_std_in_headless_chromium(sweep, tmp_path):
    page = dashboard.build(sweep)
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
    assert body["ready"] == "1", "the page's script ran to the end"
    table = dom.split('<table id="runs">', 1)[1].split("</table>", 1)[0]
    groups = re.findall(r'<tr class="group completed" data-group="([^"]+)" '
                        r'data-members="([^"]+)">(.*?)</tr>', table)  # fmt: skip
    assert [(g, m) for g, m, _ in groups] == [
        ("model=vae", "0_vae_synthetic 1_vae_synthetic 2_vae_synthetic"),
        ("model=gan", "3_gan_synthetic 4_gan_synthetic 5_gan_synthetic"),
        ("model=diffusion", "6_diffusion_synthetic 7_diffusion_synthetic 8_diffusion_synthetic"),
    ]
    cells = {g: re.findall(r"<td[^>]*>(.*?)</td>", row) for g, _, row in groups}
    text = {g: [re.sub(r"<[^>]+>", "", c) for c in row] for g, row in cells.items()}
    gan = np.array(FD["gan"])
    assert f"{gan.mean():.4g} ± {gan.std(ddof=1):.2g}" in text["model=gan"]  # 21.33 ± 1.5
    assert "11 ± 1" in text["model=vae"] and "seeds 0, 1, 2" in text["model=vae"][0]
    assert f"{np.mean(IS['vae']):.4g} ± {np.std(IS['vae'], ddof=1):.2g}" in text["model=vae"]
    # the run outside a group is a row as before; the members are not rows of their own
    assert re.findall(r'<tr class="run (\w+)" data-run="([^"]+)"', table) == [
        ("completed", "9_vae_synthetic")
    ]
    assert "is_digits_std" not in table, "the run's own spread is folded into the ± cells"
    assert int(body["curves"]) == 4 and int(body["bands"]) == 3  # a band per seed group
    assert dom.count('class="errorbar"') == 3  # the scatter's group points
    assert "model=gan (mean ± std)" in dom.split('id="curve-legend"', 1)[1]
    agreement = dom.split('<table id="agreement">', 1)[1].split("</table>", 1)[0]
    assert "<th>fd_digits</th><th>is_digits</th>" in agreement
    assert "sample_img_per_s" not in agreement, "cost metrics are left out"


def test_a_failed_seed_leaves_the_group_with_the_others(tmp_path):
    for seed, fd in ((0, 10.0), (1, 12.0), (2, None)):
        metrics = {} if fd is None else {"val/fd_digits": fd}
        write_run(tmp_path / f"{seed}_vae", "vae", seed, metrics)
    summary = json.loads((tmp_path / "2_vae" / "summary.json").read_text())
    (tmp_path / "2_vae" / "summary.json").write_text(
        json.dumps({**summary, "status": "failed", "error": "ValueError: nan"})
    )
    (group,) = summarize(runs_of(tmp_path))
    assert group["status"] == "2/3 completed" and group["seeds"] == [0, 1, 2]
    assert group["metrics"]["val/fd_digits"]["n"] == 2
    assert group["metrics"]["val/fd_digits"]["std"] == pytest.approx(np.std([10, 12], ddof=1))
    html = dashboard.build(tmp_path).read_text()
    assert '<tr class="group partial" data-group="' in html and "ValueError: nan" in html
