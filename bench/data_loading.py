"""Memory and speed of genlab's decoded-image cache: memory-mapped against read into memory.

Writes a synthetic folder of ``--n`` small RGB PNGs (default 200,000 of 16x16, random noise
so they do not compress away), then, each in a fresh subprocess so that peak memory is its own:

* ``build, streamed``: ``FolderDataModule.load_split("train")`` with an empty cache dir: the
  folder is decoded straight into the cache file (what genlab does);
* ``build, in memory``: ``readers.decode_images`` on the same files, the split stacked in
  memory (what genlab did before, and what any loader that decodes into a tensor does);
* ``epoch, memmap`` / ``epoch, in_memory``: one epoch of the training DataLoader
  (``--batch-size``, ``--workers``) over the cache, ``data.in_memory`` false / true.

For each: wall time, images/s, peak resident memory (``VmHWM``) and, at the end, the private
(``RssAnon``: what has to fit in RAM) and file-backed (``RssFile``: page cache, shared by
workers and ranks, which the kernel can drop under pressure) parts of the resident set.

Run: ``python bench/data_loading.py`` (about 3 minutes here; ``--n 20000`` for a quick look).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
from pathlib import Path
mode, root, cache = sys.argv[1:4]
batch, workers = int(sys.argv[4]), int(sys.argv[5])
from genlab.data import FolderDataModule, readers

def status():
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields

kw = dict(root=root, image_size=16, channels=3, val_fraction=0.0, cache_dir=cache,
          batch_size=batch, num_workers=workers)
t0 = time.perf_counter()
if mode == "build_streamed":
    n = len(FolderDataModule(**kw).load_split("train"))
elif mode == "build_in_memory":
    images, kept = readers.decode_images(readers.list_images(Path(root)), 16, 1.0, 3)
    n = len(images)
else:
    dm = FolderDataModule(**kw, in_memory=(mode == "epoch_in_memory"))
    n, total = 0, 0
    for images, labels in dm.train_dataloader():
        n += len(images)
        total += int(images[:, 0, 0, 0].sum())  # touch what was loaded
seconds = time.perf_counter() - t0
print(json.dumps({"mode": mode, "images": n, "seconds": seconds, **status()}))
"""


def make_folder(root: Path, n: int) -> None:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"{i // 10000:03d}"
        if i % 10000 == 0:
            sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i}.png")


def run(mode: str, root: Path, cache: Path, batch: int, workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(root), str(cache), str(batch), str(workers)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="images in the synthetic folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "images", Path(tmp) / "cache"
        t0 = time.perf_counter()
        make_folder(root, args.n)
        print(f"wrote {args.n} PNGs of 16x16x3 in {time.perf_counter() - t0:.0f} s; "
              f"decoded split: {args.n * 3 * 16 * 16 / 2**20:.1f} MiB")  # fmt: skip
        rows = [run(mode, root, cache, args.batch_size, args.workers)
                for mode in ("build_streamed", "build_in_memory", "epoch_memmap",
                             "epoch_in_memory")]  # fmt: skip
    print(f"{'':18} {'images/s':>9} {'peak RSS':>9} {'RssAnon':>8} {'RssFile':>8}  (MiB)")
    for r in rows:
        print(f"{r['mode']:18} {r['images'] / r['seconds']:9.0f} {r['VmHWM']:9.0f} "
              f"{r['RssAnon']:8.0f} {r['RssFile']:8.0f}")  # fmt: skip
    by = {r["mode"]: r for r in rows}
    speed = (by["epoch_memmap"]["images"] / by["epoch_memmap"]["seconds"]) / (
        by["epoch_in_memory"]["images"] / by["epoch_in_memory"]["seconds"]
    )
    print(f"memmap / in-memory: epoch images/s x{speed:.2f}, private memory "
          f"x{by['epoch_memmap']['RssAnon'] / by['epoch_in_memory']['RssAnon']:.2f}; "
          f"streamed / in-memory build: peak RSS "
          f"x{by['build_streamed']['VmHWM'] / by['build_in_memory']['VmHWM']:.2f}")  # fmt: skip
    if args.json:
        meta = {"n": args.n, "batch_size": args.batch_size, "workers": args.workers}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
