"""Training throughput on the GPU path, and model FLOP utilisation against the device's peak.

Composes a real preset (``--experiment``, default ``cifar10_edm``: the 35 M-parameter
CIFAR-10 UNet at batch 512), builds the family and trains it with Lightning's ``Trainer`` on a
fixed in-memory batch (so data loading is not measured), once per variant:

* ``fp32``: 32-bit, eager, torch's default (foreach) AdamW -- the peer every other row is
  compared with, in the same run;
* ``bf16``: ``precision=bf16-mixed`` (what ``trainer=gpu`` sets);
* ``bf16+cl``: and ``model.channels_last=true``;
* ``bf16+cl+fused``: and the fused AdamW genlab picks on CUDA (``fused`` off for the rows
  before, by an explicit ``foreach=True``);
* ``bf16+fused+compile`` / ``bf16+cl+fused+compile``: and ``model.compile=true``
  (torch.compile, inductor; its compile time is reported, not timed).

For each: images/s over ``--steps`` steps after ``--warmup`` steps (one host sync at each end
of the window), model FLOPs per image (forward + backward, ``torch.utils.flop_counter``),
achieved TFLOP/s and MFU against the device's dense bf16 peak (datasheet; ``--peak-tflops``
for a device not in the table) and against a bf16 matrix product measured in the same run.
``--sync-check`` also runs three bare training steps (loss, finite check, backward, optimizer,
EMA) under ``torch.cuda.set_sync_debug_mode("warn")`` and reports the host syncs it saw.

Runs on the CPU too (``--device cpu --tiny``: a small net, for the tests); MFU is then
not reported. GPU figures: docs/results.md, "GPU path".

    python bench/gpu_throughput.py --json bench/results/gpu_throughput.json
    python bench/gpu_throughput.py --device cpu --tiny --steps 2 --warmup 1 --variants fp32,bf16+cl
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.flop_counter import FlopCounterMode

from genlab.families.base import fused_on_cuda
from genlab.utils import CONF_DIR

# dense bf16 tensor-core peak, TFLOP/s (vendor datasheets; SXM parts)
PEAK_BF16 = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0,
             "A10": 125.0, "4090": 165.2, "V100": None}  # fmt: skip
VARIANTS = {
    # name: (precision, channels_last, fused, compile)
    "fp32": ("32-true", False, False, False),
    "bf16": ("bf16-mixed", False, False, False),
    "bf16+cl": ("bf16-mixed", True, False, False),
    "bf16+cl+fused": ("bf16-mixed", True, True, False),
    "bf16+fused+compile": ("bf16-mixed", False, True, True),
    "bf16+cl+fused+compile": ("bf16-mixed", True, True, True),
}
TINY = ["model.net.base_channels=16", "model.net.channel_mult=[1,2]", "model.net.num_res_blocks=1",
        "model.net.attn_resolutions=[]", "data.image_size=16"]  # fmt: skip


class SameBatch(IterableDataset):
    """The same batch for ever (already on the device: nothing to load or copy)."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


class Window(L.Callback):
    """Wall time of steps warmup+1 .. warmup+steps, one synchronisation at each end."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.end = None
        self.first_step_s = None
        self.t0 = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self._sync()
            self.first_step_s = time.perf_counter() - self.t0  # includes compiling
        if trainer.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._sync()
        self.end = time.perf_counter()


def build(experiment: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"experiment={experiment}", *overrides])
    return cfg, instantiate(cfg.model)


def make_batch(cfg, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = int(cfg.data.channels), int(cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, c, s, s, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def flops_per_image(model, x, y) -> float:
    """Forward + backward FLOPs of the training loss, per image (counted in float32)."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss = model.loss(x, model._labels(y, drop=False) if model.num_classes else None).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def matmul_tflops(device, n: int = 8192, reps: int = 10) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def datasheet_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def run_variant(name, args, overrides, device) -> dict:
    precision, channels_last, fused, compiled = VARIANTS[name]
    extra = [f"model.channels_last={str(channels_last).lower()}",
             f"model.compile={str(compiled).lower()}"]  # fmt: skip
    if not fused:
        extra.append("+model.optimizer.foreach=true")  # torch's default, spelled out
    cfg, model = build(args.experiment, [*overrides, *extra])
    batch = make_batch(cfg, args.batch or int(cfg.data.batch_size), device)
    window = Window(args.warmup, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[window],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(SameBatch(batch), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log on every step, iterable without len, ...
        trainer.fit(model, train_dataloaders=loader)
    seconds = window.end - window.start
    images = args.steps * len(batch[0])
    opt = trainer.optimizers[0]
    return {
        "precision": precision,
        "channels_last": channels_last,
        "compile": compiled,
        "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')}, "
        f"foreach={opt.defaults.get('foreach')})",
        "batch": len(batch[0]),
        "images_per_s": images / seconds,
        "step_ms": 1000 * seconds / args.steps,
        "first_step_s": window.first_step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }


def sync_check(args, overrides, device) -> dict:
    """Host syncs seen in three bare training steps (bf16 autocast, channels-last, fused)."""
    cfg, model = build(args.experiment, [*overrides, "model.channels_last=true"])
    model.to(device)
    model.configure_model()
    opt = fused_on_cuda(model.optimizer_fn, device)(model.parameters())
    x, y = make_batch(cfg, args.batch or int(cfg.data.batch_size), device)
    x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.loss(x, model._labels(y, drop=True)).mean()
        model.check_finite("train/loss", loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.ema is not None:
            model.ema.update(model.net)

    step()  # first step: lazy state (optimizer moments) is created
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    seen = [str(w.message).splitlines()[0] for w in caught]
    seen = [m for m in seen if "called a synchronizing" in m]  # not the "prototype" notice
    where = None
    if seen:  # once more with errors on: the Python line that synchronised
        import traceback

        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        except RuntimeError as err:
            frames = traceback.extract_tb(err.__traceback__)
            where = [f"{f.filename.split('/src/')[-1]}:{f.lineno} {f.line}" for f in frames][-3:]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    model.raise_if_diverged()
    return {"steps": 3, "host_syncs": len(seen), "where": where}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="cifar10_edm")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a small net (tests, CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--sync-check", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    overrides = [*(TINY if args.tiny else []), "data.num_workers=0"]
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}: choose from {list(VARIANTS)}")
    torch.manual_seed(0)
    cfg, model = build(args.experiment, overrides)
    batch = make_batch(cfg, args.batch or int(cfg.data.batch_size), device)
    flops = flops_per_image(model.to(device), *batch)
    peak = args.peak_tflops or datasheet_peak(device)
    measured = matmul_tflops(device)
    params = sum(p.numel() for p in model.net.parameters())
    del model
    out = {
        "experiment": args.experiment,
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": params,
        "gflops_per_image": flops / 1e9,
        "peak_bf16_tflops": peak,
        "matmul_bf16_tflops": measured,
        "steps": args.steps,
        "warmup": args.warmup,
        "variants": {},
    }
    if args.sync_check and device.type == "cuda":
        out["sync_check"] = sync_check(args, overrides, device)
        print("sync check:", out["sync_check"], flush=True)
    for name in names:  # the file is rewritten after each row: a cut-short run keeps its rows
        row = run_variant(name, args, overrides, device)
        tflops = row["images_per_s"] * flops / 1e12
        row["tflops"] = tflops
        row["mfu"] = tflops / peak if peak else None
        row["of_matmul"] = tflops / measured if measured else None
        out["variants"][name] = row
        print(name, json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    base = out["variants"].get("fp32")
    tiny = " (tiny)" if args.tiny else ""
    print(f"{out['device']}, torch {out['torch']}: {args.experiment}{tiny}, {params / 1e6:.1f} M "
          f"parameters, {flops / 1e9:.2f} GFLOP an image (fwd+bwd)")  # fmt: skip
    if peak or measured:
        print(f"bf16 peak: datasheet {peak} TFLOP/s, measured matmul "
              f"{measured and round(measured, 1)} TFLOP/s")  # fmt: skip
    print(f"{'variant':<24}{'img/s':>10}{'x fp32':>8}{'ms/step':>9}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'1st step s':>11}")  # fmt: skip
    for name, r in out["variants"].items():
        ratio = r["images_per_s"] / base["images_per_s"] if base else float("nan")
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{name:<24}{r['images_per_s']:>10.1f}{ratio:>8.2f}{r['step_ms']:>9.1f}"
              f"{r['tflops']:>9.2f}{mfu:>7}{r['first_step_s']:>11.1f}")  # fmt: skip
    if "sync_check" in out:
        print(f"host syncs in 3 bare training steps: {out['sync_check']['host_syncs']} "
              f"{out['sync_check']['where'] or ''}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
