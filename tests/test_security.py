"""Untrusted inputs stay data (issue 18): a run directory's name, config values and metric names
show as text in the dashboard and never run as script (checked in real headless Chromium), and
a weights file is never unpickled beyond tensors: a crafted pickle is refused before it can run
code, and a corrupt or truncated file is one line naming it."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from genlab import dashboard
from genlab.guidance.classifier import WEIGHTS as NOISY_WEIGHTS
from genlab.guidance.classifier import load_noisy_classifier
from genlab.metrics import Evaluator
from genlab.metrics.clip_loader import BUNDLED, load_clip
from genlab.metrics.digits import WEIGHTS as DIGIT_WEIGHTS
from genlab.metrics.digits import WeightsFileError, load_digit_classifier
from genlab.metrics.extractors import build_extractor


# ------------------------------------------------------------------ the dashboard
def payload(tag: str) -> str:
    """Markup that, if a page parsed it, would mark <body> (data-pwned) and add #pwned-<tag>."""
    js = (
        f"document.body.dataset.pwned='{tag}';"
        f"document.body.appendChild(document.createElement('b')).id='pwned-{tag}'"
    )
    return f'<img src=x onerror="{js}">'


RUN_NAME = payload("run")  # no "/": it is one directory name
CONFIG_VALUE = "<!--<script>" + payload("config")  # <!--<script would swallow the page
METRIC = "val/" + payload("metric")
CURVE = "train/" + payload("curve")
ERROR = "</script>" + payload("error")
OVERRIDE = "model.lr=" + payload("override")


def write_run(run: Path, lr: str, metrics: dict, error: str | None = None) -> None:
    """A run directory as genlab writes it: summary.json, .hydra/, metrics.csv."""
    (run / ".hydra").mkdir(parents=True)
    status = "failed" if error else "completed"
    summary = {"status": status, "error": error, "metrics": metrics, "global_step": 2,
               "train_images_per_s": 100.0 if error is None else 50.0}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / ".hydra" / "config.yaml").write_text(json.dumps({"model": {"lr": lr}}))
    (run / ".hydra" / "overrides.yaml").write_text(json.dumps([OVERRIDE]))
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train/loss", CURVE])
        writer.writerows([[1, 1.0, 0.5], [2, 0.5, 0.25]])


class DOM(HTMLParser):
    """Elements (tag, attrs) and text outside <script>/<style>, each with its ancestors' ids."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements, self.texts, self.stack = [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "input", "img", "link"):
            self.stack.append((tag, dict(attrs).get("id")))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        tags = [t for t, _ in self.stack]
        if "script" not in tags and "style" not in tags:
            self.texts.append(({i for _, i in self.stack if i}, data))

    def text(self, inside: str | None = None) -> str:
        return "".join(d for ids, d in self.texts if inside is None or inside in ids)


def dump_dom(page: Path, profile: Path) -> str:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=5000", f"--user-data-dir={profile}"]  # fmt: skip
    result = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    return result.stdout


def test_dashboard_shows_hostile_names_as_text(tmp_path):
    root = tmp_path / "runs"
    write_run(root / RUN_NAME, CONFIG_VALUE, {METRIC: 1.0, "val/fid": 3.0})
    write_run(root / "plain", "0.001", {METRIC: 2.0, "val/fid": 4.0}, error=ERROR)
    page = dashboard.build(root, tmp_path / "dashboard.html")
    dom = DOM(dump_dom(page, tmp_path / "profile"))

    body = next(attrs for tag, attrs in dom.elements if tag == "body")
    assert body.get("data-ready") == "1", "the page's script ran to the end"
    assert "data-pwned" not in body, f"injected markup ran: {body['data-pwned']}"
    assert not [a for _, a in dom.elements if str(a.get("id", "")).startswith("pwned")]
    assert not [t for t, _ in dom.elements if t == "img"], "an injected <img> is in the DOM"
    assert not [a for _, a in dom.elements if "onerror" in a], "an injected handler is in the DOM"
    assert [t for t, _ in dom.elements].count("script") == 2, "the data closed its <script>"

    for where in ("runs", "curve-legend", "config"):
        assert RUN_NAME in dom.text(where), f"the run name is not text in #{where}"
    assert CONFIG_VALUE in dom.text("config") and OVERRIDE in dom.text("config")
    assert METRIC.removeprefix("val/") in dom.text("runs") and ERROR in dom.text()
    assert METRIC in dom.text("trade-y") and CURVE in dom.text("curve-metric")
    assert RUN_NAME in dom.text("trade"), "the scatter labels its points with the run name"


def test_dashboard_data_cannot_close_its_script(tmp_path):
    root = tmp_path / "runs"
    write_run(root / RUN_NAME, CONFIG_VALUE, {METRIC: 1.0}, error=ERROR)
    text = dashboard.build(root).read_text()
    data = text.split('<script id="data" type="application/json">', 1)[1].split("</script>")[0]
    assert not set("<>&") & set(data), "markup characters are \\u-escaped in the embedded JSON"
    assert json.loads(data)["runs"][0]["name"] == RUN_NAME


# ------------------------------------------------------------------ weights files
class RunsCode:
    """Unpickling this calls Path.touch(marker): what a crafted weights file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def crafted(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A weights file that runs code when unpickled, and the marker file the code makes."""
    marker, path = tmp_path / f"{name}.ran", tmp_path / f"{name}.pt"
    torch.save({"state_dict": {"w": RunsCode(marker)}, "config": {}}, path)
    return path, marker


def truncated(source: Path, tmp_path: Path) -> Path:
    """The first half of a real weights file, as an interrupted copy leaves it."""
    path = tmp_path / f"truncated-{source.name}"
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def clip_dir(tmp_path: Path, weights: Path) -> Path:
    """The bundled digits CLIP folder with its weights replaced by ``weights``."""
    folder = tmp_path / f"clip-{weights.stem}"
    folder.mkdir()
    shutil.copy(BUNDLED["genlab-digits"] / "open_clip_config.json", folder)
    shutil.copy(weights, folder / f"{weights.stem}.bin")  # a name open_clip looks for
    return folder


LOADERS = {
    "inception": lambda path: build_extractor("inception", path),
    "digit extractor": lambda path: build_extractor("digits", path),
    "face extractor": lambda path: build_extractor("faces", path),
    "dinov2": lambda path: build_extractor("dinov2", path),
    "digit classifier": lambda path: load_digit_classifier(path),
    "noise-aware classifier": lambda path: load_noisy_classifier(path),
    "clip": lambda path: load_clip(f"local-dir:{clip_dir(path.parent, path)}"),
}


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "\x1b" not in message, message
    assert path.stem in message, message


@pytest.mark.parametrize("loader", list(LOADERS))
def test_crafted_weights_file_is_refused_without_running(loader, tmp_path):
    path, marker = crafted(tmp_path, loader.replace(" ", "-"))
    with pytest.raises(WeightsFileError) as err:
        LOADERS[loader](path)
    assert not marker.exists(), "unpickling the weights file ran its code"
    assert_one_line_naming(err, path)
    assert "refused" in str(err.value)


def test_evaluator_raises_on_a_crafted_inception_file(tmp_path):
    """metrics.inception_weights=<file>: a bad file fails the evaluation, it is not "missing"."""
    path, marker = crafted(tmp_path, "inception")
    evaluator = Evaluator(metrics=["fid"], extractors=["inception"], inception_weights=str(path))
    with pytest.raises(WeightsFileError, match="refused"):
        evaluator.setup("cifar10")
    assert not marker.exists() and not evaluator.not_computed


@pytest.mark.parametrize("loader", list(LOADERS))
def test_truncated_weights_file_is_one_line(loader, tmp_path):
    real = {"digit classifier": DIGIT_WEIGHTS, "digit extractor": DIGIT_WEIGHTS}
    real["noise-aware classifier"] = NOISY_WEIGHTS
    source = real.get(loader)
    if source is None:  # a small torch.save file is as good a zip to cut in half
        source = tmp_path / "state.pt"
        torch.save({"w": torch.zeros(64, 64)}, source)
    path = truncated(source, tmp_path)
    with pytest.raises(WeightsFileError) as err:
        LOADERS[loader](path)
    assert_one_line_naming(err, path)


def test_state_dict_of_the_wrong_network_is_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsFileError, match="do not fit") as err:
        build_extractor("inception", path)
    assert_one_line_naming(err, path)
