"""Lightning callbacks that reach a family only through its public contract."""

from genlab.callbacks.checkpoint import AtomicCheckpointIO, atomic_torch_save
from genlab.callbacks.samples import SampleGrid

__all__ = ["SampleGrid", "AtomicCheckpointIO", "atomic_torch_save"]
