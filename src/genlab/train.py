"""Training: compose -> instantiate data, model, callbacks, loggers, trainer -> fit -> final
evaluation -> summary.json. ``python -m genlab`` runs ``main``; tests call ``train(cfg)``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from genlab import profile
from genlab.callbacks import preemption
from genlab.callbacks.checkpoint import AtomicCheckpointIO
from genlab.callbacks.csv_log import ResumableCSVLogger
from genlab.callbacks.evaluation import Evaluation
from genlab.data import FolderDataModule
from genlab.families.common import DivergenceError
from genlab.families.contract import EncodedData, TextConditional
from genlab.guidance import build_guidance
from genlab.runs import (
    load_checkpoint,
    read_summary,
    remove_stale_temporaries,
    save_config,
    write_summary,
)
from genlab.utils import (
    CONF_DIR,
    ConfigError,
    UserError,
    group_overrides,
    reported,
    sweep_dir,
    wandb_mode,
)

log = logging.getLogger("genlab")

# Lightning warnings that do not apply here: in-memory tensors need no workers; the EMA copy
# is in eval mode on purpose; the CSV log shares the run directory with Hydra's files;
# mid-epoch resumes are exact because the training sampler skips already-seen batches; GANs
# have no validation step, and their checkpoints hold the state after the step on purpose;
# genlab's datamodules hand their batches on to the family's ``prepare_batch``, so a family's
# ``on_after_batch_transfer`` beside theirs (for plain DataLoaders) loses nothing.
for pattern in (
    ".*have no `validation_step`.*",
    ".*manual optimization and every_n_train_steps.*",
    ".*does not have many workers.*",
    ".*module\\(s\\) in eval mode.*",
    ".*exists and is not empty.*",
    ".*resuming from a checkpoint that ended before.*",
    ".*smaller than the logging interval.*",
    ".*LeafSpec.*",
    ".*overridden `on_after_batch_transfer` in both.*",
):
    warnings.filterwarnings("ignore", message=pattern)


def _choices() -> dict:
    try:
        return {
            k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")
        }
    except ValueError:  # not under Hydra (tests composing by hand)
        return {}


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (tests composing by hand)
        return []


# Trainer keys of one type, checked before anything starts (Lightning's own errors for them
# come late and do not name the key: max_steps=abc gives "'<' not supported ...")
INT_KEYS = ("max_steps", "max_epochs", "log_every_n_steps", "accumulate_grad_batches",
            "num_sanity_val_steps", "check_val_every_n_epoch")  # fmt: skip
NUMBER_KEYS = ("val_check_interval", "limit_val_batches", "gradient_clip_val")


def check_trainer_types(trainer: DictConfig) -> None:
    for key in (*INT_KEYS, *NUMBER_KEYS):
        value = trainer.get(key)
        kind = int if key in INT_KEYS else (int, float)
        if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
            continue
        what = "an integer" if key in INT_KEYS else "a number"
        raise ConfigError(f"trainer.{key} must be {what} (or null), got {value!r}")


def divergence_advice(cfg: DictConfig, run_dir: Path) -> str:
    """The command that resumes a diverged run from its last checkpoint with a quarter of its
    learning rate (which takes effect on resume: ``families.optim_state``), into a new run
    directory (the config changed)."""
    lowered = {
        f"model.{key}.lr": f"{float(node.lr) / 4:g}"
        for key, node in cfg.model.items()
        if key.endswith("optimizer") and isinstance(node, DictConfig) and "lr" in node
    }
    given = _overrides()
    drop = {*lowered, "ckpt_path", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"}
    kept = [o for o in given if o.split("=", 1)[0].lstrip("+~") not in drop]
    args = [*kept, *(f"{k}={v}" for k, v in lowered.items())]
    args.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    advice = f"resume with a lower learning rate: python -m genlab {' '.join(args)}"
    # a manually optimised family (GANs) clips by its own key; the others by the trainer's
    key = "model" if "gradient_clip_val" in cfg.model else "trainer"
    if not cfg[key].get("gradient_clip_val"):
        advice += f" (or clip gradients: add {key}.gradient_clip_val=1.0)"
    return advice


def wandb_settings(conf: DictConfig, run_dir: Path, family: str | None) -> dict:
    """What genlab adds to the W&B logger's config: the mode (online only when logged in),
    and in a sweep one group per sweep (its directory's name), the job's directory name as
    the run name, and the family among the tags."""
    extra: dict = {"mode": wandb_mode(conf.get("mode"))}
    sweep = sweep_dir()
    if sweep is not None:
        if not conf.get("group"):
            extra["group"] = sweep.name
        extra["name"] = run_dir.name
    if family:
        extra["tags"] = [*(conf.get("tags") or []), f"family:{family}"]
    return extra


def build_loggers(cfg: DictConfig, run_dir: Path, family: str | None = None) -> list:
    loggers: list = [ResumableCSVLogger(save_dir=str(run_dir), name="", version="")]
    for name, conf in (cfg.get("logger") or {}).items():
        if not conf or "_target_" not in conf:
            continue
        if "Wandb" in conf._target_:
            conf = OmegaConf.merge(conf, wandb_settings(conf, run_dir, family))
        loggers.append(instantiate(conf))
        log.info("logger %s: %s", name, conf._target_)
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]


def protocol(cfg: DictConfig, model, datamodule) -> dict:
    described = model.describe()  # the same description the evaluation records
    return {
        "dataset": _choices().get("data", type(datamodule).__name__),
        "split": "val",
        "image_shape": described["image_shape"],
        "sampler": described["sampler"],
        "weights": described["weights"],
        "seed": cfg.seed,
        **{key: described[key] for key in ("network", "latent") if key in described},
    }


def evaluation_callback(trainer: L.Trainer) -> Evaluation | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, Evaluation)), None)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


NOT_HASHED = ("hydra", "paths", "ckpt_path", "skip_completed")
# how the model runs, not what it trains: a run may be resumed with the GPU path switched on
MODEL_NOT_HASHED = ("compile", "channels_last")


class RunConflictError(UserError, ValueError):
    """The run directory holds a run of another config; nothing in it is touched."""


def config_hash(cfg: DictConfig) -> str:
    """A fingerprint of what a run trains: the config without resume and Hydra keys, without
    the paths of outputs and caches and without ``model.compile`` / ``model.channels_last``,
    but with the data's location (``data.root`` resolved), which is part of a run's identity.
    A run directory is continued or skipped only by a run with the same fingerprint."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    kept = {k: v for k, v in plain.items() if k not in NOT_HASHED}
    if isinstance(kept.get("model"), dict):
        kept["model"] = {k: v for k, v in kept["model"].items() if k not in MODEL_NOT_HASHED}
    root = OmegaConf.select(cfg, "data.root", throw_on_resolution_failure=False)
    kept["data_root"] = str(Path(os.path.expanduser(str(root))).resolve()) if root else None
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train(cfg: DictConfig) -> dict:
    """Train, evaluate and write summary.json. A run directory that already holds a completed
    run of the same config (a sweep re-run into its directory) is skipped and its summary
    returned (``skip_completed``); one that holds an unfinished run of the same config resumes
    from its last checkpoint."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_hash(cfg)
    earlier = read_summary(run_dir)
    same = earlier.get("config_hash") == fingerprint
    last = run_dir / "checkpoints" / "last.ckpt"
    holds_run = last.exists() or earlier.get("status") == "completed"
    if holds_run and not same and cfg.get("ckpt_path") is None:
        raise RunConflictError(
            f"{run_dir} holds a run of another config (config_hash {earlier.get('config_hash')}, "
            f"this one {fingerprint}): train into a new directory, or resume it on purpose "
            f"with ckpt_path={last}"
        )
    if same and earlier.get("status") == "completed" and cfg.get("skip_completed", True):
        log.info("%s: already completed, skipped (skip_completed=false to train again)", run_dir)
        return earlier
    if not (run_dir / ".hydra" / "config.yaml").exists():  # called outside the Hydra CLI
        save_config(cfg, run_dir)
    for stale in remove_stale_temporaries(run_dir / "checkpoints"):  # from a killed writer
        log.info("removed %s (an unfinished checkpoint write)", stale)
    if cfg.get("ckpt_path") is None and same and last.exists():
        log.info("%s: resuming the unfinished run from %s", run_dir, last)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.ckpt_path = str(last)
    start = time.time()
    state: dict = {}  # what _train has built so far: the trainer, whether summary.json is begun
    try:
        return _train(cfg, run_dir, fingerprint, state)
    except BaseException as err:
        trainer = state.get("trainer")
        stop = isinstance(err, SystemExit | KeyboardInterrupt | preemption.Preempted)
        signal_name = preemption.requested() if stop else None  # SIGTERM / Ctrl-C during fit
        error = f"{type(err).__name__}: {err}".strip()
        if isinstance(err, DivergenceError):
            error = f"{type(err).__name__}: {err}; {divergence_advice(cfg, run_dir)}"
        if signal_name:
            at = f" at step {trainer.global_step}" if trainer is not None else ""
            error = (f"{signal_name}{at}: checkpoints/last.ckpt holds the run; the same command "
                     f"with hydra.run.dir={run_dir} resumes it")  # fmt: skip
        if trainer.is_global_zero if trainer is not None else _rank() == 0:
            failure = {
                "status": "interrupted"
                if signal_name or isinstance(err, KeyboardInterrupt)
                else "failed",
                "error": error,
                "choices": _choices(),
                "config_hash": fingerprint,
                "wall_time_s": time.time() - start,
            }
            if trainer is not None:
                failure["global_step"] = trainer.global_step
            # added to this attempt's summary; one that failed before writing it starts afresh
            write_summary(run_dir, failure, merge=state.get("summary_begun", False))
        if signal_name:
            log.warning("%s: interrupted; %s", run_dir, error)
            preemption.hand_over()  # SLURM's requeue signal: submitit requeues the job now
            raise SystemExit(preemption.exit_code()) from err  # 143 for SIGTERM, 130 for Ctrl-C
        # train.log keeps the reason (the console gets the error itself: one line for a user
        # error, a traceback for a defect)
        log_to_files(logging.ERROR, "%s: failed: %s", run_dir, " ".join(error.split()))
        if isinstance(err, DivergenceError):  # the same error, with the exact command to resume
            raise DivergenceError(error.split(": ", 1)[1]) from None
        raise
    finally:
        finish_wandb(failed=sys.exc_info()[0] is not None)


def log_to_files(level: int, msg: str, *args) -> None:
    """A record for the log files only (Hydra's ``<job>.log``), not the console."""
    record = log.makeRecord(log.name, level, __file__, 0, msg, args, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def finish_wandb(failed: bool) -> None:
    """Close this job's W&B run, so that the next job of an in-process sweep starts its own
    (Lightning's logger would otherwise reuse the open one)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def apply_per_model(cfg: DictConfig) -> DictConfig:
    """Merge ``per_model.<model choice>`` into ``model``, then ``per_model.<model>/<net>`` for
    the chosen ``model/net`` option: an experiment that runs several families (``experiment=
    compare_celeba model=gan,diffusion``) or backbones (``compare_latent model/net=unet,dit``)
    sizes each one there. The merged config is what .hydra/resolved_model.yaml records."""
    per_model, choices = cfg.get("per_model"), _choices()
    model = choices.get("model")
    keys = [model, f"{model}/{choices.get('model/net')}"]
    found = [per_model[k] for k in keys if per_model and k in per_model]
    if not found:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model = OmegaConf.merge(cfg.model, *found)
    return cfg


def _train(cfg: DictConfig, run_dir: Path, fingerprint: str, state: dict) -> dict:
    cfg = apply_per_model(cfg)
    if cfg.get("per_model"):
        OmegaConf.save(cfg.model, run_dir / ".hydra" / "resolved_model.yaml")
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    datamodule.batches_per_step = model.batches_per_step  # for an exact mid-epoch resume
    classes, labelled = model.num_classes, getattr(datamodule, "num_classes", 0)
    if classes and classes != labelled:  # before anything starts, not an IndexError later
        has = f"has {labelled} classes" if labelled else "has no labels (data.num_classes=0)"
        raise ConfigError(
            f"model.num_classes={classes} but the data {has}: set "
            "'model.num_classes=${data.num_classes}'"
            + (" or train an unconditional model (model.num_classes=0)" if not labelled else "")
        )
    if isinstance(model, TextConditional):  # a captioned folder's captions, indexed by labels
        folder = isinstance(datamodule, FolderDataModule)
        model.set_captions(datamodule.captions if folder else None)
    model.set_guidance(build_guidance(cfg.get("guidance")))  # grids and evaluation sample guided
    # before a logger or the trainer starts: the data (read or downloaded into the cache on
    # rank 0, as Lightning's prepare_data would) and the checkpoint to resume from
    if _rank() == 0:
        datamodule.prepare_data()
    if isinstance(model, EncodedData):  # a latent model: the images encoded once, cached
        datamodule = model.encoded_data(datamodule, Path(cfg.paths.cache_dir).expanduser())
        datamodule.batches_per_step = model.batches_per_step
    if cfg.get("ckpt_path"):
        fix = "resume from another (ckpt_path=<file>) or train afresh in a new directory"
        load_checkpoint(cfg.ckpt_path, fix, mmap=True)
    marks: dict = {}  # step at which fitting started (non-zero when resuming), for images/s
    mark = L.pytorch.callbacks.LambdaCallback(
        on_train_start=lambda tr, pl: marks.update(step=tr.global_step, time=time.time())
    )
    check_trainer_types(cfg.trainer)
    clip, strategy = cfg.trainer.get("gradient_clip_val"), cfg.trainer.get("strategy", "auto")
    if not model.automatic_optimization:
        # Lightning cannot clip under manual optimisation: such a family clips by its own
        # setting (a GAN's model.gradient_clip_val, off by default as in the papers)
        clip = None
        # alternating updates (a GAN's D and G steps) leave one network without gradients in
        # each backward pass, which DDP must be told about
        if strategy == "ddp":
            strategy = "ddp_find_unused_parameters_true"
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        gradient_clip_val=clip,
        strategy=strategy,
        callbacks=[*build_callbacks(cfg), mark],
        logger=build_loggers(cfg, run_dir, model.family),
        plugins=[AtomicCheckpointIO()],
    )
    state["trainer"] = trainer
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero:
            lg.experiment.config.update(
                OmegaConf.to_container(cfg, resolve=True), allow_val_change=True
            )

    summary = {
        "status": "running",
        "family": type(model).__name__,
        "choices": _choices(),
        "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "world_size": trainer.world_size,
        "resumed_from": cfg.get("ckpt_path"),
        "config_hash": fingerprint,
        "protocol": protocol(cfg, model, datamodule),
    }
    if trainer.is_global_zero:
        write_summary(run_dir, summary, merge=False)
        state["summary_begun"] = True
    start = time.time()
    with preemption.preemptible(trainer):  # SIGTERM / Ctrl-C: last.ckpt at the step, then exit
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    evaluation = evaluation_callback(trainer)
    if evaluation is not None:  # the final evaluation, if a kill interrupted it before
        evaluation.finish(trainer, model)
    fit_end = time.time()
    wall = fit_end - start
    if not trainer.is_global_zero:
        return summary
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result = evaluation.latest if evaluation is not None else None
    if result is not None:
        metrics.update(result["metrics"])
    eval_time = evaluation.time_s if evaluation is not None else 0.0
    steps_done = trainer.global_step - marks.get("step", 0)
    fit_time = fit_end - marks.get("time", start) - eval_time
    summary.update(
        {
            "status": "completed",
            "metrics": metrics,
            "evaluation": None
            if result is None
            else {"step": result["step"], "protocol": result["protocol"]},
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "wall_time_s": wall,
            "eval_time_s": eval_time,
            "train_time_s": fit_time,
            # every batch a step consumed (a GAN's n_critic discriminator batches)
            "train_images_per_s": steps_done
            * model.batches_per_step
            * datamodule.batch_size
            * trainer.world_size
            / max(fit_time, 1e-9),
            "checkpoint": "checkpoints/last.ckpt",
        }
    )
    skipped = {split: n for split, n in getattr(datamodule, "unreadable", {}).items() if n}
    if skipped:  # the warning went to stderr when the files were decoded; keep the count
        summary["unreadable_files"] = skipped
        log.warning("%s: unreadable image files skipped: %s", run_dir, skipped)
    write_summary(run_dir, summary, merge=False)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update(summary["metrics"])
    log.info("run directory: %s", run_dir)
    return summary


def objective(cfg: DictConfig, summary: dict) -> float | None:
    """The metric a hyperparameter sweeper minimises or maximises (``objective``: a key of
    summary.json's metrics, e.g. val/fd_digits): NaN for a failed run, None when unset."""
    key = cfg.get("objective")
    if not key:
        return None
    metrics = summary.get("metrics") or {}
    if summary.get("status") == "completed" and key not in metrics:
        raise KeyError(f"objective {key!r} is not among the run's metrics: {sorted(metrics)}")
    return float(metrics.get(key, float("nan")))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """In a sweep (-m), a job that fails is recorded (summary.json: status "failed" and its
    error) and the sweep goes on; the sweep's callback reports the failures at its end. A
    user error (``genlab.utils.UserError``) of a single run is one line, exit status 1."""
    if sweep_dir() is None:
        with reported():
            profile.machine_defaults(cfg, _overrides(), _choices())
            return objective(cfg, train(cfg))
    profile.machine_defaults(cfg, _overrides(), _choices())
    try:
        summary = train(cfg)
    except Exception as err:  # noqa: BLE001 -- recorded, and the next job runs
        log.error("job failed: %s: %s (recorded in %s/summary.json)",
                  type(err).__name__, err, cfg.paths.output_dir)  # fmt: skip
        summary = {"status": "failed"}
    return objective(cfg, summary)


def cli() -> None:
    """``python -m genlab``: ``main`` after ``model.net=dit``-style overrides of a nested config
    group are written as Hydra's ``model/net=dit`` (``genlab.utils.group_overrides``)."""
    sys.argv[1:] = group_overrides(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
