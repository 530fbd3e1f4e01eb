"""Consistency models at 1 / 2 / 4 network evaluations against their EDM teacher at 10 / 50, on
MNIST on this machine: the figures of docs/results.md ("Consistency models against their
teacher").

    python bench/consistency_figures.py [--root runs/consistency_figures]
        [--data-dir ../shared/assets/mnist] [--stages train,evaluate]
        [--out bench/results/consistency_figures.json] [--plot docs/assets/consistency_nfe.png]

Every run is a ``python -m genlab experiment=compare_mnist ...`` job (5 minutes of training,
batch 64, then the sweep's evaluation: 1,000 samples in the digit classifier's features), in
``<root>/<name>``, skipped when its ``last.ckpt`` exists (a killed benchmark resumes):

- ``teacher``: ``model=edm``;
- ``distilled``: ``model=consistency_distill`` with the teacher as ``teacher_run`` and
  ``init_run`` (Song et al. 2023 start the student from the teacher);
- ``trained``: ``model=consistency`` (consistency training, no teacher) from the teacher's
  network (``init_run``, as ECT starts from a pretrained diffusion model);
- ``scratch``: ``model=consistency`` from random weights;
- ``teacher10``: the teacher's run resumed to 10 minutes, so the teacher's and the students'
  training minutes can be compared as well as their network evaluations.

Then ``python -m genlab.evaluate run_dir=<run> "nfe=[...]"`` writes each run's ``nfe.csv``:
the students at NFE 1 / 2 / 4 (multistep consistency sampling), the teachers with Heun at 10
and 50 (counted: 9 and 49), each point the mean ± std over three sample sets of 1,000. The
table is printed and written to ``--out``, the students started from the teacher and both
teachers plotted to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nfe_figures import read, sh  # noqa: E402

STUDENTS = ("distilled", "trained", "scratch")
REPEATS = 3  # sample sets per point: mean and std
LABELS = {
    "teacher": "EDM teacher (5 min), Heun",
    "teacher10": "EDM teacher (10 min), Heun",
    "distilled": "distilled from it (+5 min)",
    "trained": "trained from it (+5 min)",
    "scratch": "consistency training from scratch (5 min)",
}


def train(root: Path, data_dir: str) -> None:
    common = [f"paths.data_dir={data_dir}", f"paths.cache_dir={root / 'cache'}"]
    teacher = root / "teacher"
    jobs = {
        "teacher": ["model=edm"],
        "distilled": ["model=consistency_distill", f"model.teacher_run={teacher}",
                      f"model.init_run={teacher}"],
        "trained": ["model=consistency", f"model.init_run={teacher}"],
        "scratch": ["model=consistency"],
    }  # fmt: skip
    for name, args in jobs.items():
        run = root / name
        if (run / "checkpoints" / "last.ckpt").is_file():
            continue
        sh([sys.executable, "-m", "genlab", "experiment=compare_mnist", *args, *common,
            f"hydra.run.dir={run}"], root / f"train_{name}.log")  # fmt: skip
    longer = root / "teacher10"
    if not (longer / "summary.json").is_file() or _steps(longer) == _steps(teacher):
        if not longer.exists():  # a copy of the 5-minute run, resumed to 10 minutes
            shutil.copytree(
                teacher, longer, ignore=shutil.ignore_patterns("nfe.*", ".bench_*", "wandb")
            )
        sh([sys.executable, "-m", "genlab", "experiment=compare_mnist", *jobs["teacher"], *common,
            "trainer.max_time=00:00:10:00", f"ckpt_path={longer / 'checkpoints' / 'last.ckpt'}",
            f"hydra.run.dir={longer}"], root / "train_teacher10.log")  # fmt: skip


def _steps(run: Path) -> int | None:
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("global_step") if summary.is_file() else None


def evaluate(root: Path, run: Path, nfe: list[int]) -> None:
    done = run / f".bench_nfe_{'-'.join(map(str, nfe))}_r{REPEATS}.done"
    if done.is_file():
        return
    values = ",".join(map(str, nfe))
    sh([sys.executable, "-m", "genlab.evaluate", f"run_dir={run}", f"nfe=[{values}]",
        f"+metrics.repeats={REPEATS}", f"paths.cache_dir={root / 'cache'}"],
       root / f"eval_{run.name}.log")  # fmt: skip
    done.write_text("done\n")


def plot(result: dict, path: Path) -> None:
    from genlab import nfe

    rows = []
    for name in ("teacher", "teacher10", "distilled", "trained"):
        for r in result.get(name, {}).get("rows", []):
            spacing = "Karras" if name.startswith("teacher") else "CM"
            rows.append({**r, "solver": LABELS[name], "spacing": spacing, "options": "",
                         "ckpt": "last", "step": "0", "settings": ""})  # fmt: skip
    keep = ("val/fd_digits", "val/is_digits", "val/precision_digits", "val/recall_digits")
    rows = [{k: v for k, v in r.items() if not k.startswith("val/") or k in keep} for r in rows]
    if rows:
        print(f"wrote {nfe.plot(rows, path)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/consistency_figures")
    ap.add_argument("--data-dir", default="../shared/assets/mnist")
    ap.add_argument("--stages", default="train,evaluate")
    ap.add_argument("--out", default="bench/results/consistency_figures.json")
    ap.add_argument("--plot", default="docs/assets/consistency_nfe.png")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stages = a.stages.split(",")
    if "train" in stages:
        train(root, a.data_dir)
    if "evaluate" in stages:
        for name in STUDENTS:
            evaluate(root, root / name, [1, 2, 4])
        for name in ("teacher", "teacher10"):
            evaluate(root, root / name, [10, 50])
    result = {}
    print(f"fd_digits (mean ± std over {REPEATS} sets of 1,000 samples) against counted NFE")
    for name in ("teacher", "teacher10", *STUDENTS):
        run = root / name
        rows = [r for r in read(run) if r["solver"] in ("heun", "consistency_sampler")
                and r.get("val/fd_digits_std")]  # fmt: skip
        result[name] = {"run": str(run), "train_steps": _steps(run), "rows": rows}
        points = "  ".join(
            f"NFE {r['nfe']}: {float(r['val/fd_digits']):.2f} ± {float(r['val/fd_digits_std']):.2f}"
            for r in rows
        )
        print(f"  {LABELS[name]:45s} {_steps(run)} steps  {points}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    plot(result, Path(a.plot))


if __name__ == "__main__":
    main()
