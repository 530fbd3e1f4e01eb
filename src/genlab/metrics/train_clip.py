"""Train genlab's domain CLIP for digits and write it as an open_clip model folder:

    python -m genlab.metrics.train_clip data_dir=<dir with MNIST/raw> [epochs=4] [out=<dir>]

Pretrained CLIP weights are a download away for users who are online; a user studying digits
needs none. This trains open_clip's own ``CLIP`` model class, in a small configuration
(``MODEL_CFG``: a 3-layer ViT on 7x7 patches of the 28x28 digit, a 2-layer text transformer
with open_clip's BPE tokenizer), with open_clip's own contrastive loss (``ClipLoss``) on MNIST
training images paired with templated captions ("a handwritten seven", "the digit 7", ...).
The folder (default ``genlab/metrics/weights/digits_clip``: ``open_clip_config.json``, fp16
``open_clip_model.safetensors`` and ``results.json``) loads through the same path as any
open_clip folder: ``metrics.clip.model=genlab-digits`` or ``local-dir:<dir>``.

``results.json`` reports zero-shot accuracy on the MNIST test split, with the training
templates and with templates never seen in training (``HELD_OUT_TEMPLATES``). Seeded (0).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import open_clip
import torch
from omegaconf import OmegaConf

from genlab.data import MNISTDataModule, to_model
from genlab.fit_loop import fit, random_batches
from genlab.metrics.train_digits import random_shift
from genlab.runs import atomic_file, atomic_write_text

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = [
    "a handwritten {word}",
    "the digit {digit}",
    "a photo of the number {word}",
    "an image of the digit {word}",
    "a {word}",
    "the number {digit}",
    "a drawing of a {digit}",
    "a handwritten digit {word}",
    "the numeral {digit}",
    "a picture of a {word}",
]
HELD_OUT_TEMPLATES = [  # never seen in training: the zero-shot check
    "a scan of the numeral {word}",
    "this is a {digit}",
    "a black and white picture of the digit {word}",
    "number {word}",
]
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {
        "image_size": 28,
        "patch_size": 7,
        "width": 96,
        "layers": 3,
        "head_width": 32,
        "mlp_ratio": 2.0,
    },  # fmt: skip
    "text_cfg": {
        "context_length": 16,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
    },  # fmt: skip
}
# images in [-1, 1] are what genlab's CLIPScore feeds after (x + 1) / 2 and this mean/std
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # fmt: skip
DEFAULT_OUT = Path(__file__).parent / "weights" / "digits_clip"


def captions(templates: list[str], label: int) -> list[str]:
    return [t.format(word=WORDS[label], digit=label) for t in templates]


def build() -> tuple[torch.nn.Module, object]:
    model = open_clip.CLIP(**MODEL_CFG)
    tokenizer = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    return model, tokenizer


def as_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def class_embeddings(model, tokenizer, templates: list[str]) -> torch.Tensor:
    """(10, D): each digit's mean normalised text embedding over the templates, normalised."""
    rows = []
    for label in range(10):
        text = model.encode_text(tokenizer(captions(templates, label)), normalize=True)
        rows.append(torch.nn.functional.normalize(text.mean(0), dim=0))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images, labels, templates) -> float:
    """Fraction of images whose most similar class embedding is their label."""
    model.eval()
    classes = class_embeddings(model, tokenizer, templates)
    correct = 0
    for i in range(0, len(images), 1000):
        feats = model.encode_image(as_rgb(images[i : i + 1000]), normalize=True)
        correct += int(((feats @ classes.T).argmax(1) == labels[i : i + 1000]).sum())
    return correct / len(images)


def train(images, labels, epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, tokenizer = build()
    tokens = torch.stack([tokenizer(captions(TRAIN_TEMPLATES, k)) for k in range(10)])  # (10,T,L)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = random_shift(images[idx], 2, g)
        which = torch.randint(0, len(TRAIN_TEMPLATES), (batch_size,), generator=g)
        img_f, txt_f, scale = model(as_rgb(x), tokens[labels[idx], which])[:3]
        return loss_fn(img_f, txt_f, scale)

    @torch.no_grad()
    def clamp_scale() -> None:
        model.logit_scale.clamp_(0, math.log(100))

    model.train()
    batches = random_batches(len(images), batch_size, steps, g)
    fit(loss_of, batches, opt, sched, steps=steps, desc="clip", after_step=clamp_scale)
    return model.eval(), tokenizer, steps


def save(model, out: Path, results: dict) -> Path:
    """Each file of the folder appears complete or not at all (weights first, results last)."""
    from safetensors.torch import save

    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(out / "open_clip_model.safetensors") as f:
        f.write(save(state))
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    atomic_write_text(out / "open_clip_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    if "data_dir" not in args:
        raise SystemExit("usage: python -m genlab.metrics.train_clip data_dir=<dir with MNIST/raw> "
                         "[epochs=4] [out=<dir>] [limit=N]")  # fmt: skip
    dm = MNISTDataModule(root=args.data_dir, download=False, cache_dir=None)
    train_u8, train_y = dm.read_split("train")
    test_u8, test_y = dm.read_split("test")
    if args.get("limit"):
        train_u8, train_y = train_u8[: int(args.limit)], train_y[: int(args.limit)]
    start = time.time()
    model, tokenizer, steps = train(to_model(train_u8), train_y, int(args.get("epochs", 4)))
    test = to_model(test_u8)
    results = {
        "zero_shot_accuracy_train_templates": zero_shot_accuracy(
            model, tokenizer, test, test_y, TRAIN_TEMPLATES
        ),
        "zero_shot_accuracy_held_out_templates": zero_shot_accuracy(
            model, tokenizer, test, test_y, HELD_OUT_TEMPLATES
        ),
        "held_out_templates": HELD_OUT_TEMPLATES,
        "train_templates": TRAIN_TEMPLATES,
        "train_images": len(train_u8),
        "test_images": len(test_u8),
        "steps": steps,
        "train_seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    out = save(model, Path(args.get("out") or DEFAULT_OUT), results)
    print(json.dumps({k: v for k, v in results.items() if "templates" not in k or "acc" in k}))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
