"""Train the face encoder behind ``val/fd_faces`` and write its weights to
``genlab/metrics/weights/faces.pt`` (a plain state dict of ``FaceNet``) with their provenance in
``faces.json`` beside them:

    python -m genlab.metrics.train_faces data_dir=<dir holding img_align_celeba> \
        [steps=900] [batch=128] [seed=0] [out=<file.pt>] [cache_dir=<dir>]

SimCLR (Chen et al. 2020): two augmented views of each train image, a projection head on the
256-d embedding, and the NT-Xent loss (their Eq. 1) at temperature 0.2. The head is used only
in training and not saved. Images come through ``genlab.data.CelebADataModule`` with the
preprocessing of ``conf/data/celeba.yaml`` (centre crop 0.8, 64x64), exactly what the evaluator
compares. The views differ by random resized crop (scale 0.5-1), horizontal flip, colour
jitter and rare greyscale; there is deliberately no blur or noise augmentation, since SimCLR
learns invariance to its augmentations and FD must see blur and noise.

Seeded; deterministic on a given machine and thread count (2 threads).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torchvision.transforms import v2

from genlab.data import CelebADataModule, to_model
from genlab.fit_loop import epoch_batches, fit, steps_per_epoch
from genlab.metrics.faces import FEATURE_DIM, IMAGE_SIZE, WEIGHTS, FaceNet
from genlab.runs import atomic_torch_save, atomic_write_text

CROP = 0.8  # conf/data/celeba.yaml
VAL_FRACTION = 0.05


def augmentation() -> v2.Compose:
    """One SimCLR view of a uint8 (3, 64, 64) image, uint8 out (draws from torch's global RNG)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.3, 0.05)], p=0.8),
            v2.RandomGrayscale(p=0.1),
        ]
    )


def projection_head() -> nn.Module:
    """The SimCLR projection g(h): 256 -> 256 -> 128, used only for the loss."""
    return nn.Sequential(
        nn.Linear(FEATURE_DIM, FEATURE_DIM, bias=False),
        nn.BatchNorm1d(FEATURE_DIM),
        nn.ReLU(inplace=True),
        nn.Linear(FEATURE_DIM, 128),
    )


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, Eq. 1) over the 2B projections z1, z2 (B, D): each view's
    positive is the other view of its image, the other 2B - 2 views are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = len(z1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(logits, targets)


def load_faces(data_dir: str, cache_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 (N, 3, 64, 64) through CelebADataModule, as conf/data/celeba.yaml."""
    dm = CelebADataModule(
        root=data_dir,
        image_size=IMAGE_SIZE,
        crop=CROP,
        val_fraction=VAL_FRACTION,
        cache_dir=cache_dir,
        download=False,
    )
    return dm.load_split("train").tensors[0], dm.load_split("val").tensors[0]


def train(
    images: torch.Tensor,
    steps: int = 900,
    batch_size: int = 128,
    lr: float = 2e-3,
    temperature: float = 0.2,
    seed: int = 0,
) -> tuple[FaceNet, list[float], float]:
    """SimCLR on uint8 (N, 3, H, W) ``images``: (the encoder in eval mode, losses, seconds)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    net, head = FaceNet(), projection_head()
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    aug = augmentation()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        batch = images[idx]
        views = [torch.stack([aug(im) for im in batch]) for _ in range(2)]
        h = net.features(to_model(torch.cat(views)))
        z = head(h)
        return nt_xent(z[: len(idx)], z[len(idx) :], temperature)

    epochs = math.ceil(steps / steps_per_epoch(len(images), batch_size))
    batches = itertools.islice(epoch_batches(len(images), batch_size, epochs, g), steps)
    net.train()
    head.train()
    start = time.time()
    losses = fit(loss_of, batches, opt, sched, steps=steps, desc="faces")
    return net.eval(), losses, time.time() - start


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = OmegaConf.from_dotlist(argv)
    torch.set_num_threads(int(args.get("threads", 2)))
    start = time.time()
    data_dir = str(args.get("data_dir", "data"))
    train_x, val_x = load_faces(data_dir, args.get("cache_dir"))
    steps, batch = int(args.get("steps", 900)), int(args.get("batch", 128))
    temperature = float(args.get("temperature", 0.2))
    net, losses, train_seconds = train(
        train_x, steps, batch, float(args.get("lr", 2e-3)), temperature, int(args.get("seed", 0))
    )
    out_path = Path(args.get("out") or WEIGHTS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({k: v.detach().clone() for k, v in net.state_dict().items()}, out_path)
    tail = losses[-50:]
    provenance = {
        "command": "python -m genlab.metrics.train_faces " + shlex.join(argv),
        "method": f"SimCLR NT-Xent, temperature {temperature}, AdamW + OneCycle lr "
        f"{float(args.get('lr', 2e-3))}; projection head 256-256-128 not saved",
        "augmentation": repr(augmentation()).replace("\n", " "),
        "data": {
            "dataset": "CelebA img_align_celeba (genlab.data.CelebADataModule)",
            "data_dir": data_dir,
            "train_images": len(train_x),
            "val_images": len(val_x),
            "preprocessing": f"centre square crop {CROP} of the shorter side, resize to "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}; val = last {VAL_FRACTION:.0%} of files (no partition "
            "file) or list_eval_partition.txt",
        },
        "steps": steps,
        "batch": min(batch, len(train_x)),
        "seed": int(args.get("seed", 0)),
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - start, 1),
        "final_loss": losses[-1],
        "final_loss_mean_last_50": sum(tail) / len(tail),
        "first_loss": losses[0],
        "torch": torch.__version__,
        "weights": out_path.name,
        "sha256": hashlib.sha256(out_path.read_bytes()).hexdigest(),
    }
    json_path = out_path.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(provenance, indent=2) + "\n")
    mean_tail = provenance["final_loss_mean_last_50"]
    print(
        f"final loss {losses[-1]:.4f} (mean of the last {len(tail)}: {mean_tail:.4f}); "
        f"{train_seconds:.0f} s; wrote {out_path} and {json_path}"
    )
    return provenance


if __name__ == "__main__":
    main()
