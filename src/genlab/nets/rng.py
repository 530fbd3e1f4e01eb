"""Per-sample random streams: samples that do not depend on the batch they are drawn in.

A ``torch.Generator`` shared by a batch makes sample i's noise depend on how many samples were
drawn before it in the same stream: change ``sample_batch_size`` or shard the request over
ranks and every image changes. ``SampleSeeds`` gives each sample its own generator, seeded
from ``(seed, index)`` alone, and the draw helpers below (``randn``, ``rand``, ``randint``)
stack each sample's own draws when handed one. So the images for a seed are the same for any
batch size and any number of ranks (up to the floating-point reassociation of a batched
network, about 1e-6).

Every sampling path draws through these helpers; they take either a ``torch.Generator``, which
behaves exactly like ``torch.randn(..., generator=g)`` on the CPU, None (the global stream of
``device``: on a GPU the draw is made there, no host copy, which is what the training losses
use), or a ``SampleSeeds`` whose length is the leading dimension of the draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded ``seed``: 63 bits of a hash of both
    (neighbouring seeds and indices give unrelated streams)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SampleSeeds:
    """One CPU generator per sample; ``seeds[part]`` is the sub-request of a chunk, and
    ``spawn(k)`` the k candidates of each sample (reranking), each with its own stream."""

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    @classmethod
    def for_indices(cls, seed: int, indices: Iterable[int]) -> SampleSeeds:
        """Samples ``indices`` of the request seeded ``seed`` (``range(n)``: all of it; a
        rank's share: its indices)."""
        return cls([sample_seed(seed, i) for i in indices])

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, part: slice) -> SampleSeeds:
        out = SampleSeeds.__new__(SampleSeeds)
        out.seeds, out.generators = self.seeds[part], self.generators[part]
        return out

    def spawn(self, k: int) -> SampleSeeds:
        """k streams per sample, sample-major (sample i's candidates at i*k .. i*k+k-1), each
        seeded from the sample's seed and the candidate's number."""
        return SampleSeeds([sample_seed(s, j) for s in self.seeds for j in range(k)])


Generator = torch.Generator | SampleSeeds | None


def _stacked(fn, shape: Sequence[int], generator: SampleSeeds, **kw) -> torch.Tensor:
    if not shape or shape[0] != len(generator):
        raise ValueError(
            f"a draw of shape {tuple(shape)} from {len(generator)} per-sample streams: the "
            f"leading dimension must be the number of samples"
        )
    return torch.stack([fn(tuple(shape[1:]), generator=g, **kw) for g in generator.generators])


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``torch.randn(shape, generator=generator)`` drawn on the CPU, then moved to ``device``;
    per sample for ``SampleSeeds``; with no generator, drawn on ``device`` itself."""
    if generator is None:  # the device's own stream: nothing drawn on the host
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    if isinstance(generator, SampleSeeds):
        out = _stacked(torch.randn, shape, generator, dtype=dtype)
    else:
        out = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    return out.to(device) if device is not None else out


def rand(
    shape: Sequence[int],
    generator: Generator = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``torch.rand`` as :func:`randn` draws ``torch.randn``."""
    if generator is None:  # the device's own stream: nothing drawn on the host
        return torch.rand(tuple(shape), dtype=dtype, device=device)
    if isinstance(generator, SampleSeeds):
        out = _stacked(torch.rand, shape, generator, dtype=dtype)
    else:
        out = torch.rand(tuple(shape), generator=generator, dtype=dtype)
    return out.to(device) if device is not None else out


def randint(
    low: int,
    high: int,
    shape: Sequence[int],
    generator: Generator = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``torch.randint(low, high, shape)`` as :func:`randn` draws ``torch.randn``."""
    if generator is None:
        return torch.randint(low, high, tuple(shape), device=device)
    if isinstance(generator, SampleSeeds):
        draw = lambda s, generator: torch.randint(low, high, s, generator=generator)  # noqa: E731
        out = _stacked(draw, shape, generator)
    else:
        out = torch.randint(low, high, tuple(shape), generator=generator)
    return out.to(device) if device is not None else out


__all__ = ["Generator", "SampleSeeds", "rand", "randint", "randn", "sample_seed"]
