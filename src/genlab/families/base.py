"""The LightningModule every family derives from: what each of them would otherwise repeat.

- RNG state in every checkpoint, restored when training resumes, so a resumed run draws the
  noise an uninterrupted one would have;
- optimizer and per-step scheduler setup from partials (``optimizer``, ``lr_scheduler``);
- the EMA weight swap as a context manager (``ema_weights``) and eval mode (``evaluating``);
- parameter counts and ``describe()``, the training/sampling protocol recorded with results;
- guidance, handed in explicitly (``set_guidance``) and asked to wrap what it acts on;
- the GPU path, off by default: ``compile`` (``torch.compile`` of each network in place, so
  checkpoints keep their keys), ``channels_last`` (weights and image batches in NHWC), fused
  Adam/AdamW on CUDA, and the finite-loss check kept on the device between log steps and
  checkpoints, so a training step never waits for the host;
- for families that sample (``GenerativeModule``), the chunked, eval-mode ``sample()`` loop:
  a family writes only its per-chunk ``draw``.

The capabilities callers may rely on are the Protocols of ``genlab.families.contract``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import lightning as L
import torch
from torch import nn

from genlab.families.common import DivergenceError, check_finite
from genlab.families.optim_state import adopt_configured
from genlab.nets import rng

log = logging.getLogger("genlab")


def rng_state() -> dict:
    """Global RNG states (CPU and, if in use, CUDA) as plain tensors (weights_only-safe)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def optimizers(optimizer_fn, lr_scheduler_fn, params):
    """``configure_optimizers``'s return value: the optimizer, with the scheduler (if any)
    stepped every optimizer step."""
    opt = optimizer_fn(params)
    if lr_scheduler_fn is None:
        return opt
    sched = lr_scheduler_fn(opt)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fused_on_cuda(optimizer_fn: Callable, device: torch.device) -> Callable:
    """``optimizer_fn`` with ``fused=True`` when it is a partial Adam / AdamW on a CUDA device
    that does not choose an implementation itself (``fused`` or ``foreach`` given): one kernel
    for the whole update instead of torch's default multi-tensor (foreach) one."""
    if torch.device(device).type != "cuda" or not isinstance(optimizer_fn, functools.partial):
        return optimizer_fn
    if optimizer_fn.func not in (torch.optim.Adam, torch.optim.AdamW):
        return optimizer_fn
    if {"fused", "foreach"} & set(optimizer_fn.keywords):
        return optimizer_fn
    return functools.partial(optimizer_fn, fused=True)


def _swap(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        x.data, y.data = y.data, x.data


class FamilyModule(L.LightningModule):
    """Base of every family. Subclasses call ``super().__init__()`` first, then set
    ``image_shape``, ``num_classes`` and, where they keep one, ``ema`` (a ``nets.EMA`` of the
    network ``ema_target()`` returns)."""

    #: data batches one global step consumes (a GAN's n_critic discriminator batches)
    batches_per_step: int = 1

    def __init__(
        self,
        optimizer: Callable | None = None,
        lr_scheduler: Callable | None = None,
        compile: bool | dict = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.optimizer_fn = optimizer
        self.lr_scheduler_fn = lr_scheduler
        if not isinstance(compile, bool) and not hasattr(compile, "keys"):
            raise ValueError(
                f"model.compile must be true, false or torch.compile's options, got {compile!r}"
            )
        self.compile_options = dict(compile) if hasattr(compile, "keys") else compile
        self.channels_last = bool(channels_last)
        self._nonfinite: dict[str, torch.Tensor] = {}  # name -> first non-finite step, on device
        self.num_classes = 0
        self.ema = None
        self.guidance = None
        self._pending_rng: dict | None = None
        self._resumed = False  # a checkpoint was loaded: on_train_start adopts the config's
        self._ema_in = False  # the EMA weights are swapped in (ema_weights is re-entrant)

    # ------------------------------------------------------------------ the GPU path
    def networks(self) -> list[nn.Module]:
        """What ``compile`` compiles: the family's networks (its direct submodules with
        parameters), not the EMA copy or guidance."""
        return [
            m for m in self.children()
            if m is not self.ema and any(True for _ in m.parameters())
        ]  # fmt: skip

    def configure_model(self) -> None:
        """Lightning's hook before the strategy wraps the module: channels-last weights and
        ``torch.compile`` of each network in place (``nn.Module.compile``: state dict keys
        unchanged, so checkpoints load either way). Idempotent."""
        if self.channels_last and not getattr(self, "_channels_last_done", False):
            self.to(memory_format=torch.channels_last)
            self._channels_last_done = True
        if self.compile_options and not getattr(self, "_compiled", False):
            options = {} if self.compile_options is True else dict(self.compile_options)
            nets = self.networks()
            for net in nets:
                net.compile(**options)
            self._compiled = True
            log.info("torch.compile %s: %s", options or "(defaults)",
                     ", ".join(type(n).__name__ for n in nets))  # fmt: skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.prepare_batch(batch)

    def prepare_batch(self, batch):
        """A batch on the device, as the family trains on it: image batches in NHWC with
        ``channels_last``. Lightning calls a datamodule's ``on_after_batch_transfer`` instead
        of the module's; genlab's datamodules call this at the end of theirs."""
        if self.channels_last:  # image batches in NHWC, as the weights
            convert = lambda t: (  # noqa: E731
                t.contiguous(memory_format=torch.channels_last)
                if isinstance(t, torch.Tensor) and t.ndim == 4 and t.is_floating_point()
                else t
            )
            if isinstance(batch, (list, tuple)):
                return type(batch)(convert(t) for t in batch)
            return convert(batch)
        return batch

    def check_finite(self, name: str, value: torch.Tensor) -> None:
        """Stop on a NaN or infinite loss (``DivergenceError``). On the CPU at once; on an
        accelerator the first non-finite step is kept on the device and looked at every
        ``log_every_n_steps`` steps, before every checkpoint and at the end of training, so
        the step never waits for the host and a diverged state is never saved."""
        if not self._defers_finite_check(value):
            check_finite(name, value, self.global_step)
            return
        bad = ~torch.isfinite(value.detach()).all()
        step = torch.full((), self.global_step, dtype=torch.long, device=value.device)
        first = self._nonfinite.get(name)
        if first is None:
            first = torch.full_like(step, -1)
        self._nonfinite[name] = torch.where((first < 0) & bad, step, first)

    @staticmethod
    def _defers_finite_check(value: torch.Tensor) -> bool:
        """Reading a CPU tensor costs nothing; an accelerator's would wait for its queue."""
        return value.device.type != "cpu"

    def raise_if_diverged(self) -> None:
        """The device-side check of ``check_finite``, read (one host sync)."""
        found = {name: int(first) for name, first in self._nonfinite.items()}
        self._nonfinite.clear()
        for name, step in found.items():
            if step >= 0:
                raise DivergenceError(f"{name} is non-finite at step {step}: training diverged")

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 50) or 1))
        if self._nonfinite and self.global_step % every == 0:
            self.raise_if_diverged()

    def on_train_end(self) -> None:
        self.raise_if_diverged()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_diverged()  # a state reached after a non-finite loss is never saved
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_rng = checkpoint.get("rng_state")
        self._resumed = True

    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        if self._resumed:  # the config's lr, weight decay, schedule win
            self._resumed = False
            for change in adopt_configured(self):
                log.info("resumed with the configured optimizer settings: %s", change)

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """What the optimizer updates (default: every parameter)."""
        return self.parameters()

    def configure_optimizers(self):
        optimizer_fn = fused_on_cuda(self.optimizer_fn, self.device)
        return optimizers(optimizer_fn, self.lr_scheduler_fn, self.trainable_parameters())

    # ------------------------------------------------------------------ weights
    def ema_target(self) -> nn.Module | None:
        """The network whose weights ``ema`` averages (None: no EMA)."""
        return None

    @contextmanager
    def ema_weights(self, use_ema: bool = True) -> Iterator[None]:
        """Inside the block the EMA-tracked network holds the EMA weights (parameters and
        buffers swapped in place, no copy) when ``use_ema`` and the family keeps an EMA;
        the trained weights are back when the block ends, whatever happens in it. Nested
        blocks inside a swapped one change nothing."""
        target = self.ema_target()
        if not use_ema or self.ema is None or target is None or self._ema_in:
            yield  # nothing to swap, or already swapped in by an enclosing block
            return
        ema = self.ema.module
        _swap(target.parameters(), ema.parameters())
        _swap(target.buffers(), ema.buffers())
        self._ema_in = True
        try:
            yield
        finally:
            _swap(target.parameters(), ema.parameters())
            _swap(target.buffers(), ema.buffers())
            self._ema_in = False

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the block; the previous mode is restored after it."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ description
    def counted_module(self) -> nn.Module:
        """The network whose parameters ``parameter_count`` reports (default: all)."""
        return self

    @property
    def parameter_count(self) -> int:
        return count_parameters(self.counted_module())

    @property
    def family(self) -> str:
        """The family as a short name: GANModule -> gan, VQPriorModule -> vqprior."""
        return type(self).__name__.removesuffix("Module").lower()

    def sampling_protocol(self) -> dict | None:
        """How the family samples (its sampler and settings); None if it cannot."""
        return None

    def describe(self, use_ema: bool = True) -> dict:
        """The training/sampling protocol: family, parameters, weights, sampler, guidance."""
        sampler = self.sampling_protocol()
        if sampler is not None and self.guidance is not None:
            sampler = {**sampler, "guidance": self.guidance.protocol()}
        return {
            "family": self.family,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "parameters": self.parameter_count,
            "weights": "ema" if (use_ema and self.ema is not None) else "raw",
            "sampler": sampler,
        }

    # ------------------------------------------------------------------ guidance
    def set_guidance(self, guidance) -> None:
        """Guide this model's samples with ``guidance`` (built from the ``guidance`` config
        group; None removes it). The guidance checks the model and binds to it: the same
        guidance object may guide several models, each in its own way."""
        self.guidance = None if guidance is None else guidance.bind(self)


class GenerativeModule(FamilyModule):
    """A family that samples. ``sample`` runs the chunked loop in eval mode with the EMA
    weights swapped in; the family writes

    - ``draw(m, y, generator, *, noise, index, n, progress, **opts)`` -> (m, C, H, W): one chunk
      of at most ``sample_batch_size`` images (``noise``: this chunk of ``prior_noise``;
      ``index``: the chunk's slice of the n requested images, for guidance);
    - optionally ``prior_noise(n, generator, **opts)``: latents for all n images, drawn before
      the labels (GANs and VAEs draw z for the whole request first);
    - ``random_labels``: a conditional model given no labels samples uniform random ones
      (False: it samples unconditionally, e.g. diffusion with its "no class" token).

    Guidance that acts on whole samples (reranking a candidate set, optimising latents)
    wraps the unguided loop, ``draw_unguided``; guidance inside a sampler wraps a denoiser.
    """

    random_labels: bool = True
    sample_batch_size: int = 256

    def prior_noise(self, n: int, generator: torch.Generator | None, **opts):
        return None

    def nfe_module(self) -> nn.Module | None:
        """The network whose forward passes count as function evaluations (the sampling cost
        ``val/sample_nfe`` reports); None when there is none to count."""
        return None

    def draw(self, m: int, y, generator, *, noise, index: slice, n: int, progress, **opts):
        raise NotImplementedError

    @torch.no_grad()
    def sample(
        self,
        n: int,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        use_ema: bool = True,
        progress: bool = False,
        **opts,
    ) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1] (``genlab.families.contract.Generative``), guided
        by the attached guidance if any."""
        if self.guidance is not None:
            return self.guidance.sample(
                self, self.draw_unguided, n, y=y, generator=generator, use_ema=use_ema,
                progress=progress, **opts,
            )  # fmt: skip
        return self.draw_unguided(
            n, y=y, generator=generator, use_ema=use_ema, progress=progress, **opts
        )

    @torch.no_grad()
    def draw_unguided(
        self,
        n: int,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        use_ema: bool = True,
        progress: bool = False,
        **opts,
    ) -> torch.Tensor:
        """The chunked loop, without whole-sample guidance (a denoiser's guidance still acts
        inside ``draw``). ``generator`` may be ``genlab.nets.rng.SampleSeeds`` of length n (a
        stream per sample): each chunk then draws from its samples' own streams, and the
        images do not depend on ``sample_batch_size``."""
        per_sample = isinstance(generator, rng.SampleSeeds)
        if per_sample and len(generator) != n:
            raise ValueError(f"{len(generator)} per-sample seeds for {n} samples")
        noise = self.prior_noise(n, generator, **opts)
        if self.num_classes and y is None and self.random_labels:
            y = rng.randint(0, self.num_classes, (n,), generator)
        out = []
        with self.evaluating(), self.ema_weights(use_ema):
            for start in range(0, n, self.sample_batch_size):
                part = slice(start, min(n, start + self.sample_batch_size))
                m = part.stop - part.start
                yb = None if y is None else y[part].to(self.device)
                chunk = None if noise is None else noise[part]
                gen = generator[part] if per_sample else generator
                out.append(
                    self.draw(m, yb, gen, noise=chunk, index=part, n=n, progress=progress, **opts)
                )
        return torch.cat(out).clamp(-1, 1)


__all__ = ["FamilyModule", "GenerativeModule", "count_parameters", "optimizers", "rng_state"]
