"""Parameters, FLOPs per image and CPU training throughput: the default UNet against the DiT.

The peer is the default denoising UNet (``conf/model/net/unet.yaml``); the DiTs are
``conf/model/net/dit.yaml`` (the tiny CPU DiT) and ``dit_s.yaml`` / ``dit_b.yaml`` (the paper's
DiT-S/2 and DiT-B/2, Peebles & Xie 2023, Table 1). Every net is built from the real config (Hydra
compose of ``model=flow model/net=<net>`` at the given geometry), so the table follows the YAML.

For each input geometry the script prints:

* parameters;
* forward FLOPs per image, by ``genlab.nets.flops.count_flops`` (``FlopCounterMode``: matmuls,
  convolutions, attention; 2 FLOPs per multiply-add);
* measured forward + backward images/s on this CPU (a sum-of-squares loss on the output; warm-up
  iterations excluded; nets timed in interleaved rounds since the machine may be shared, the
  median over rounds), for the small nets only: 28x28x1 at batch 32, 64x64x3 at batch 8 (the
  tiny DiT with patch 4 there, 256 tokens, as the YAML advises for 64x64 pixels) and 16x16x4
  latents at batch 8. DiT-S/2 and DiT-B/2 at 32x32x4 latents (256x256 images through an f8
  autoencoder, the paper's setting) get FLOPs only;
* ratios DiT / UNet of each figure at the same geometry.

Run: ``python bench/flops.py`` (``--rounds``, ``--iters``; writes the table to
``bench/results/flops.txt`` too, ``--out ''`` to only print).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn

from genlab.nets.flops import count_flops
from genlab.utils import compose

RESULTS = Path(__file__).resolve().parent / "results" / "flops.txt"


@dataclass
class Row:
    geometry: str  # e.g. 28x28x1
    net: str
    model: nn.Module = field(repr=False)
    shape: tuple[int, int, int]
    batch: int
    timed: bool
    params: int = 0
    flops: int = 0
    images_per_s: list[float] = field(default_factory=list)


def build(net: str, channels: int, size: int, *extra: str) -> nn.Module:
    """The net of ``model=flow model/net=<net>`` at (channels, size, size), unconditional."""
    overrides = [f"model/net={net}", f"data.channels={channels}", f"data.image_size={size}"]
    cfg = compose("config", ["model=flow", "data=synthetic", *overrides, *extra])
    return instantiate(cfg.model.net)


def inputs(shape: tuple[int, int, int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=g), torch.rand(batch, generator=g) * 1000


def images_per_s(row: Row, iters: int) -> float:
    """Forward + backward images/s over ``iters`` iterations (after one warm-up iteration)."""
    x, t = inputs(row.shape, row.batch)
    row.model.train()

    def step() -> None:
        row.model.zero_grad(set_to_none=True)
        row.model(x, t).square().mean().backward()

    step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * row.batch / (time.perf_counter() - start)


def rows() -> list[Row]:
    out = []
    for geometry, (c, s), batch, nets in (
        ("28x28x1", (1, 28), 32, [("unet", ()), ("dit", ())]),
        ("64x64x3", (3, 64), 8, [("unet", ()), ("dit", ("model.net.patch_size=4",))]),
        ("16x16x4 latent", (4, 16), 8, [("unet", ()), ("dit", ())]),
    ):
        for net, extra in nets:
            name = net if not extra else f"{net} ({extra[0].split('.')[-1]})"
            out.append(Row(geometry, name, build(net, c, s, *extra), (c, s, s), batch, True))
    for net in ("unet", "dit_s", "dit_b"):
        out.append(Row("32x32x4 latent", net, build(net, 4, 32), (4, 32, 32), 2, False))
    for row in out:
        row.params = sum(p.numel() for p in row.model.parameters())
        row.flops = count_flops(row.model, *inputs(row.shape, 2))
    return out


def table(found: list[Row]) -> str:
    lines = [
        "| input | net | batch | params | MFLOPs / image | fwd+bwd img/s | "
        "params / UNet | FLOPs / UNet | img/s / UNet |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peers = {r.geometry: r for r in found if r.net == "unet"}
    for r in found:
        peer = peers[r.geometry]
        speed = statistics.median(r.images_per_s) if r.images_per_s else None
        peer_speed = statistics.median(peer.images_per_s) if peer.images_per_s else None
        cells = [
            r.geometry,
            r.net,
            str(r.batch) if r.timed else "-",
            f"{r.params / 1e6:.2f} M",
            f"{r.flops / 1e6:,.1f}",
            f"{speed:.1f}" if speed else "-",
            f"{r.params / peer.params:.2f}",
            f"{r.flops / peer.flops:.2f}",
            f"{speed / peer_speed:.2f}" if speed and peer_speed else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per round")
    parser.add_argument("--out", default=str(RESULTS), help="also write the table here")
    args = parser.parse_args()
    torch.manual_seed(0)
    found = rows()
    for _ in range(args.rounds):
        for row in found:
            if row.timed:
                row.images_per_s.append(images_per_s(row, args.iters))
    header = (
        f"# python bench/flops.py --rounds {args.rounds} --iters {args.iters}\n"
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; FLOPs by genlab.nets.flops.count_flops"
        " (forward, per image); img/s: forward + backward, median over rounds\n"
    )
    text = header + table(found) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
