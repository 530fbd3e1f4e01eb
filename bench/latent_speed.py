"""Training and sampling speed of flow matching in pixel space against latent space, 64x64.

The peer is pixel-space flow matching (``model=flow``, the preset UNet on 64x64x3 faces); the
latent model is ``model=latent_flow`` on the 16x16x4 latents of a trained autoencoder run (the
preset UNet with attention at 8x8, as ``experiment=compare_latent`` sizes it), optionally also
with the DiT of that preset. Every model is built from the real config (Hydra compose), so the
table follows the YAML.

Measured on this machine, in interleaved rounds (the machine may be shared; the median over
rounds is reported):

* training steps/s and images/s: one step = the family's loss on a batch of 64, backward and
  an AdamW step (the latent model's batch is latents, as the cached data serves them: the
  encoder never runs in training);
* sampling images/s: 16 images by the preset's sampler (Euler, 20 steps), the latent model's
  including the decoder;
* FLOPs per image of each denoiser (``genlab.nets.flops.count_flops``) and of the decoder.

Run: ``python bench/latent_speed.py --autoencoder <autoencoder run>`` (``--rounds``, ``--out``;
writes ``bench/results/latent_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from genlab.nets.flops import count_flops
from genlab.utils import compose

BATCH = 64


def build(model: str, autoencoder: str, net: str = "unet"):
    overrides = [f"model={model}", "data=celeba", "data.image_size=64", f"model/net={net}",
                 "model.sampler.steps=20"]  # fmt: skip
    if model == "latent_flow":
        overrides += [f"model.autoencoder_run={autoencoder}"]
        overrides += ["model.net.attn_resolutions=[8]"] if net == "unet" else [
            "model.net.patch_size=2", "model.net.hidden=96", "model.net.depth=3"]  # fmt: skip
    elif net == "dit":
        overrides += ["model.net.patch_size=4", "model.net.hidden=128", "model.net.depth=6"]
    cfg = compose("config", overrides + ["paths.output_dir=/tmp/latent_speed"])
    return instantiate(cfg.model)


def time_training(module, steps: int) -> float:
    """Seconds per training step (batch 64) after one warm-up step."""
    opt = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    x = torch.randn(BATCH, *module.space_shape)
    module.train()

    def step():
        loss = module.loss(x, None).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def time_sampling(module, n: int) -> float:
    """Seconds per sampled image (n images, the preset's sampler; latents decoded)."""
    module.eval()
    module.sample(2, generator=torch.Generator().manual_seed(0))  # warm-up
    start = time.perf_counter()
    module.sample(n, generator=torch.Generator().manual_seed(1))
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", required=True, help="a model=autoencoder run (64x64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--dit", action="store_true", help="the DiTs of compare_latent too")
    parser.add_argument("--out", default="bench/results/latent_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "pixel flow, UNet": build("flow", args.autoencoder),
        "latent flow, UNet": build("latent_flow", args.autoencoder),
    }
    if args.dit:
        models["pixel flow, DiT/4"] = build("flow", args.autoencoder, "dit")
        models["latent flow, DiT/2"] = build("latent_flow", args.autoencoder, "dit")
    train_s = {k: [] for k in models}
    sample_s = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, module in models.items():
            train_s[name].append(time_training(module, args.steps))
            sample_s[name].append(time_sampling(module, args.samples))
    peer = "pixel flow, UNet"
    rows = []
    for name, module in models.items():
        x = torch.randn(1, *module.space_shape)
        flops = count_flops(module.net, x, torch.ones(1))
        decoder = 0
        if module.space_shape != module.image_shape:
            with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
                module.autoencoder.decode(x)
            decoder = counter.get_total_flops()
        step = statistics.median(train_s[name])
        per_image = statistics.median(sample_s[name])
        rows.append({
            "model": name, "space": list(module.space_shape),
            "denoiser_mflops_per_image": flops / 1e6, "decoder_mflops_per_image": decoder / 1e6,
            "train_steps_per_s": 1 / step, "train_images_per_s": BATCH / step,
            "sample_images_per_s": 1 / per_image,
        })  # fmt: skip
    base = next(r for r in rows if r["model"] == peer)
    print(f"{'model':<22} {'space':<12} {'MFLOPs':>8} {'decoder':>8} {'steps/s':>8} "
          f"{'img/s train':>11} {'img/s sample':>12} {'x train':>8} {'x sample':>8}")  # fmt: skip
    for r in rows:
        r["train_speedup"] = r["train_steps_per_s"] / base["train_steps_per_s"]
        r["sample_speedup"] = r["sample_images_per_s"] / base["sample_images_per_s"]
        print(f"{r['model']:<22} {'x'.join(map(str, r['space'])):<12} "
              f"{r['denoiser_mflops_per_image']:>8.1f} {r['decoder_mflops_per_image']:>8.1f} "
              f"{r['train_steps_per_s']:>8.3f} {r['train_images_per_s']:>11.1f} "
              f"{r['sample_images_per_s']:>12.2f} {r['train_speedup']:>8.2f} "
              f"{r['sample_speedup']:>8.2f}")  # fmt: skip
    if args.out:
        out = {"rows": rows, "peer": peer, "batch": BATCH, "rounds": args.rounds,
               "threads": torch.get_num_threads(), "machine": platform.processor() or
               platform.machine(), "autoencoder": args.autoencoder}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
