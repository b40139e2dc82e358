"""The exceptions users see. Each message is one line: what is wrong and what to do."""

from __future__ import annotations


class QaccError(Exception):
    """Base of every error qacc reports to a user (the CLI prints it and exits with code 2)."""


class UnsupportedModelError(QaccError):
    """The model uses an op or a configuration qacc cannot lower."""


class InvalidModelError(QaccError):
    """The model's weights or structure are unusable (NaN/Inf weights, not an nn.Module...)."""


class InvalidDataError(QaccError):
    """Calibration data or labels of the wrong shape, dtype or content."""


class InfeasibleAccumulatorError(QaccError):
    """No configuration fits the requested accumulator width for some layer."""
