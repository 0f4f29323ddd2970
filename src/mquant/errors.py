"""Errors users see. Every one carries a one-line message naming the problem and the fix.

The CLI catches `MQuantError` and prints `error: <message>` with a non-zero exit code, never a
traceback, so raise these (not bare ValueError) for anything a user can cause.
"""


class MQuantError(Exception):
    """Base class: a user-facing problem with a one-line explanation and fix."""

    exit_code = 2


class UnsupportedModelError(MQuantError):
    """The model's architecture has no adapter, or an adapter spec does not resolve."""


class ConfigError(MQuantError):
    """A scheme, bit width, method or option is invalid."""


class CalibrationError(MQuantError):
    """Calibration data is missing, empty, unusable, or produced NaN/Inf."""


class CheckpointError(MQuantError):
    """A saved model directory is missing, corrupt, truncated, or does not match."""


class DependencyError(MQuantError):
    """An optional package a model's files need is not installed (the message names the pip install)."""


class InputError(MQuantError):
    """An image, prompt or file given at run time cannot be used."""


class ResourceError(MQuantError):
    """Out of memory or disk while working."""

    exit_code = 3
