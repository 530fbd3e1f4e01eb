"""genlab: train, sample, evaluate and compare image generative models on one protocol."""

__version__ = "0.1.0"
