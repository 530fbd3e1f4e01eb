"""Lightning callbacks that reach a family only through its public contract."""

from genlab.callbacks.checkpoint import AtomicCheckpointIO, LastCheckpoint
from genlab.callbacks.clock import WallClock
from genlab.callbacks.evaluation import Evaluation
from genlab.callbacks.interpolation import LatentInterpolation, LatentTraversal
from genlab.callbacks.reconstruction import Reconstructions
from genlab.callbacks.samples import SampleGrid

__all__ = [
    "Evaluation",
    "LatentInterpolation",
    "LatentTraversal",
    "Reconstructions",
    "SampleGrid",
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "WallClock",
]
