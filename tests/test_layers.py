"""Imports point one way (DESIGN.md): entry points -> families -> nets, diffusion, guidance;
everything -> metrics, data, runs. nets/ and diffusion/ never import Lightning; metrics/ never
sees a model; data/ never reads a model or trainer; no cycles between packages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "genlab"


def unit(module: str) -> str:
    """genlab.families.gan -> families; genlab.train -> train (a top-level module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "genlab"


def imports() -> dict[str, set[str]]:
    """{file's unit: the modules it imports (absolute names)}, over every file of genlab."""
    out: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = out.setdefault(unit(name), set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return out


GRAPH = imports()


def genlab_units(unit_name: str) -> set[str]:
    return {unit(m) for m in GRAPH[unit_name] if m.startswith("genlab.")} - {unit_name}


@pytest.mark.parametrize("ground", ["nets", "diffusion"])
def test_nets_and_diffusion_are_plain_torch(ground):
    assert not {m for m in GRAPH[ground] if m.split(".")[0] in ("lightning", "pytorch_lightning")}
    assert genlab_units(ground) <= {"nets", "diffusion"}, genlab_units(ground)


def test_metrics_never_sees_a_model():
    assert not genlab_units("metrics") & {"families", "guidance", "callbacks", "evaluation",
                                           "train", "sample", "evaluate"}  # fmt: skip


def test_data_knows_nothing_of_models():
    assert not genlab_units("data") & {"families", "guidance", "callbacks", "metrics", "train"}


def test_no_cycles_between_packages():
    edges = {u: genlab_units(u) & set(GRAPH) for u in GRAPH}
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(edges[u]):
            assert state.get(v) != 1, f"import cycle: {' -> '.join([*path, u, v])}"
            if v not in state:
                visit(v, [*path, u])
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u, [])
