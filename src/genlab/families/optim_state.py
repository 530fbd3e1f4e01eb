"""On resume, the optimizer settings the config gives now, not the ones the checkpoint holds.

Lightning restores each optimizer's ``param_groups`` (learning rate, weight decay, betas...)
and each scheduler's state from the checkpoint, so ``model.optimizer.lr=1e-4
ckpt_path=<last.ckpt>``, the usual answer to a diverged run, would silently keep the old
learning rate. ``adopt_configured`` (called by ``FamilyModule.on_train_start`` after a
checkpoint was loaded) builds the optimizers and schedulers the config describes and carries
their settings into the restored ones, keeping the restored progress (moment estimates, step
counts, the scheduler's position):

- a group's base learning rate (``initial_lr`` under a scheduler) becomes the configured one
  and its current rate is scaled by the same factor (the schedule's position is kept);
- every other hyperparameter of a group (weight decay, betas, eps, momentum...) is taken from
  the config;
- a scheduler's settings (a ``LambdaLR``'s warm-up length, a cosine's ``T_max``...) are taken
  from the config with its step count kept; a ``LambdaLR`` rate is recomputed in closed form.
  A scheduler of another type than the checkpoint's is refused with one line.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
from torch.optim.lr_scheduler import LambdaLR

# the scheduler state that is progress, not configuration
PROGRESS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial")


def _base(group: dict) -> float:
    return float(group.get("initial_lr", group["lr"]))


def adopt_configured(module: L.LightningModule) -> list[str]:
    """Carries the configured optimizer and scheduler settings into the restored ones; returns
    one line per change (``optimizer 0 group 0: lr 0.6 -> 0.001``)."""
    trainer = module.trainer
    fresh_opts, fresh_scheds = _init_optimizers_and_lr_schedulers(module)
    changes = []
    for i, (old, new) in enumerate(zip(trainer.optimizers, fresh_opts, strict=True)):
        for j, (g_old, g_new) in enumerate(zip(old.param_groups, new.param_groups, strict=True)):
            where = f"optimizer {i} group {j}"
            before, after = _base(g_old), _base(g_new)
            if after != before:
                g_old["lr"] = g_old["lr"] * after / before if before else after
                if "initial_lr" in g_old:
                    g_old["initial_lr"] = after
                changes.append(f"{where}: lr {before:g} -> {after:g}")
            for key, value in g_new.items():
                if key in ("params", "lr", "initial_lr") or g_old.get(key) == value:
                    continue
                changes.append(f"{where}: {key} {g_old.get(key)} -> {value}")
                g_old[key] = value
    for i, (old_cfg, new_cfg) in enumerate(
        zip(trainer.lr_scheduler_configs, fresh_scheds, strict=True)
    ):
        old, new = old_cfg.scheduler, new_cfg.scheduler
        if type(old) is not type(new):
            raise ValueError(
                f"the checkpoint's LR scheduler {i} is a {type(old).__name__}, the config's a "
                f"{type(new).__name__}: a resumed run keeps its scheduler's type (train a new "
                "run from scratch to change it)"
            )
        saved, configured = old.state_dict(), new.state_dict()
        state = {**configured, **{k: saved[k] for k in PROGRESS if k in saved}}
        state["base_lrs"] = [_base(g) for g in old.optimizer.param_groups]
        if any(saved.get(k) != state.get(k) for k in state if k not in PROGRESS):
            changes.append(f"lr scheduler {i}: settings from the config")
            old.load_state_dict(state)
            if isinstance(old, LambdaLR):  # closed form: the rate at the kept position
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "call scheduler.step()" advice
                    rates = old.get_lr()
                for group, lr in zip(old.optimizer.param_groups, rates, strict=True):
                    group["lr"] = lr
                old._last_lr = list(rates)
    return changes
