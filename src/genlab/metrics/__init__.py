"""The evaluation protocol on images and features (it never sees a model): FID / KID / IS /
precision-recall (torch-fidelity), CLIP score (open_clip), bits/dim bookkeeping; feature
extractors (Inception, the digit classifier), feature statistics and the reference cache.
Sampling a model for evaluation is ``genlab.evaluation``."""

from genlab.metrics.common import WeightsNotFoundError
from genlab.metrics.digits import DigitNet, load_digit_classifier
from genlab.metrics.evaluator import Evaluator, ImageMetrics
from genlab.metrics.features import FeatureStats, ReferenceCache
from genlab.metrics.fidelity import TensorReference

__all__ = [
    "DigitNet",
    "Evaluator",
    "FeatureStats",
    "ImageMetrics",
    "ReferenceCache",
    "TensorReference",
    "WeightsNotFoundError",
    "load_digit_classifier",
]
