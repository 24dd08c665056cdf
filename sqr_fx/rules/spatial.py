"""Ops over the non-channel axes: padding, resizing, normalizing along another axis.

Each keeps channel j in place when the channel axis is not among the axes it works on (its
precondition; otherwise the rule declines and the channels are kept):

* ``F.pad`` on other axes (by any amounts, also ones computed from the input's size; the channel
  axis' own amounts literal zeros): channel j's values move within channel j; padded positions hold the pad
  value (constant mode), so a constant channel stays constant only when it equals that value;
  reflect / replicate / circular copy the channel's own values, so every constant stays.
* ``F.interpolate`` (every mode): each output is a weighted mean of one channel's inputs with
  weights summing to 1 (nearest copies one), so a constant channel stays the same constant.
* ``F.normalize`` along another axis: ``x_j / max(|x_j|_p, eps)`` divides channel j by its own norm;
  a zero channel stays zero, any other constant depends on the axis' length (dynamic).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ..values import ChanInfo
from .registry import rule

aten = torch.ops.aten


def _axis(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _pad_analyze(node: fx.Node, A, a) -> ChanInfo | None:
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    pad, mode, value = a["pad"], a.get("mode", "constant"), a.get("value")
    if src is None or s is None or A.shape(node) is None:
        A.freeze(src)
        return None
    if not isinstance(pad, (list, tuple)) or src.split:
        A.decline(node, "pad amounts computed at run time", src)
        return None
    nd = len(s)
    # an amount computed at run time (timm pads to a window multiple of the input size) may be anything:
    # its axis counts as padded; the channel axis' own amounts must be literal zeros
    padded = {nd - 1 - i // 2 for i, p in enumerate(pad) if not (type(p) is int and p == 0)}
    if src.dim in padded:
        A.decline(node, "pads the channel axis (or by an amount computed at run time)", src)
        return None
    if not padded:
        return src
    if mode != "constant":
        return src
    v = 0.0 if value is None else float(value)
    keep = src.const & (src.value == v)  # padded positions hold v: only a channel equal to v stays const
    return ChanInfo(src.dim, src.ids, keep, np.where(keep, src.value, 0.0))


@rule("pad", F.pad, aten.pad.default, aten.constant_pad_nd.default, names=("input", "pad", "mode", "value"),
      per_target={aten.constant_pad_nd.default: ("input", "pad", "value")})
def pad(node: fx.Node, A, a) -> ChanInfo | None:
    """pad(x)[..., j, ...] is x's channel j with a border on other axes."""
    return _pad_analyze(node, A, a)


_UPSAMPLE = [getattr(getattr(aten, n), o) for n in (
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")
    if hasattr(aten, n) for o in getattr(aten, n).overloads() if o in ("vec", "default")]


@rule("interpolate", F.interpolate, F.upsample, *_UPSAMPLE)
def interpolate(node: fx.Node, A, a) -> ChanInfo | None:
    """Resizing [N, C, *spatial] mixes positions of one channel with weights summing to 1: channel j
    stays channel j and a constant stays itself. Precondition: the channel axis is axis 1."""
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    if src is None or s is None or A.shape(node) is None:
        A.freeze(src)
        return None
    if src.dim != 1 or len(s) < 3 or src.split:
        A.decline(node, "the channel axis is not axis 1 of a batched [N, C, *spatial] tensor", src)
        return None
    return src


@rule("normalize", F.normalize, names=("input", "p", "dim", "eps"))
def normalize(node: fx.Node, A, a) -> ChanInfo | None:
    """x / max(||x||_p over dim, eps) along a non-channel axis: channel j divided by its own norm."""
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    d = a.get("dim", 1)
    if src is None or s is None or A.shape(node) is None:
        A.freeze(src)
        return None
    if not isinstance(d, int) or _axis(d, len(s)) == src.dim or src.split:
        A.decline(node, "normalizes over the channel axis (every channel reads the norm)", src)
        return None
    zero = src.zero
    return ChanInfo(src.dim, src.ids, zero, np.zeros(len(src)))
