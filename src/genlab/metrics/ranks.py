"""The processes an evaluation is shared by (DDP ranks), and how their parts come together.

An evaluation of n samples drawn ``sample_batch_size`` at a time is a list of chunks; under DDP
each rank takes a contiguous block of the chunks (``share_chunks``), so every ``sample`` call
and every feature-extractor call sees the batch one process would have given it, and since each
sample draws from its own stream seeded from ``(seed, index)`` (``genlab.nets.rng``) the
images and features are those of one process, bit for bit. ``gather`` puts the ranks' rows
(features, CLIP scores, bits/dim) back together in index order on every rank (a rank may hold
none), and rank 0 computes the metrics once and ``broadcast``s them. ``Ranks()`` is one
process; ``Ranks.current(device)`` reads the default process group (NCCL gathers on the rank's
GPU, gloo on the CPU).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


class Ranks:
    """Args: rank, world (number of processes), device the collectives run on."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.rank, self.world, self.device = int(rank), int(world), torch.device(device)

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> Ranks:
        """The default process group when one is running (a DDP run), else one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @property
    def shared(self) -> bool:
        return self.world > 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> range:
        """The indices of ``rank`` (default: this one) of n items: contiguous, in rank order,
        sizes differing by at most one."""
        r = self.rank if rank is None else rank
        return range(r * n // self.world, (r + 1) * n // self.world)

    def share_chunks(self, n: int, chunk: int, rank: int | None = None) -> range:
        """The indices of ``rank``'s block of the chunks of ``chunk`` items that n items make
        (the last chunk may be short; a rank may have none when there are fewer chunks than
        ranks)."""
        chunks = self.share(math.ceil(n / chunk), rank)
        return range(min(n, chunks.start * chunk), min(n, chunks.stop * chunk))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows (its block of the indices) -> every rank's, in rank order, on the
        CPU, on every rank (one process: ``rows`` as they are). A rank may hold no rows; the
        trailing shape and dtype must agree."""
        if not self.shared:
            return rows.cpu()
        counts = [int(c) for c in self.gather_object(len(rows))]
        padded = rows.new_zeros((max(counts), *rows.shape[1:]))
        padded[: len(rows)] = rows
        padded = padded.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])

    def gather_object(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.shared:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.shared:
            return obj
        box = [obj if self.is_zero else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def protocol(self) -> dict:
        return {"processes": self.world, "split": "contiguous blocks of sample_batch_size chunks"}


__all__ = ["Ranks"]
