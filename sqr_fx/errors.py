"""Exceptions raised by sqr_fx. Every message names the node or module involved."""
from __future__ import annotations

__all__ = [
    "SqrFxError",
    "TraceError",
    "UnsupportedOpError",
    "TrainingModeError",
    "TiedWeightsError",
    "UnsupportedDtypeError",
    "EquivalenceError",
]


class SqrFxError(Exception):
    """Base class of every error sqr_fx raises on purpose."""


class TraceError(SqrFxError):
    """The model could be traced neither by ``torch.fx.symbolic_trace`` nor by ``torch.export``."""


class UnsupportedOpError(SqrFxError):
    """``strict=True`` and the graph holds an op that has no rule (the message names the node)."""


class TrainingModeError(SqrFxError):
    """The model is in training mode and holds modules whose function depends on it."""


class TiedWeightsError(SqrFxError):
    """One parameter is read by several weighted ops; slicing it for one would change the other."""


class UnsupportedDtypeError(SqrFxError):
    """Parameters or inputs of a dtype the exact rewrite does not handle (integer, complex, quantized)."""


class EquivalenceError(SqrFxError, AssertionError):
    """Two models disagree on some output beyond the given tolerance."""
