"""Train the noise-aware digit classifier that ``guidance=classifier`` uses:

    python -m genlab.guidance.train_classifier data_dir=<dir with MNIST/raw> [epochs=2] [width=16]
        [out=<file>] [limit=<images>]

Each training image is noised to x_t = sqrt(a) x0 + sqrt(1 - a) eps at a noise level drawn
from a diffusion schedule (half the batch from the cosine schedule, half from the linear one,
t uniform, as diffusion training draws them) and the classifier learns p(y | x_t, log-SNR)
with cross-entropy (Dhariwal & Nichol 2021). Random shifts of up to 2 pixels augment x0.
Seeded (0). The file holds the config, the weights and the MNIST test accuracy per noise level.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from genlab.data import MNISTDataModule, to_model
from genlab.diffusion.schedules import CosineSchedule, LinearSchedule
from genlab.fit_loop import epoch_batches, fit, steps_per_epoch
from genlab.guidance.classifier import WEIGHTS, NoisyClassifier
from genlab.metrics.train_digits import random_shift
from genlab.runs import atomic_torch_save

SCHEDULES = (CosineSchedule(1000), LinearSchedule(1000))
REPORT_LOG_SNR = (-8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0)  # test accuracy at these noise levels


def noisy_batch(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, log-SNR) for a batch: half its noise levels from each schedule, t uniform."""
    b = x0.shape[0]
    log_snr = torch.empty(b)
    for i, schedule in enumerate(SCHEDULES):
        part = slice(i * b // len(SCHEDULES), (i + 1) * b // len(SCHEDULES))
        t = torch.randint(0, schedule.num_timesteps, (part.stop - part.start,), generator=generator)
        log_snr[part] = schedule.log_snr(t).float()
    return noise_at(x0, log_snr, generator), log_snr


def noise_at(x0: torch.Tensor, log_snr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    a = torch.sigmoid(log_snr)[:, None, None, None]  # a / (1 - a) = exp(log-SNR)
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator)


@torch.no_grad()
def accuracy_at(net, images, labels, log_snr: float, seed: int = 1) -> float:
    g = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(images), 1000):
        x0 = to_model(images[i : i + 1000])
        level = torch.full((len(x0),), log_snr)
        logits = net(noise_at(x0, level, g), level)
        correct += int((logits.argmax(1) == labels[i : i + 1000]).sum())
    return correct / len(images)


def train(
    data_dir: str,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    limit: int | None = None,
    width: int = 16,
) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dm = MNISTDataModule(root=data_dir, download=False, cache_dir=None)
    train_x, train_y = dm.read_split("train")
    test_x, test_y = dm.read_split("test")
    if limit:
        train_x, train_y, test_x, test_y = (train_x[:limit], train_y[:limit], test_x[:limit],
                                            test_y[:limit])  # fmt: skip
    net = NoisyClassifier(channels=1, num_classes=10, width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * steps_per_epoch(len(train_x), batch_size, drop_last=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x0 = random_shift(to_model(train_x[idx]), 2, g)
        x_t, log_snr = noisy_batch(x0, g)
        return F.cross_entropy(net(x_t, log_snr), train_y[idx])

    batches = epoch_batches(len(train_x), batch_size, epochs, g, drop_last=False)
    fit(loss_of, batches, opt, sched, steps=steps, desc="noise-aware classifier")
    net.eval()
    return {
        "config": net.config,
        "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "test_accuracy_at_log_snr": {
            str(level): accuracy_at(net, test_x, test_y, level) for level in REPORT_LOG_SNR
        },
        "epochs": epochs,
        "train_images": len(train_x),
        "train_s": time.perf_counter() - start,
        "noise_levels": "t uniform on CosineSchedule(1000) and LinearSchedule(1000), half each",
    }


def main(argv: list[str] | None = None) -> dict:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    blob = train(
        str(args.get("data_dir", "data")),
        epochs=int(args.get("epochs", 2)),
        limit=args.get("limit"),
        width=int(args.get("width", 16)),
    )
    out = Path(args.get("out") or WEIGHTS)
    atomic_torch_save(blob, out)
    accs = ", ".join(f"{k}: {v:.3f}" for k, v in blob["test_accuracy_at_log_snr"].items())
    print(f"test accuracy by log-SNR {{{accs}}}; {blob['train_s']:.0f} s; wrote {out}")
    return blob


if __name__ == "__main__":
    main()
