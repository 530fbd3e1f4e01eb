"""Quality against NFE for DDPM, EDM and flow matching on MNIST on this machine: the figures of
docs/results.md ("Fast solvers, EDM and flow matching").

    python bench/nfe_figures.py [--root runs/nfe_figures] [--data-dir ../shared/assets/mnist]
        [--n 2000] [--minutes 20] [--pairs 2000] [--reflow-steps 500] [--all]
        [--stages train,ddpm,edm,flow,reflow] [--families ddpm,edm,flow]
        [--out bench/results/nfe_figures.json] [--plot docs/assets/nfe_figures.png]

Stages, each skipped when its output exists (so a killed benchmark resumes where it stopped):

- ``train``: ``python -m genlab experiment=mnist_<family>_cpu`` for ddpm, edm and flow, the same
  UNet, data, ``--minutes`` of training each (the presets' ``trainer.max_time``), one after
  the other, with in-training evaluation switched off (``metrics=none``) so the minutes are
  all training. ``--families`` trains (and reports) only those.
- ``ddpm``: the DDPM checkpoint with DDIM and DPM-Solver++(2M) at NFE 5 / 10 / 20 / 50,
  DPM-Solver++ also at uniform time (DDIM's grid), Karras rho = 7 and uniform log-SNR spacing,
  and UniPC at 5 / 10 / 20 in its default and uniform time, the fast solvers with x0 clipped
  to [-1, 1] as DDIM does (``clip_x0``; spacing by default: DDIM uniform time T-1 .. 0, the
  others ``auto``, in the VP frame trailing T-1 .. T/N-1). ``--all`` adds UniPC at 50, Euler
  and Heun.
- ``edm`` / ``flow``: the EDM run (Heun, DPM-Solver++) and the flow run (Euler, Heun) at NFE
  5 / 10 / 20; ``--all`` adds EDM Heun at 50 and Euler, flow Euler at 50, midpoint and
  DPM-Solver++.
- ``reflow``: ``python -m genlab.reflow`` on the flow run (n pairs from its Euler-20 ODE), the
  2-rectified flow at NFE 1 / 2 / 5 against the 1-rectified flow at 1 / 2 / 20.

Every point is ``python -m genlab.evaluate run_dir=<run> metrics=cpu "metrics.metrics=[fid,cost]"
n=<n> "nfe=[...]" +model.sampler...``: the digit Frechet distance (``val/fd_digits``, the
classifier genlab ships, n generated images against 10,000 MNIST training images) with the
NFE counted on the network; each run's ``nfe.csv`` holds the rows. The printed table and the
JSON are read back from those tables, and ``--plot`` draws fd_digits against NFE for the
main lines of each run (``PLOTTED``). Targets (issue 16): DPM-Solver++ at 10 NFE within 10% of
DDIM at 50; EDM and flow at or below the DDPM run's DDIM-50 figure with at most 20 NFE.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

SOLVERS = "genlab.diffusion.samplers."
FAMILIES = ("ddpm", "edm", "flow")
# (run, solver, spacing, options) drawn by --plot: each run's default solver and the best
# fast solvers, with DPM-Solver++ on both VP grids to show what the spacing does
PLOTTED = [("ddpm", "ddim", "time", ""), ("ddpm", "dpmpp_2m", "trailing", "clip_x0=True"),
           ("ddpm", "dpmpp_2m", "time", "clip_x0=True"), ("ddpm", "unipc", "trailing",
           "clip_x0=True"), ("edm", "heun", "karras", ""), ("edm", "dpmpp_2m", "karras", ""),
           ("flow", "euler", "time", "")]  # fmt: skip


def sh(args: list[str], log: Path) -> None:
    print("$", " ".join(args), flush=True)
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(args) + "\n")
        f.flush()
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT)
    print(f"  exit {proc.returncode} after {time.time() - t:.0f} s (log: {log})", flush=True)
    if proc.returncode:
        raise SystemExit(f"error: the command above failed; see {log}")


def train(root: Path, data_dir: str, minutes: int, families: list[str]) -> None:
    for fam in families:
        run = root / fam
        if (run / "checkpoints" / "last.ckpt").is_file():
            continue
        sh([sys.executable, "-m", "genlab", f"experiment=mnist_{fam}_cpu", "metrics=none",
            f"paths.data_dir={data_dir}", f"trainer.max_time=00:00:{minutes:02d}:00",
            f"hydra.run.dir={run}", "logger=csv"], root / f"train_{fam}.log")  # fmt: skip


def evaluate(run: Path, n: int, nfe: list[int], solver: str, *opts: str) -> None:
    """One sweep over nfe of one solver (+ options) on run, appended to run/nfe.csv; skipped
    when it finished before (a marker file per sweep)."""
    done = run / f".bench_{solver}_{'_'.join(opts)}_{'-'.join(map(str, nfe))}_n{n}.done"
    if done.is_file():
        return
    sh([sys.executable, "-m", "genlab.evaluate", f"run_dir={run}", "metrics=cpu",
        "metrics.metrics=[fid,cost]", f"n={n}", f"nfe=[{','.join(map(str, nfe))}]",
        f"+model.sampler._target_={SOLVERS}{solver}", *[f"+model.sampler.{o}" for o in opts]],
       run.parent / f"eval_{run.name}.log")  # fmt: skip
    done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def read(run: Path) -> list[dict]:
    path = run / "nfe.csv"
    return list(csv.DictReader(open(path))) if path.is_file() else []


def plot(result: dict, path: Path) -> None:
    """fd_digits against the counted NFE (log-log), one line per ``PLOTTED`` entry found, and
    the DDPM run's DDIM-50 figure as the dashed line the targets are set against."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    xs: set[float] = set()
    for run, solver, spacing, options in PLOTTED:
        key = (solver, spacing, options)
        pts = sorted((int(p["nfe"]), float(p["val/fd_digits"]))
                     for p in result.get(run, {}).get("points", [])
                     if (p["solver"], p["spacing"], p["options"]) == key)  # fmt: skip
        if pts:
            xs.update(x for x, _ in pts)
            ax.plot(*zip(*pts), marker="o", label=f"{run}, {solver} ({spacing})")
            if (run, solver) == ("ddpm", "ddim") and pts[-1][0] == 50:
                ax.axhline(pts[-1][1], color="grey", ls="--", lw=1, label="DDPM, DDIM at 50")
    if not xs:
        return
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([x for x in (1, 2, 5, 10, 20, 50, 100) if min(xs) <= x <= max(xs)])
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_yticks([3, 5, 10, 20, 50, 100, 200])
    ax.set_xlabel("network evaluations per image (counted)")
    ax.set_ylabel("fd_digits (n = 2,000; lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="runs/nfe_figures")
    ap.add_argument("--data-dir", default="../shared/assets/mnist")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--minutes", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--reflow-steps", type=int, default=500)
    ap.add_argument("--stages", default="train,ddpm,edm,flow,reflow")
    ap.add_argument("--families", default=",".join(FAMILIES), help="the runs to train")
    ap.add_argument("--all", action="store_true", help="every solver and spacing (hours)")
    ap.add_argument("--out", default="bench/results/nfe_figures.json")
    ap.add_argument("--plot", default="docs/assets/nfe_figures.png")
    a = ap.parse_args()
    root = Path(a.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stages, families = a.stages.split(","), a.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"error: --families takes {','.join(FAMILIES)}; got {','.join(unknown)}")
    full, short = [5, 10, 20, 50], [5, 10, 20]
    if "train" in stages:
        train(root, a.data_dir, a.minutes, families)
    if "ddpm" in stages:
        run = root / "ddpm"
        evaluate(run, a.n, full, "ddim")
        evaluate(run, a.n, full, "dpmpp_2m", "clip_x0=true")
        evaluate(run, a.n, short, "dpmpp_2m", "clip_x0=true", "spacing=time")
        evaluate(run, a.n, short, "dpmpp_2m", "clip_x0=true", "spacing=karras")
        evaluate(run, a.n, short, "dpmpp_2m", "clip_x0=true", "spacing=log_snr")
    if "edm" in stages:
        run = root / "edm"
        evaluate(run, a.n, short, "heun")
        evaluate(run, a.n, short, "dpmpp_2m")
        if a.all:
            evaluate(run, a.n, full, "heun")
            evaluate(run, a.n, short, "euler")
    if "flow" in stages:
        run = root / "flow"
        evaluate(run, a.n, short, "euler")
        evaluate(run, a.n, short, "heun")
        if a.all:
            evaluate(run, a.n, full, "euler")
            evaluate(run, a.n, short, "midpoint")
            evaluate(run, a.n, short, "dpmpp_2m")
    if "ddpm" in stages:
        run = root / "ddpm"
        evaluate(run, a.n, short, "unipc", "clip_x0=true")
        evaluate(run, a.n, short, "unipc", "clip_x0=true", "spacing=time")
        if a.all:
            evaluate(run, a.n, full, "unipc", "clip_x0=true")
            evaluate(run, a.n, full, "euler", "clip_x0=true")
            evaluate(run, a.n, full, "heun", "clip_x0=true")
    if "reflow" in stages:
        flow, rf = root / "flow", root / "flow" / "reflow"
        if not (rf / "checkpoints" / "last.ckpt").is_file():
            sh([sys.executable, "-m", "genlab.reflow", f"run_dir={flow}", f"n={a.pairs}",
                "pair_steps=20", f"max_steps={a.reflow_steps}", f"out={rf}"],
               root / "reflow.log")  # fmt: skip
        evaluate(flow, a.n, [1, 2], "euler")
        evaluate(rf, a.n, [1, 2, 5], "euler")

    result = {}
    reported = [*((f, root / f) for f in families), ("reflow", root / "flow" / "reflow")]
    for name, run in reported:
        rows = read(run)
        summary = run / "summary.json"
        info = json.loads(summary.read_text()) if summary.is_file() else {}
        result[name] = {
            "run": str(run), "train_steps": info.get("global_step"),
            "train_s": (info.get("metrics") or {}).get("time/train_s"),
            "points": [{k: r[k] for k in ("solver", "spacing", "options", "nfe", "steps",
                                          "val/fd_digits", "val/sample_img_per_s") if k in r}
                       for r in rows if r["num_samples"] == str(a.n)],
        }  # fmt: skip
    print(f"\nfd_digits (n={a.n}) against counted NFE")
    for name, res in result.items():
        print(f"{name}: {res['train_steps']} steps")
        for p in res["points"]:
            print(
                f"  {p['solver']:9s} {p['spacing']:8s} {p['options']:18s} NFE {p['nfe']:>3s} "
                f"fd {float(p['val/fd_digits']):7.2f}"
            )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    plot(result, Path(a.plot))


if __name__ == "__main__":
    main()
