"""CPU training throughput of genlab's default diffusion denoiser against two peer UNets.

Measures, in one run on this machine:

* the fp32 matmul peak (best of several 2048x2048 matmuls, GFLOP/s), as a yardstick;
* for three denoisers at 28x28, 1 channel and the same batch size, the time of a full training
  step (noising, forward, eps-MSE loss, backward, AdamW step) with warm-up steps excluded, and
  the FLOPs of one step counted by ``torch.utils.flop_counter.FlopCounterMode``:

  - ``genlab``: the default diffusion preset (``conf/model/diffusion.yaml``, composed with Hydra
    so the benchmark always follows the preset), stepped via ``DiffusionModule.diffusion_loss``;
  - ``diffusers``: ``UNet2DModel`` at the closest size (16/32/64 channels, one res block per
    level, attention at 7x7 and in the middle, GroupNorm);
  - ``ddpm-pytorch``: ``denoising_diffusion_pytorch.Unet(dim=16, dim_mults=(1, 2, 4))``.

genlab's step leaves out its EMA update and LR warm-up, which the peers do not have either; the
FLOP count covers matmuls, convolutions and attention (forward and backward), not elementwise
ops or the optimizer. Models are timed in interleaved rounds (genlab, diffusers, ddpm-pytorch,
genlab, ...) because the machine may be shared; the table reports the median images/s over
rounds, and the matmul peak is the best over rounds.

Run: ``python bench/train_throughput.py`` (``--help`` for options; needs the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

torch.manual_seed(0)

StepFn = Callable[[], None]


@dataclass
class Entry:
    name: str
    image_size: int
    batch: int
    params: int
    step: StepFn = field(repr=False)
    flops_per_step: float = 0.0
    images_per_s: list[float] = field(default_factory=list)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of ``repeats`` (n x n) @ (n x n) matmuls after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _alphas_bar(num_timesteps: int = 1000) -> torch.Tensor:
    """Linear beta schedule of DDPM, used to noise the peers' inputs."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, num_timesteps), 0)


def peer_step(net: nn.Module, x: torch.Tensor, forward: Callable) -> StepFn:
    """Training step for a peer: noise x, predict eps with ``forward(net, x_t, t)``, MSE."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    alphas_bar = _alphas_bar()

    def step() -> None:
        t = torch.randint(0, len(alphas_bar), (x.shape[0],))
        noise = torch.randn_like(x)
        ab = alphas_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x + (1 - ab).sqrt() * noise
        loss = F.mse_loss(forward(net, x_t, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def build_genlab(batch: int) -> Entry:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from genlab.utils import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=mnist"], return_hydra_config=False)
    module = instantiate(cfg.model)
    module.train()
    size = int(cfg.data.image_size)
    x = torch.rand(batch, int(cfg.data.channels), size, size) * 2 - 1
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-3)

    def step() -> None:
        loss = module.diffusion_loss(x, None).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Entry("genlab", size, batch, _count(module.net), step)


def build_diffusers(batch: int) -> Entry:
    from diffusers import UNet2DModel

    net = UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,  # 4 heads at 64 channels, as genlab's num_heads=4
        dropout=0.1,
    ).train()
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    step = peer_step(net, x, lambda m, x_t, t: m(x_t, t).sample)
    return Entry("diffusers", 28, batch, _count(net), step)


def build_ddpm_pytorch(batch: int) -> Entry:
    from denoising_diffusion_pytorch import Unet

    net = Unet(dim=16, dim_mults=(1, 2, 4), channels=1, dropout=0.1).train()
    size = 28 if 28 % net.downsample_factor == 0 else 32  # it needs sides divisible by 2^levels
    x = torch.rand(batch, 1, size, size) * 2 - 1
    step = peer_step(net, x, lambda m, x_t, t: m(x_t, t))
    return Entry("ddpm-pytorch", size, batch, _count(net), step)


def _count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_flops(step: StepFn) -> float:
    """FLOPs of one training step (matmuls, convolutions, attention; forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def time_round(entry: Entry, steps: int, warmup: int) -> float:
    """Images/s over ``steps`` training steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        entry.step()
    start = time.perf_counter()
    for _ in range(steps):
        entry.step()
    return entry.batch * steps / (time.perf_counter() - start)


def print_table(entries: list[Entry], peak: float, rounds: int) -> list[dict]:
    ref = statistics.median(entries[0].images_per_s)
    rows = []
    for e in entries:
        ips = statistics.median(e.images_per_s)
        name = e.name if e.image_size == 28 else f"{e.name} ({e.image_size}x{e.image_size})"
        gflop_img = e.flops_per_step / 1e9 / e.batch
        achieved = gflop_img * ips
        rows.append(
            {
                "name": name,
                "image_size": e.image_size,
                "params": e.params,
                "gflop_per_image": gflop_img,
                "images_per_s": ips,
                "images_per_s_rounds": e.images_per_s,
                "achieved_gflops": achieved,
                "fraction_of_peak": achieved / peak,
                "genlab_speedup": ref / ips,
            }
        )
    head = (
        f"{'model':<22}{'params':>10}{'GFLOP/img':>11}{'img/s':>9}"
        f"{'GFLOP/s':>9}{'of peak':>9}{'genlab x':>10}"
    )
    print(f"\nimages/s: median of {rounds} interleaved round(s); GFLOP/img: train step (fwd+bwd)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<22}{r['params']:>10,}{r['gflop_per_image']:>11.4f}"
            f"{r['images_per_s']:>9.1f}{r['achieved_gflops']:>9.2f}"
            f"{r['fraction_of_peak']:>9.1%}{r['genlab_speedup']:>10.2f}"
        )
    print("genlab x = genlab images/s / this model's images/s (>1: genlab is faster)")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")

    entries = [build_genlab(args.batch_size)]
    for build in (build_diffusers, build_ddpm_pytorch):
        try:
            entries.append(build(args.batch_size))
        except ImportError as err:  # the peer's package is not installed
            print(f"skipped {build.__name__.removeprefix('build_').replace('_', '-')}: {err}")
    for e in entries:
        e.flops_per_step = count_flops(e.step)
        if e.image_size != 28:
            print(f"note: {e.name} runs at {e.image_size}x{e.image_size} (28 not supported)")

    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_peak_gflops())
        for e in entries:
            e.images_per_s.append(time_round(e, args.steps, args.warmup))
        line = ", ".join(f"{e.name} {e.images_per_s[-1]:.1f}" for e in entries)
        print(f"round {r + 1}: matmul {peaks[-1]:.1f} GFLOP/s; img/s: {line}")
    peak = max(peaks)
    print(f"fp32 matmul peak (best 2048^3 matmul over all rounds): {peak:.1f} GFLOP/s")
    rows = print_table(entries, peak, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "matmul_peak_gflops": peak, "models": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
