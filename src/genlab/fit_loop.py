"""The small training loop behind the weights genlab ships (the digit classifier, the
noise-aware classifier, the domain CLIP): plain torch, no Lightning, seeded, with a progress
bar. Each script says what a batch is and what its loss is; this runs the steps.

    for idx in epoch_batches(n, batch_size, epochs, g):  # or random_batches(...)
        ...
    fit(params, loss_of, batches, optimizer, scheduler, steps=..., desc="digits")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm


def epoch_batches(
    n: int, batch_size: int, epochs: int, generator: torch.Generator, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """Index batches (B,) over ``epochs`` passes, each a fresh permutation of range(n) drawn
    from ``generator`` when the pass starts; ``drop_last`` drops a short final batch."""
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            yield order[i : i + batch_size]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def random_batches(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """``steps`` index batches drawn uniformly with replacement."""
    for _ in range(steps):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def fit(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    steps: int,
    desc: str,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """One optimizer step per batch: zero the gradients, backpropagate ``loss_of(batch)``,
    step the optimizer and the scheduler (per step), then ``after_step`` (e.g. a clamp);
    returns the losses. A progress bar shows the step and the last loss."""
    losses = []
    with tqdm(total=steps, desc=desc) as bar:
        for batch in batches:
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
