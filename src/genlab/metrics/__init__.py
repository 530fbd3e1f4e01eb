"""Evaluation protocol: FID / KID / IS / precision-recall (torch-fidelity), CLIP score
(open_clip), bits/dim, sampling cost; feature extractors (Inception, the digit classifier)."""

from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.digits import DigitNet, load_digit_classifier
from genlab.metrics.evaluator import Evaluator
from genlab.metrics.fidelity import TensorReference

__all__ = [
    "DigitNet",
    "Evaluator",
    "TensorReference",
    "WeightsNotFoundError",
    "load_digit_classifier",
]
