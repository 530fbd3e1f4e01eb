"""Reflow: straighten a flow model's paths for few-step sampling (Liu et al. 2023, Sec. 2.3).

    python -m genlab.reflow run_dir=<flow run> n=10000 max_steps=2000

The 1-rectified flow of ``run_dir`` (its EMA weights) maps n noise draws z to samples x with
its ODE (the run's sampler at ``pair_steps``); the 2-rectified flow starts from the same
weights and regresses the straight-line velocity z - x on those fixed pairs (``FlowModule``
takes coupled (x, y, z) batches). The result is a run directory (``.hydra/config.yaml``,
``checkpoints/last.ckpt``, ``pairs.pt``, ``summary.json``) that ``genlab.sample``,
``genlab.evaluate`` (e.g. ``"nfe=[1,2]"``) and the dashboard read like any other.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from genlab.callbacks import AtomicCheckpointIO
from genlab.families.flow import FlowModule
from genlab.runs import atomic_torch_save, atomic_write_text, load_model, write_summary
from genlab.utils import CONF_DIR, UsageError, compose, reported


@torch.no_grad()
def draw_pairs(model: FlowModule, n: int, steps: int, seed: int, batch_size: int = 256):
    """(x, y, z): n samples of the model's ODE from unit noise z (the flow frame's x_1), with
    uniform random labels y for a conditional model (zeros otherwise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *model.space_shape), generator=g)
    y = (torch.randint(0, model.num_classes, (n,), generator=g) if model.num_classes
         else torch.zeros(n, dtype=torch.long))  # fmt: skip
    xs = []
    with model.evaluating(), model.ema_weights(True):
        for start in tqdm(range(0, n, batch_size), desc="pairs"):
            part = slice(start, min(n, start + batch_size))
            labels = y[part].to(model.device) if model.num_classes else None
            denoise = model.denoiser(labels, use_ema=False)  # EMA weights swapped in above
            x = model.sampler(denoise, z[part].to(model.device), model.frame, steps=steps,
                              generator=g)  # fmt: skip
            xs.append(x.clamp(-1, 1).cpu())
    # the pair's noise is what the sampler started from in the flow frame: x_{t_max} = t_max z
    return torch.cat(xs), y, z * model.frame.t_max


def run(cfg: DictConfig) -> Path:
    loaded = load_model(cfg.run_dir)
    model, run_cfg = loaded.model, loaded.cfg
    if not isinstance(model, FlowModule):
        raise UsageError(f"reflow needs a flow run (model=flow); {cfg.run_dir} holds a "
                         f"{type(model).__name__}")  # fmt: skip
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
        "cpu" if cfg.device == "auto" else str(cfg.device))  # fmt: skip
    model.to(device)
    out = Path(cfg.out or Path(cfg.run_dir) / "reflow")
    start = time.time()
    x, y, z = draw_pairs(model, int(cfg.n), int(cfg.pair_steps), int(cfg.seed))
    atomic_torch_save({"x": x, "y": y, "z": z, "pair_steps": int(cfg.pair_steps)},
                      out / "pairs.pt")  # fmt: skip
    pair_seconds = time.time() - start

    student = copy.deepcopy(model).cpu().train()
    if student.ema is not None:  # start from the weights that drew the pairs (the EMA average)
        student.net.load_state_dict(student.ema.module.state_dict())
    student.optimizer_fn = lambda params: torch.optim.AdamW(params, lr=float(cfg.lr))
    student.lr_scheduler_fn = None
    shuffle = torch.Generator().manual_seed(int(cfg.seed))
    loader = DataLoader(TensorDataset(x, y, z), batch_size=int(cfg.batch_size), shuffle=True,
                        drop_last=True, generator=shuffle)  # fmt: skip
    trainer = L.Trainer(
        max_steps=int(cfg.max_steps), accelerator="auto" if cfg.device == "auto" else device,
        devices=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
        gradient_clip_val=1.0, plugins=[AtomicCheckpointIO()], default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(student, train_dataloaders=loader)
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=True)

    new_cfg = copy.deepcopy(run_cfg)
    OmegaConf.set_struct(new_cfg, False)
    new_cfg.reflow = {"from_run": str(Path(cfg.run_dir).resolve()), "pairs": int(cfg.n),
                      "pair_steps": int(cfg.pair_steps), "max_steps": int(cfg.max_steps),
                      "lr": float(cfg.lr), "batch_size": int(cfg.batch_size)}  # fmt: skip
    atomic_write_text(out / ".hydra" / "config.yaml", OmegaConf.to_yaml(new_cfg))
    loss = trainer.callback_metrics.get("train/loss")
    write_summary(out, {
        "status": "completed", "global_step": trainer.global_step,
        "metrics": {"train/loss": None if loss is None else float(loss)},
        "protocol": {"reflow": dict(new_cfg.reflow), "pair_seconds": round(pair_seconds, 1),
                     "seconds": round(time.time() - start, 1)},
    }, merge=False)  # fmt: skip
    print(f"wrote the 2-rectified flow to {out}")
    return out


def main(argv: list[str]) -> Path:
    """``python -m genlab.reflow <argv>`` from Python (tests, notebooks)."""
    return run(compose("reflow", argv))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="reflow")
def cli(cfg: DictConfig) -> None:
    with reported():  # a user error: one line, exit status 1
        run(cfg)


if __name__ == "__main__":
    cli()
