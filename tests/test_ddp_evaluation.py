"""Evaluation shared across ranks (issue 18, item 15): every rank samples its block of the
sample indices and its share of the bits/dim batches, the features are gathered and rank 0
computes the metrics once; the numbers for a seed are those of one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate

from genlab.evaluation import evaluate_model
from genlab.metrics.evaluator import Evaluator
from genlab.metrics.ranks import Ranks

from .conftest import REPO, TINY_METRICS, compose_cfg, run_cli

N = 13
EVAL = dict(
    metrics=["fid", "kid", "pr", "bpd", "cost"],
    extractors=["digits"],
    digit_datasets=["synthetic"],
    num_samples=N,
    reference_samples=32,
    kid_subset_size=6,
    kid_subsets=5,
    bpd_images=10,
    progress=False,
)
# sample_batch_size, bpd_batch_size: 4 chunks (2 a rank: 8 and 5 samples) and 3 bits/dim
# batches (1 and 2); one chunk (rank 0 draws nothing) and one batch (rank 0 has none)
SPLITS = {"shared": (4, 4), "one_chunk": (16, 16)}


def test_shares_cover_the_indices_once_in_rank_order():
    for n, world in [(13, 2), (5, 4), (4, 4), (100, 3), (2, 3)]:
        shares = [Ranks(r, world).share(n) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # whole chunks: 13 samples in chunks of 4 are 4 chunks, 2 a rank: 8 and 5 samples
    assert [Ranks(r, 2).share_chunks(13, 4) for r in range(2)] == [range(0, 8), range(8, 13)]
    # fewer chunks than ranks: a rank draws nothing
    assert [len(Ranks(r, 2).share_chunks(13, 16)) for r in range(2)] == [0, 13]
    one = Ranks()
    rows = torch.arange(6.0).view(3, 2)
    assert torch.equal(one.gather(rows), rows) and one.gather_object(5) == [5]
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        Ranks(2, 2)


def _build(tmp: Path):
    cfg = compose_cfg(["data=synthetic", "model=diffusion", "model.sampler.steps=3"], tmp)
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    with torch.no_grad():  # zero-initialised output layers would make every sample alike
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, instantiate(cfg.data)


def _evaluate(rank: int, world: int, tmp: str, port: int, split: str) -> None:
    """One process of a ``world``-process evaluation; rank 0 writes what it returned."""
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, datamodule = _build(Path(tmp) / f"rank{rank}")
        ranks = Ranks.current("cpu")
        assert ranks.world == world and ranks.rank == rank
        batch, bpd_batch = SPLITS[split]
        ev = Evaluator(**EVAL, sample_batch_size=batch, bpd_batch_size=bpd_batch)
        metrics, protocol = evaluate_model(ev, model, datamodule, ranks=ranks)
        out = {"metrics": metrics, "protocol": protocol}
        (Path(tmp) / f"world{world}-rank{rank}.json").write_text(json.dumps(out, default=str))
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_two_gloo_processes_give_the_one_process_metrics(split, tmp_path):
    """Bit for bit: each rank's sample and extractor calls see the batches one process gives
    them, and the gathered features are in index order."""
    _evaluate(0, 1, str(tmp_path), 0, split)
    port = 29500 + (os.getpid() + len(split)) % 1000
    mp.spawn(_evaluate, args=(2, str(tmp_path), port, split), nprocs=2, join=True)
    one = json.loads((tmp_path / "world1-rank0.json").read_text())
    two = [json.loads((tmp_path / f"world2-rank{r}.json").read_text()) for r in range(2)]
    assert two[0]["metrics"] == two[1]["metrics"]  # every rank returns rank 0's numbers
    quality = {k for k in one["metrics"] if k != "val/sample_img_per_s"}
    assert {"val/fd_digits", "val/kid_digits_mean", "val/bpd", "val/sample_nfe"} <= quality
    for key in sorted(quality):
        a, b = one["metrics"][key], two[0]["metrics"][key]
        assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), (key, a, b)
    assert two[0]["protocol"]["ranks"]["processes"] == 2 and "ranks" not in one["protocol"]
    assert two[0]["protocol"]["num_samples"] == N
    assert two[0]["protocol"]["extractors"]["digits"]["kid_subset_size"] == 6


DDP = [
    "data=synthetic",
    "data.num_samples=64",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "~callbacks.sample_grid",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.max_steps=2",
    "model.sampler.steps=3",
    *TINY_METRICS,
    "metrics.num_samples=13",
    "metrics.kid_subset_size=6",
    "+metrics.progress=false",
]


@pytest.mark.slow
def test_a_ddp_runs_final_evaluation_equals_a_one_process_evaluation(tmp_path):
    """Through the trainer: the evaluation a 2-process ``trainer=ddp_cpu`` run records at its
    end equals ``python -m genlab.evaluate`` of its last checkpoint in one process."""
    run = tmp_path / "run"
    run_cli(["model=diffusion", "trainer=ddp_cpu", *DDP, f"hydra.run.dir={run}"], cwd=REPO)
    rows = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and rows[0]["protocol"]["ranks"]["processes"] == 2
    run_cli([f"run_dir={run}", "device=cpu"], cwd=REPO, module="genlab.evaluate")
    again = json.loads((run / "summary.json").read_text())["evaluations"][-1]
    assert "ranks" not in again["protocol"]
    for key, value in rows[0]["metrics"].items():
        if key != "val/sample_img_per_s":
            assert abs(again["metrics"][key] - value) <= 1e-6 * max(1.0, abs(value)), key
