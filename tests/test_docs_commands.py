"""Every `python -m genlab…` command in README.md and docs/ runs as written, up to `--cfg job`.

Commands come from fenced code blocks (line continuations joined) and inline code, split as a
shell would (quotes, trailing comments). Placeholders such as `<run>`, `<sweep>` or
`<file.json>` are filled from a tiny real run made once per module. Each command is then run
as `python -m <module> <args> --cfg job` (as written when it already asks for `--help` or
`--cfg`); a sweep (`-m`) is run once per job it expands to, without `-m` (Hydra refuses `-m`
with `--cfg`). The exit code must be 0, and every `_target_` in the printed model (for the
sample command: the run's model with the command's `+model.` changes) must take the keys the
config gives it, so a keyword the class or function does not have fails here, not at run
time.

To stay fast, the commands run in one subprocess that imports genlab once and forks a child
per command; each child runs the module with `runpy` exactly as `python -m` does, with its
own stdout, stderr and exit code.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_object
from omegaconf import OmegaConf

from genlab.train import train

from .conftest import REPO, TINY, compose_cfg, run_cli_jobs

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND = re.compile(r"\bpython3? -m genlab\b")
HYDRA_APPS = {"genlab", "genlab.sample", "genlab.evaluate", "genlab.dashboard", "genlab.reflow"}
# The allow-list: modules whose commands are not run here, and why. All are plain key=value
# scripts, not Hydra apps (no --cfg job: any run trains for minutes). Their arguments are
# still checked against the keys their docstring's usage line names.
NOT_RUN = {
    "genlab.guidance.train_classifier": "trains the shipped noise-aware classifier (14 min)",
    "genlab.metrics.train_clip": "trains the shipped domain CLIP (3.5 min)",
    "genlab.metrics.train_faces": "trains the shipped face extractor (13 min)",
}
# Hydra flags that make a command print instead of run: such commands run as written.
PRINTING_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i"}
SHELL_OPERATORS = {"&&", "||", ";"}


@dataclass
class Command:
    where: str  # page:line of its first occurrence
    text: str  # as written (continuations joined)
    also: list[str] = field(default_factory=list)  # other occurrences


# ------------------------------------------------------------------ reading the pages
def snippets(page: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(line, text) of every code line and inline code span of a page that mentions
    `python -m genlab`, and (line, text) of prose that mentions it outside code."""
    code, prose, lines = [], [], page.read_text(encoding="utf-8").splitlines()
    fence, paragraph, i = None, [], 0

    def flush():
        if not paragraph:
            return
        start, text = paragraph[0][0], "\n".join(t for _, t in paragraph)
        for span in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
            inline = " ".join(span.group(2).split())
            if COMMAND.search(inline):
                code.append((start + text[: span.start()].count("\n"), inline))
        outside = re.sub(r"(`+)(.+?)\1", "", text, flags=re.S)
        if COMMAND.search(" ".join(outside.split())):
            prose.append((start, " ".join(outside.split())))
        paragraph.clear()

    while i < len(lines):
        line, number = lines[i], i + 1
        marker = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and marker:
            flush()
            fence = marker.group(1)
        elif fence is not None:
            if line.strip().startswith(fence) and not line.strip()[len(fence) :].strip():
                fence = None
            else:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                if COMMAND.search(line):
                    code.append((number, line.strip()))
        elif not line.strip():
            flush()
        else:
            paragraph.append((number, line))
        i += 1
    flush()
    return code, prose


def documented_commands() -> tuple[list[Command], list[str]]:
    """The commands, deduplicated by their text, and the prose mentions outside code."""
    found: dict[str, Command] = {}
    prose = []
    for page in PAGES:
        name = page.relative_to(REPO).as_posix()
        code, outside = snippets(page)
        prose += [f"{name}:{n}: {t}" for n, t in outside]
        for number, text in code:
            text = " ".join(text.split())
            if text in found:
                found[text].also.append(f"{name}:{number}")
            else:
                found[text] = Command(f"{name}:{number}", text)
    return list(found.values()), prose


COMMANDS, PROSE = documented_commands()


# ------------------------------------------------------------------ the tiny run
@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """What each placeholder stands for, from a 2-step run on synthetic data."""
    root = tmp_path_factory.mktemp("docs")
    run = root / "runs" / "tiny_diffusion_synthetic"
    tiny = [o for o in TINY if not o.startswith("metrics")]  # no evaluation: not needed here
    overrides = [*tiny, "metrics=none", "model=diffusion", "trainer.max_steps=2"]
    cfg = compose_cfg([*overrides, f"paths.cache_dir={root / 'cache'}"], run)
    cfg.model.sampler.steps = 5
    assert train(cfg)["status"] == "completed"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    torch.save({"images": images}, root / "images.pt")
    np.savez(root / "images.npz", images.numpy())
    (root / "data").mkdir()
    # (a flow run's commands are composed, not run: the diffusion run stands in)
    runs = {"run", "any run", "diffusion run", "diffusion_cond run", "gan or vae run", "flow run",
            "autoencoder run"}  # fmt: skip
    return {
        **{name: str(run) for name in runs | {"vqvae run"}},
        "sweep": str(run.parent),  # a folder of runs, as a sweep is
        "dir": str(run.parent),
        "folder": str(run / "samples"),  # the run's PNG grids
        "data dir": str(root / "data"),
        "images.pt": str(root / "images.pt"),
        "images.npz": str(root / "images.npz"),
        "file.json": str(root / "out" / "result.json"),
        "file.html": str(root / "out" / "dashboard.html"),
        "file.pt": str(root / "out" / "classifier.pt"),
        "path": str(root / "out" / "sample"),
        "partition": "gpu",
        "cwd": str(root),
    }


# ------------------------------------------------------------------ commands -> jobs
def parse(text: str, places: dict[str, str]) -> tuple[str, list[list[str]]]:
    """(module, [argv of each job]) of one documented command; raises ValueError for what
    this test cannot run."""
    unknown = sorted(set(re.findall(r"<([^<>]+)>", text)) - set(places))
    if unknown:
        raise ValueError(f"unknown placeholder(s) {unknown}: add them to places()")
    filled = re.sub(r"<([^<>]+)>", lambda m: places[m.group(1)], text)
    lexer = shlex.shlex(filled, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    segments, current = [], []
    for word in words:
        if word in SHELL_OPERATORS:
            segments.append(current)
            current = []
        elif set(word) <= set("();<>|&"):
            raise ValueError(f"shell operator {word!r}: pipes and redirections are not run here")
        else:
            current.append(word)
    segments.append(current)
    ours = [s for s in segments if "genlab" in " ".join(s[:3])]
    if len(ours) != 1:
        raise ValueError("one `python -m genlab…` command per line")
    words = ours[0]
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # VAR=value before the command
    if words[:2] not in (["python", "-m"], ["python3", "-m"]) or len(words) < 3:
        raise ValueError(f"not a `python -m <module>` command: {words[:3]}")
    module, args = words[2], words[3:]
    if module in NOT_RUN:
        return module, [args]
    if module not in HYDRA_APPS:
        raise ValueError(f"{module} is neither a Hydra app ({sorted(HYDRA_APPS)}) nor in NOT_RUN")
    if PRINTING_FLAGS & set(args):
        return module, [args]
    sweep = bool({"-m", "--multirun"} & set(args))
    args = [a for a in args if a not in ("-m", "--multirun")]
    flags = [a for a in args if a.startswith("-") and not a.startswith("~")]
    if flags:
        raise ValueError(f"flag(s) {flags} are not handled here")
    if not sweep:
        return module, [[*args, "--cfg", "job"]]
    choices = []
    for text, o in zip(args, OverridesParser.create().parse_overrides(args)):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={value}" for value in o.sweep_string_iterator()])
        else:
            choices.append([text])
    return module, [[*job, "--cfg", "job"] for job in itertools.product(*choices)]


@pytest.fixture(scope="module")
def outcomes(places, tmp_path_factory) -> dict[str, list[dict] | str]:
    """For each documented command: its jobs' argv, exit code, stdout and stderr, or why it
    cannot be run."""
    work = tmp_path_factory.mktemp("jobs")
    parsed, jobs = {}, []
    for command in COMMANDS:
        try:
            module, argvs = parse(command.text, places)
        except ValueError as err:
            parsed[command.text] = str(err)
            continue
        parsed[command.text] = [{"module": module, "args": argv} for argv in argvs]
        if module not in NOT_RUN:
            jobs += [(module, argv) for argv in argvs]
    unique = sorted(set((m, tuple(a)) for m, a in jobs))
    results = run_cli_jobs(unique, work, cwd=places["cwd"], env={"HYDRA_FULL_ERROR": "1"})
    done = dict(zip(unique, results))
    for runs in parsed.values():
        for job in runs if isinstance(runs, list) else []:
            if job["module"] not in NOT_RUN:
                job.update(done[(job["module"], tuple(job["args"]))])
    return parsed


# ------------------------------------------------------------------ checks
def unknown_keywords(node, where: str = "model") -> list[str]:
    """Keys of every `_target_` node (unresolved config) that its target does not take."""
    problems = []
    if isinstance(node, dict):
        if "_target_" in node:
            target = get_object(node["_target_"])
            keys = {k: None for k in node if not str(k).startswith("_")}
            try:
                inspect.signature(target).bind_partial(**keys)
            except TypeError as err:
                problems.append(f"{where}: {node['_target_']}: {err}")
        for key, value in node.items():
            problems += unknown_keywords(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            problems += unknown_keywords(value, f"{where}[{i}]")
    return problems


def model_of(job: dict) -> dict | None:
    """The model config the job would build (unresolved), from its printed --cfg job."""
    if "--cfg" not in job["args"]:
        return None
    printed = OmegaConf.create(job["out"])
    if job["module"] == "genlab":
        return OmegaConf.to_container(printed.model)
    if job["module"] == "genlab.sample" and not OmegaConf.is_missing(printed, "run_dir"):
        # the run's model with the command's +model. changes
        run_cfg = OmegaConf.load(Path(printed.run_dir) / ".hydra" / "config.yaml")
        return OmegaConf.to_container(OmegaConf.merge(run_cfg.model, printed.get("model", {})))
    return None


def usage_keys(module: str) -> set[str]:
    """The `key=` words of a script's module docstring (its usage line)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    return set(re.findall(r"\b(\w+)=", ast.get_docstring(ast.parse(source)) or ""))


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_runs(command, outcomes):
    jobs = outcomes[command.text]
    where = ", ".join([command.where, *command.also])
    assert isinstance(jobs, list), f"{where}: cannot run {command.text!r}: {jobs}"
    for job in jobs:
        if job["module"] in NOT_RUN:  # key=value scripts: the keys it is given exist
            words = job["args"]
            assert all("=" in w for w in words), f"{where}: not key=value: {words}"
            keys = {w.split("=", 1)[0] for w in words}
            assert keys <= usage_keys(job["module"]), (where, keys - usage_keys(job["module"]))
            continue
        shown = f"python -m {job['module']} {shlex.join(job['args'])}"
        assert job["rc"] == 0, f"{where}: exit {job['rc']}: {shown}\n{job['err'][-3000:]}"
        model = model_of(job)
        if model is not None:
            assert not unknown_keywords(model), f"{where}: {shown}: {unknown_keywords(model)}"


def test_the_pages_have_commands_and_none_outside_code():
    modules = {re.search(r"python3? -m (\S+)", c.text).group(1) for c in COMMANDS}
    assert HYDRA_APPS <= modules, HYDRA_APPS - modules
    assert len(COMMANDS) > 40
    assert not PROSE, "write commands as code (`...` or a code block):\n" + "\n".join(PROSE)


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", readme, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    assert "python -m pytest -q" in lines
    assert "python -m pytest -q" in (REPO / ".ci" / "run").read_text()
