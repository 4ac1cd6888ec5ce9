"""Errors of the scoring engine: each says what was wrong with the input in words a user can act on."""

from __future__ import annotations

__all__ = [
    "ScoringError", "InputNotFound", "UnsupportedFormat", "CorruptInput", "NoResolution", "NoTissue",
    "BadParameter", "Cancelled",
]


class ScoringError(Exception):
    """Base class; ``str(self)`` is the message shown to the user (CLI, job status)."""


class InputNotFound(ScoringError):
    pass


class UnsupportedFormat(ScoringError):
    pass


class CorruptInput(ScoringError):
    """A file in a known format that cannot be read (truncated, damaged)."""


class NoResolution(ScoringError):
    """The model card or the slide lacks the micrometres per pixel needed to tile at the model's scale."""


class NoTissue(ScoringError):
    pass


class BadParameter(ScoringError):
    pass


class Cancelled(ScoringError):
    pass
