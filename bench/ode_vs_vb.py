"""A DDPM run's bits/dim three ways on the same MNIST validation images: the exact variational
bound (every one of the T timesteps), the stratified bound the evaluation reports
(``model.bpd_timesteps``), and the probability-flow ODE likelihood (``val/bpd_ode``: uniform
dequantisation, ``model.ode_steps`` Heun steps, Hutchinson). The figure of docs/results.md
("Likelihood: the ODE next to the bound").

    python bench/ode_vs_vb.py --run <ddpm run> [--data-dir ../shared/assets/mnist] [--n 128]
        [--threads 1]

Prints mean +- standard error over the images, the paired difference ODE - exact bound, and
the seconds each took.
"""

from __future__ import annotations

import argparse
import time

import torch

from genlab.data import MNISTDataModule
from genlab.data.convert import to_model
from genlab.runs import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data-dir", default="../shared/assets/mnist")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, _, _ = load_model(a.run, "last")
    data = MNISTDataModule(root=a.data_dir, download=False)
    x = to_model(data.load_split("val").tensors[0][: a.n])
    T = model.schedule.num_timesteps
    ways = {
        f"variational bound, all {T} timesteps": lambda g: model.bits_per_dim(
            x, generator=g, timesteps=T
        ),
        f"variational bound, {model.bpd_timesteps} strata": lambda g: model.bits_per_dim(
            x, generator=g
        ),
        f"probability-flow ODE, {model.ode['steps']} Heun steps": lambda g: model.ode_bits_per_dim(
            x, generator=g
        ),
    }
    values = {}
    for name, fn in ways.items():
        start = time.perf_counter()
        v = fn(torch.Generator().manual_seed(0)).double()
        values[name] = v
        se = v.std().item() / len(v) ** 0.5
        print(f"{name:42s} {v.mean().item():.4f} +- {se:.4f} bits/dim "
              f"({time.perf_counter() - start:.0f} s, {len(v)} images)", flush=True)  # fmt: skip
    exact, ode = list(values.values())[0], list(values.values())[2]
    d = ode - exact
    print(f"ODE - exact bound: {d.mean().item():+.4f} +- {d.std().item() / len(d) ** 0.5:.4f}")


if __name__ == "__main__":
    main()
