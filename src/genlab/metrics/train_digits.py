"""Train the digit classifier behind ``val/fd_digits`` and ``val/is_digits`` and write its weights
(with the MNIST test accuracy) to ``genlab/metrics/weights/digits.pt``:

    python -m genlab.metrics.train_digits data_dir=<dir with MNIST/raw> [epochs=3] [out=<file>]

Deterministic on a given machine (seed 0). Train split only; the test split measures accuracy.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from genlab.data import MNISTDataModule, to_model
from genlab.fit_loop import epoch_batches, fit, steps_per_epoch
from genlab.metrics.digits import WEIGHTS, DigitNet
from genlab.runs import atomic_torch_save


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero = background -1 padding)."""
    b = x.shape[0]
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


@torch.no_grad()
def accuracy(net: DigitNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        correct += (
            (net(to_model(images[i : i + 1000])).argmax(1) == labels[i : i + 1000]).sum().item()
        )
    return correct / len(images)


def train(data_dir: str, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dm = MNISTDataModule(root=data_dir, download=False, cache_dir=None)
    train_x, train_y = dm.load_split("train").tensors
    test_x, test_y = dm.load_split("val").tensors
    net = DigitNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * steps_per_epoch(len(train_x), batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.time()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = random_shift(to_model(train_x[idx]), 2, g)
        return F.cross_entropy(net(x), train_y[idx])

    net.train()
    batches = epoch_batches(len(train_x), batch_size, epochs, g)
    fit(loss_of, batches, opt, sched, steps=steps, desc="digits")
    acc = accuracy(net, test_x, test_y)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return {
        "state_dict": net.state_dict(),
        "test_accuracy": acc,
        "epochs": epochs,
        "train_seconds": time.time() - start,
        "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
    }


def main(argv: list[str] | None = None) -> dict:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    blob = train(str(args.get("data_dir", "data")), int(args.get("epochs", 3)))
    out_path = Path(args.get("out") or WEIGHTS)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(blob, out_path)
    print(f"test accuracy {blob['test_accuracy']:.4f}; wrote {out_path}")
    return blob


if __name__ == "__main__":
    main()
