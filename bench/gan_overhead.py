"""Lightning's overhead on a GAN step: genlab's ``GANModule`` under ``lightning.Trainer``
against a plain PyTorch loop with the same networks, losses and optimizers, in one run.

Both train the DCGAN preset (``conf/model/gan.yaml``, composed with Hydra) on 28x28 grey
images at batch 64: a discriminator step (non-saturating BCE), a generator step, and the EMA
update of the generator per batch. The data are uint8 tensors in memory, converted to [-1, 1]
per batch in both loops (genlab does it in the DataModule's ``on_after_batch_transfer``).
genlab runs with no logger, checkpoints, progress bar or evaluation callbacks, so the figure is
the cost of the Lightning loop itself. Steps after a warm-up are timed; rounds are interleaved
(genlab, plain, genlab, ...) and the median images/s is reported.

Run: ``python bench/gan_overhead.py [--steps 300] [--rounds 3] [--mnist DIR]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from genlab.data import to_model
from genlab.data.datamodules import ImageDataModule
from genlab.utils import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
BATCH = 64


class TensorData(ImageDataModule):
    name = "bench"

    def __init__(self, images: torch.Tensor):
        super().__init__(image_size=28, channels=1, num_classes=10, batch_size=BATCH)
        self.images = images

    def read_split(self, split):
        return self.images, torch.zeros(len(self.images), dtype=torch.long)


def build_model():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=gan", "data=mnist"])
    return instantiate(cfg.model)


class Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def on_train_batch_end(self, trainer, *args):
        self.steps += 1
        if self.steps == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def run_genlab(images: torch.Tensor, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model, timer = build_model(), Timer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=TensorData(images))
    return (steps - warmup) * BATCH / (timer.t1 - timer.t0)


def run_plain(images: torch.Tensor, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    module = build_model()
    g, d = module.generator, module.discriminator
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loader = torch.utils.data.DataLoader(images, batch_size=BATCH, shuffle=True, drop_last=True)
    step, t0 = 0, None
    while step < steps:
        for batch in loader:
            real = to_model(batch)
            z = torch.randn(BATCH, g.z_dim)
            with torch.no_grad():
                fake = g(z)
            loss_d = F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d.requires_grad_(False)
            loss_g = F.softplus(-d(g(torch.randn(BATCH, g.z_dim)))).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            d.requires_grad_(True)
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(g.parameters()), 1e-3)
                for b_ema, b in zip(ema.buffers(), g.buffers()):
                    b_ema.copy_(b)
            step += 1
            if step == warmup:
                t0 = time.perf_counter()
            if step >= steps:
                break
    return (steps - warmup) * BATCH / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "gan_overhead.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    images = torch.randint(0, 256, (BATCH * 100, 1, 28, 28), dtype=torch.uint8)
    rates: dict[str, list[float]] = {"genlab (Lightning)": [], "plain PyTorch": []}
    for r in range(args.rounds):
        for name, fn in (("genlab (Lightning)", run_genlab), ("plain PyTorch", run_plain)):
            rates[name].append(fn(images, args.steps, args.warmup))
            print(f"round {r} {name:20s} {rates[name][-1]:8.1f} img/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    overhead = med["plain PyTorch"] / med["genlab (Lightning)"] - 1
    report = {
        "batch": BATCH,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "images_per_s_median": med,
        "all_rounds": rates,
        "lightning_overhead": overhead,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
    }
    print(json.dumps(report, indent=2))
    print(
        f"\nDCGAN step (D + G + EMA), batch {BATCH}, 28x28: genlab {med['genlab (Lightning)']:.0f} "
        f"img/s, plain PyTorch {med['plain PyTorch']:.0f} img/s: Lightning overhead "
        f"{100 * overhead:+.1f}%"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
