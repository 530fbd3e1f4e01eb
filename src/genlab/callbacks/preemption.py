"""Preemption: SIGTERM (what SLURM and most schedulers send before they kill a job) and Ctrl-C
stop a run cleanly instead of losing the steps since the last checkpoint.

Within ``preemptible(trainer)`` (``genlab.train`` wraps ``trainer.fit`` in it) the first
SIGTERM or SIGINT sets Lightning's stop flag, so the fit loop stops at the end of the current
step with ``SIGTERMException``; ``LastCheckpoint`` writes ``last.ckpt`` at that step
(``on_exception``) and the run is recorded as ``interrupted`` with a non-zero exit (128 + the
signal's number, as a shell reports it). A signal that arrives while a sample grid or an
evaluation runs (``interruptible()``, which ``PeriodicCallback`` wraps around them) stops it at
once with ``Preempted``: those can take minutes (a PixelRNN grid), and the training state is
complete at that point. A second Ctrl-C raises ``KeyboardInterrupt`` at once, without a new
checkpoint (the state mid-step is not one to resume from).

Under SLURM through the submitit launcher (``hydra/launcher=slurm``), submitit binds SIGUSR2,
which SLURM sends shortly before the time limit (or on preemption), to its own requeue
handler, which requeues the job and exits at once, mid-step. Inside ``preemptible`` that
signal first stops the run like SIGTERM (``last.ckpt`` at the step, status ``interrupted``);
then ``hand_over()`` calls submitit's handler, which requeues the job; the requeued job runs
the same command in the same run directory and resumes from ``last.ckpt``. Without such a
handler SIGUSR2 is left alone.

A family whose global step spans several batches (a GAN's ``n_critic`` discriminator batches,
``batches_per_step``) stops only at the batch that completes a step (``StopAtStepEnd``), so the
checkpoint never holds discriminator updates that a resume would replay.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

import lightning as L

log = logging.getLogger("genlab")

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEUE = signal.SIGUSR2  # submitit's requeue signal (sbatch --signal=USR2@90)
_state: dict = {"signal": None, "depth": 0, "requeue": None}


class Preempted(BaseException):
    """A stop signal arrived inside ``interruptible()``; a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def requested() -> str | None:
    """The name of the stop signal received inside the current ``preemptible`` block."""
    return _state["signal"]


def exit_code() -> int:
    """128 + the received signal's number (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(getattr(signal, _state["signal"] or "SIGTERM"))


@contextmanager
def interruptible():
    """A stretch (a sample grid, an evaluation) that a stop signal ends at once."""
    if _state["signal"] is not None:
        raise Preempted(_state["signal"])
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1


def _stop(trainer) -> None:
    # Lightning's own flag for "stop after this batch" (its SIGTERM handler sets it too; it has
    # no public setter): the fit loop then raises SIGTERMException at the end of the batch
    trainer._signal_connector.received_sigterm = True


class StopAtStepEnd(L.Callback):
    """After a stop signal, holds the stop flag down until the end of a batch that completes a
    global step (every batch, for a family with one batch per step): Lightning's own SIGTERM
    handler, which it chains in front of ours, raises the flag at once."""

    def __init__(self):
        self.step_before = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if requested():
            trainer._signal_connector.received_sigterm = trainer.global_step != self.step_before


@contextmanager
def preemptible(trainer):
    """Stop signals request a clean stop of ``trainer`` while the block runs (main thread
    only: Python delivers signals there); the previous handlers come back afterwards."""
    _state.update(signal=None, depth=0)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _state["signal"] is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            return
        _state["signal"] = name
        module = trainer.lightning_module
        if module is None or module.batches_per_step == 1:
            _stop(trainer)  # else StopAtStepEnd stops at the end of the step
        log.warning("%s received: stopping after this step, writing last.ckpt", name)
        if _state["depth"] > 0:
            raise Preempted(name)

    watcher = StopAtStepEnd()
    trainer.callbacks.append(watcher)
    requeue = signal.getsignal(REQUEUE)
    watched = (*SIGNALS, REQUEUE) if callable(requeue) else SIGNALS  # a scheduler's requeue
    _state["requeue"] = requeue if callable(requeue) else None
    previous = {s: signal.getsignal(s) for s in watched}
    for s in watched:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        trainer.callbacks.remove(watcher)


def hand_over() -> None:
    """After the stop a requeue signal caused has been checkpointed and recorded: the
    scheduler's own handler (submitit's requeues the job and exits). Nothing otherwise."""
    handler, _state["requeue"] = _state.get("requeue"), None
    if handler is not None and _state["signal"] == REQUEUE.name:
        log.warning("%s: handing over to the scheduler's requeue handler", REQUEUE.name)
        handler(REQUEUE, None)
