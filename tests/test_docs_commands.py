"""Every `python -m genlab…` command in README.md and docs/ composes as written.

Commands are taken from fenced code blocks and inline code, shell-split as a shell would
(quotes, line continuations, trailing comments), placeholders such as `<run>` filled with a
path, and composed with Hydra's compose API against the command's root config -- what
`--cfg job` does, in-process (a sweep's comma lists give their first job). One subprocess per
command module checks the real `--cfg job` path too. The only commands not composed are the
scripts that train the shipped weights (plain key=value scripts, not Hydra apps); they are
listed below with the test that runs them.
"""

from __future__ import annotations

import functools
import inspect
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from genlab.utils import CONF_DIR

from .conftest import REPO, run_cli

ROOT_CONFIG = {
    "genlab": "config",
    "genlab.sample": "sample",
    "genlab.evaluate": "evaluate",
    "genlab.dashboard": "dashboard",
}
# not Hydra apps: the scripts that train the shipped weights (minutes of CPU each); their
# argument handling is run by tests/test_guidance_gradient.py (train_classifier) and
# tests/test_domain_clip.py (train_clip)
SCRIPTS = {"genlab.guidance.train_classifier", "genlab.metrics.train_clip"}
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def shell_lines(text: str) -> list[str]:
    """Lines of fenced code blocks (continuations joined) and inline code spans."""
    lines, fenced = [], re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    for block in fenced:
        lines += block.replace("\\\n", " ").splitlines()
    outside = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]*python -m genlab[^`\n]*)`", outside)
    return lines


def placeholder(match: re.Match) -> str:
    """<data dir> -> @data_dir@ (one shell word, whatever the placeholder holds)."""
    return "@" + re.sub(r"\W+", "_", match.group(1)) + "@"


def commands() -> list[tuple[str, str, list[str]]]:
    """(page, module, arguments) of every command, in page order, without duplicates."""
    found, seen = [], set()
    for page in PAGES:
        for line in shell_lines(page.read_text()):
            if "python -m genlab" not in line:
                continue
            named = re.sub(r"<([^<>\n]+)>", placeholder, line)
            words = shlex.split(named[named.find("python -m genlab") :], comments=True)
            module, args = words[2], words[3:]
            key = (module, tuple(args))
            if module.endswith("…") or module.endswith("...") or key in seen:
                continue  # prose about "python -m genlab…" commands
            seen.add(key)
            found.append((page.relative_to(REPO).as_posix(), module, args))
    return found


COMMANDS = commands()


def fill(args: list[str], tmp: Path) -> list[str]:
    """Placeholders <...> become paths; flags (-m, --help, --cfg job) are left to the CLI."""
    out = []
    for arg in args:
        arg = re.sub(r"@(\w+)@", lambda m: str(tmp / m.group(1)), arg)
        if arg.startswith("-") or arg in ("job", "hydra", "all"):
            continue
        out.append(arg)
    return out


def first_job(overrides: list[str], sweep: bool = True) -> list[str]:
    """A sweep's overrides with each comma list replaced by its first value (``sweep=False``:
    a comma list is an error, as Hydra makes it without -m)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for text, o in zip(overrides, parsed):
        if o.is_sweep_override():
            assert sweep, f"{text!r} is a sweep without -m: quote the value"
            text = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        out.append(text)
    return out


def test_the_pages_have_commands():
    modules = {m for _, m, _ in COMMANDS}
    assert set(ROOT_CONFIG) <= modules, modules
    assert modules <= set(ROOT_CONFIG) | SCRIPTS, modules - set(ROOT_CONFIG) - SCRIPTS
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(
    ("page", "module", "args"),
    [c for c in COMMANDS if c[1] in ROOT_CONFIG],
    ids=[f"{c[0]}:{' '.join([c[1], *c[2]])[:80]}" for c in COMMANDS if c[1] in ROOT_CONFIG],
)
def test_command_composes(page, module, args, tmp_path):
    overrides = first_job(fill(args, tmp_path), sweep="-m" in args)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(ROOT_CONFIG[module], overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    if module == "genlab":  # training: the model it names builds (catches bad keywords)
        try:
            model = instantiate(cfg.model)
        except Exception as err:  # a placeholder run directory is the user's to fill
            if str(tmp_path) not in str(err):
                raise
            return
        for name, value in vars(model).items():  # partials (sampler, optimizer) take their keys
            if isinstance(value, functools.partial):
                func = value.func
                while isinstance(func, functools.partial):
                    func = func.func
                inspect.signature(func).bind_partial(*value.args, **value.keywords), name


@pytest.mark.parametrize("module", sorted(ROOT_CONFIG))
def test_cfg_job_and_help_work_for_every_command(module, tmp_path):
    """The real CLI path: the first documented command of each module with --cfg job."""
    _, _, args = next(c for c in COMMANDS if c[1] == module)
    filled = [a for a in fill(args, tmp_path) if "=" in a]
    proc = run_cli([*first_job(filled), "--cfg", "job"], cwd=tmp_path, module=module)
    assert proc.stdout.strip(), proc.stderr
    assert "Powered by Hydra" in run_cli(["--help"], cwd=tmp_path, module=module).stdout
