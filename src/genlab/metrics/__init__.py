"""Metrics and feature extractors. So far: the offline digit classifier (``digits``)."""

from genlab.metrics.digits import DigitNet, load_digit_classifier

__all__ = ["DigitNet", "load_digit_classifier"]
