"""Wall-clock time as a logged metric, so curves can be drawn against time as well as steps."""

from __future__ import annotations

import time

import lightning as L


class WallClock(L.Callback):
    """Logs ``time/train_s``: seconds spent in fitting so far, evaluation included, carried
    across resumes (the total is kept in the checkpoint). Logged every ``log_every_n_steps``
    like the training losses, so metrics.csv pairs every logged step with a time."""

    def __init__(self) -> None:
        self.offset = 0.0  # seconds from earlier sessions of this run (restored on resume)
        self.start: float | None = None

    def elapsed(self) -> float:
        return self.offset + (0.0 if self.start is None else time.monotonic() - self.start)

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % max(trainer.log_every_n_steps, 1) == 0:
            pl_module.log("time/train_s", self.elapsed(), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.offset = float(state_dict.get("elapsed", 0.0))
