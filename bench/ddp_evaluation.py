"""Wall time of one evaluation shared by 1 and 2 processes (gloo, CPU), and that the numbers
are the same.

The same model (the ``model=diffusion`` preset on ``data=synthetic``, its weights perturbed
from their zero-initialised output layers with a fixed seed so that samples differ) is
evaluated with ``genlab.evaluation.evaluate_model``: ``--n`` samples, DDIM ``--steps``, digit
features, bits/dim of ``--bpd-images`` validation images. Runs:

* ``1 process, T threads``: the peer, what a single process does with the whole machine;
* ``1 process, 1 thread``: one core's rate;
* ``2 processes, 1 thread each``: ``Ranks`` over a gloo group, each sampling its chunks.

It prints wall time, images/s of sampling and the speed-up of 2 processes over each
one-process run, and the largest difference of any metric from the one-process one. On a
machine with 2 cores the 2-process run has no more cores than the T-thread peer: what it
shows there is the cost of sharing (gather, broadcast); with one GPU a rank, the sampling
time falls with the ranks.

Run: ``python bench/ddp_evaluation.py`` (about 2 minutes here).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def evaluate(rank: int, world: int, threads: int, args: dict, out: str, port: int) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from genlab.evaluation import evaluate_model
    from genlab.metrics.evaluator import Evaluator
    from genlab.metrics.ranks import Ranks
    from genlab.utils import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            [
                "data=synthetic",
                "model=diffusion",
                f"model.sampler.steps={args['steps']}",
                f"paths.output_dir={out}",
                f"paths.data_dir={out}/data",
            ],  # fmt: skip
        )
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    datamodule = instantiate(cfg.data)
    ev = Evaluator(
        metrics=["fid", "kid", "pr", "bpd", "cost"], extractors=["digits"],
        digit_datasets=["synthetic"], num_samples=args["n"], sample_batch_size=args["batch"],
        reference_samples=256, kid_subset_size=50, bpd_images=args["bpd_images"],
        bpd_batch_size=32, progress=False,
    )  # fmt: skip
    ranks = Ranks.current("cpu")
    ev.reference(ev.setup("synthetic")[0], datamodule)  # reference statistics: not timed
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    metrics, _ = evaluate_model(ev, model, datamodule, ranks=ranks)
    wall = time.perf_counter() - start
    if rank == 0:
        Path(out, f"w{world}t{threads}.json").write_text(json.dumps({"wall_s": wall, **metrics}))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="samples")
    parser.add_argument("--batch", type=int, default=32, help="sample_batch_size")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--bpd-images", type=int, default=64)
    parser.add_argument("--out", default="bench/results/ddp_evaluation.json")
    a = parser.parse_args()
    args = {"n": a.n, "batch": a.batch, "steps": a.steps, "bpd_images": a.bpd_images}
    cores = os.cpu_count() or 1
    runs = [(1, cores), (1, 1), (2, max(1, cores // 2))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in runs:
            port = 29400 + os.getpid() % 500 + world
            mp.spawn(evaluate, args=(world, threads, args, tmp, port), nprocs=world, join=True)
            results[f"{world} process(es), {threads} thread(s) each"] = json.loads(
                Path(tmp, f"w{world}t{threads}.json").read_text()
            )
    peer, one_core, two = results.values()
    diff = max(abs(two[k] - peer[k]) for k in peer if k not in ("wall_s", "val/sample_img_per_s"))
    print(f"{a.n} samples, DDIM-{a.steps}, batch {a.batch}; {cores} cores")
    print(f"{'run':<36} {'wall s':>8} {'sample img/s':>13}")
    for name, r in results.items():
        print(f"{name:<36} {r['wall_s']:>8.1f} {r['val/sample_img_per_s']:>13.1f}")
    print(f"2 processes vs 1 process, {cores} threads: x{peer['wall_s'] / two['wall_s']:.2f} "
          f"wall; vs 1 process, 1 thread: x{one_core['wall_s'] / two['wall_s']:.2f}")  # fmt: skip
    print(f"largest metric difference, 2 processes vs 1: {diff:.3g}")
    record = {"args": args, "cores": cores, "runs": results, "max_metric_diff": diff,
              "command": "python bench/ddp_evaluation.py"}  # fmt: skip
    Path(a.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
