"""What every guidance method is: a configured object that checks a model, binds to it, and
wraps what the model samples with -- a denoiser, or the whole-sample draw (a candidate set,
a latent objective) -- returning one of the same kind. Nothing is patched: a family asks its
guidance (``FamilyModule.set_guidance``) at the two places it can act.

- ``bind(model)``: check that the model can be guided this way and return the guidance that
  serves it (the object itself, or, for ``method=auto``, the method chosen for that model);
  one guidance object bound to two families guides each in its own way.
- ``wrap_denoiser(model, denoise, y, *, index, n)``: inside a diffusion sampler; called with
  the sampling weights already in place, so other denoisers it needs are built with
  ``model.denoiser(..., use_ema=False)`` (the weights in place).
- ``sample(model, draw, n, y, generator, **opts)``: around the unguided chunked loop
  ``draw(n, y=..., generator=..., **opts)``.
- ``columns()`` (what each grid column is steered toward), ``clip_targets(n)`` (the scorer and
  the prompt each of n samples was steered toward, for ``val/clip_score``), ``protocol()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from genlab.families.contract import Denoiser
from genlab.utils import UserError


class GuidanceError(UserError, ValueError):
    """This model cannot be guided this way (one line: what is wrong and what to do)."""


class Guidance:
    """Base class: no effect until a method overrides a hook."""

    name = "guidance"
    weights: list[float] | None = None  # relative weights of the targets, if any

    def check(self, model) -> None:
        """Raise ``GuidanceError`` if ``model`` cannot be guided this way."""

    def bind(self, model) -> Guidance:
        self.check(model)
        return self

    def wrap_denoiser(self, model, denoise: Denoiser, y, *, index: slice, n: int) -> Denoiser:
        return denoise

    def sample(self, model, draw: Callable, n: int, y=None, generator=None, **opts):
        return draw(n, y=y, generator=generator, **opts)

    def targets(self) -> Sequence | None:
        """The prompts or classes cycled over the images (None: no per-image targets)."""
        return None

    def columns(self) -> list[str] | None:
        """What each grid column is steered toward when targets are cycled without weights
        (so a grid that many columns wide has one target per column); None otherwise."""
        targets = self.targets()
        if not targets or self.weights is not None or len(targets) > 16:
            return None
        return [str(t) for t in targets]

    def clip_targets(self, n: int):
        """(CLIP scorer, the prompt of each of n images) for samples steered toward text
        prompts, None otherwise."""
        return None

    def protocol(self) -> dict:
        return {"name": self.name}


def cycle(values: Sequence, weights: Sequence[float] | None, n: int, what: str = "target") -> list:
    """The target of each of n images: ``values`` cycled without weights; with weights, in
    consecutive blocks whose sizes are proportional to them (the rounding remainder goes to the
    heaviest)."""
    if weights is None:
        return [values[i % len(values)] for i in range(n)]
    if len(weights) != len(values) or min(weights) <= 0:
        raise GuidanceError(
            f"guidance.weights must be {len(values)} positive numbers, one per {what}"
        )
    total = float(sum(weights))
    counts = [int(n * w / total) for w in weights]
    for i in sorted(range(len(values)), key=lambda i: -weights[i])[: n - sum(counts)]:
        counts[i] += 1
    return [v for v, c in zip(values, counts) for _ in range(c)]


def build_guidance(conf: DictConfig | dict | None) -> Any | None:
    """The guidance object of a ``guidance`` config (None for ``guidance=none``)."""
    if conf is None:
        return None
    conf = OmegaConf.create(conf) if isinstance(conf, dict) else conf
    if "_target_" not in conf:
        if conf.get("prompts"):
            raise GuidanceError(
                f"prompts given with guidance={conf.get('name', 'none')}: add guidance=clip "
                "to steer samples toward them"
            )
        return None
    plain = OmegaConf.to_container(conf, resolve=True)
    plain.pop("name", None)
    cls = get_class(plain.pop("_target_"))  # called directly: its one-line errors stay as they are
    return cls(**plain)
