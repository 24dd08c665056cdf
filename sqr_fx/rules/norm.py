"""LayerNorm / RMSNorm over the channel axis, and embeddings: the residual-stream rules.

A LayerNorm reads every channel of its input through the mean and the variance, so a
channel may leave it only when its input there is a known constant ``c_j``; the
rewrite then emits :func:`~sqr_fx.layers.compensated_layer_norm`, which keeps the full
layer's statistics exactly (docs/compensated_layernorm.md). Its OUTPUT channel j still
varies per token, ``y_j = gamma_j (c_j - mu) / sigma + beta_j``, so the group goes only
when every reader ignores it, or ``gamma_j == 0`` (then ``y_j = beta_j`` is a constant and
folds into the readers like any other).

GroupNorm (channel axis 1) is the same per group: channel j leaves its group's statistic
only when its input is a known constant, and the rewrite emits
:func:`~sqr_fx.layers.compensated_group_norm` with per-group compensation (groups may
then keep different numbers of channels).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ..layers import (compensated_group_norm, compensated_layer_norm, compensated_rms_norm, full_width_rms_norm,
                      removed_stats, upcast_rms_norm)
from ..values import ChanInfo
from .registry import op_name, rule

aten = torch.ops.aten


def _norm_analyze(node: fx.Node, A, a, *, has_bias: bool) -> ChanInfo | None:
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    ns = a.get("normalized_shape")
    if isinstance(ns, fx.Node) or (isinstance(ns, (list, tuple)) and any(isinstance(v, fx.Node) for v in ns)):
        A.decline(node, "normalized_shape computed at run time", src)
        return None
    if src is not None and src.split:
        return _per_head_norm(node, A, a, src, s, ns)
    return _flat_norm(node, A, a, src, s, ns, has_bias)


def _per_head_norm(node: fx.Node, A, a, src: ChanInfo, s, ns) -> ChanInfo | None:
    """A norm over the per-head axis of a head-split tensor (Qwen3 / Gemma 3's q_norm and k_norm on
    ``[B, T, H, D]``): y[h] = norm(x[h]) * w, one head at a time, so a head goes whole (its statistic
    and output are its own) while every dim of a kept head stays (the statistic mixes them; nothing is
    compensated per head). The weight and bias are per dim, shared by the heads: kept whole.
    Precondition: the last axis is the per-head axis, normalized alone (``normalized_shape == (D,)``),
    and the affine tensors are stored ones."""
    D = len(src) // src.heads
    params = [a.get("weight"), a.get("bias")]
    if s is None or src.dim != len(s) - 1 or ns is None or list(ns) != [D] \
            or any(p is not None and A.tensor(p) is None for p in params):
        A.decline(node, "a head-split input normalized over more than its last (per-head) axis", src)
        return None
    A.keep_whole_heads(src)
    return replace(src, const=np.zeros(len(src), bool), value=np.zeros(len(src)))


def _flat_norm(node: fx.Node, A, a, src, s, ns, has_bias: bool) -> ChanInfo | None:
    if src is None or s is None or src.dim != len(s) - 1 or (ns is not None and len(ns) != 1):
        A.freeze(src)
        return None
    return _affine_out(A, src, a.get("weight"), a.get("bias") if has_bias else None)


def _affine_out(A, src: ChanInfo, w, b) -> ChanInfo | None:
    """Per-channel affine params join the channel's group; the input must be const to leave the
    statistic (``need_const``); output j is the constant ``beta_j`` when ``gamma_j == 0``."""
    for p in (w, b):
        if p is not None:
            if A.tensor(p) is None:
                A.freeze(src)
                return None
            A.attach(p, 0, src.ids)
    A.need_const(src, src.ids)
    n = len(src)
    if w is None:
        return ChanInfo.dynamic(src.dim, src.ids)
    const = (A.tensor(w) == 0).cpu().numpy().astype(bool)
    value = A.tensor(b).double().cpu().numpy() if b is not None else np.zeros(n)
    return ChanInfo(src.dim, src.ids, const, np.where(const, value, 0.0))


def _merged_stats(old_r: int, old_mean: torch.Tensor, old_m2: torch.Tensor, values: np.ndarray):
    """Mean and centred sum of squares of the union of two removed sets (Chan et al.)."""
    m_new, m2_new = removed_stats(torch.as_tensor(values))
    r_new = len(values)
    if old_r == 0:
        return m_new, m2_new
    r = old_r + r_new
    delta = m_new - old_mean.double()
    return old_mean.double() + delta * r_new / r, old_m2.double() + m2_new + delta**2 * old_r * r_new / r


def _norm_rewrite(node: fx.Node, R, a, *, rms: bool) -> fx.Node:
    src = R.info(a["input"])
    if src is None or src.split or R.keep(src).all():
        return R.copy(node)  # (per-head norm: only whole heads went, its (D,) shape and weights stand)
    keep = R.keep(src)
    compensated = node.target in (compensated_layer_norm, compensated_rms_norm)
    n = int(a["n"]) if compensated else len(src)
    old_r = n - len(src)
    removed = src.value[~keep]
    x, w = R.arg(a["input"]), R.arg(a.get("weight"))
    eps = a.get("eps")
    if rms and w is None and not compensated and _downcast_from_float64(a["input"]):
        return _full_width(node, R, x, np.arange(n), np.zeros(n), keep, src.value, eps, None)
    if rms:
        old = R.tensor(a["removed_sumsq"]).double() if compensated else torch.zeros((), dtype=torch.float64)
        sumsq = R.buffer(f"{node.name}_removed_sumsq", old + float((removed**2).sum()))
        return R.graph.call_function(compensated_rms_norm, (x, w, n, sumsq, eps))
    if compensated:
        mean, m2 = _merged_stats(old_r, R.tensor(a["removed_mean"]), R.tensor(a["removed_m2"]), removed)
    else:
        mean, m2 = removed_stats(torch.as_tensor(removed))
    return R.graph.call_function(compensated_layer_norm, (
        x, w, R.arg(a.get("bias")), n, R.buffer(f"{node.name}_removed_mean", mean),
        R.buffer(f"{node.name}_removed_m2", m2), 1e-5 if eps is None else eps))


@rule("layer_norm", F.layer_norm, aten.layer_norm.default, compensated_layer_norm,
      names=("input", "normalized_shape", "weight", "bias", "eps"),
      per_target={compensated_layer_norm: ("input", "weight", "bias", "n", "removed_mean", "removed_m2", "eps")},
      rewrite=lambda n, R, a: _norm_rewrite(n, R, a, rms=False), heads=True)
def layer_norm(node, A, a):
    """LayerNorm over the channel axis: channel j couples input and output; input j must be const."""
    return _norm_analyze(node, A, a, has_bias=True)


def _downcast_from_float64(x) -> bool:
    """``x`` is a float64 tensor cast to a narrower float (Hugging Face's ``hidden.to(torch.float32)`` before
    an RMSNorm in a float64 model): the compensated norm's statistic, summed over fewer channels in the
    narrow dtype, would differ from the original's by that dtype's rounding, far above float64's; the
    full-width norm (the original call on the rebuilt width) stays bit for bit. Elsewhere, a float32 model
    included, the compensated norm is exact to the model's own rounding and needs no full-width buffer."""
    if not isinstance(x, fx.Node) or _dtype(x) in (None, torch.float64) or not x.args:
        return False
    return op_name(x) in ("to", "_to_copy", "float", "type", "type_as", "half", "bfloat16") \
        and _dtype(x.args[0]) is torch.float64


def _dtype(a) -> torch.dtype | None:
    tm = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
    return getattr(tm, "dtype", None)


def _full_width(node, R, x, kept: np.ndarray, fill: np.ndarray, keep: np.ndarray, value: np.ndarray, eps,
                stat_dtype) -> fx.Node:
    """A :func:`full_width_rms_norm` call: positions ``kept[~keep]`` leave, their constants join ``fill``."""
    fill = fill.copy()
    fill[kept[~keep]] = value[~keep]
    return R.graph.call_function(full_width_rms_norm, (
        x, R.buffer(f"{node.name}_kept", torch.as_tensor(kept[keep], dtype=torch.long)),
        R.buffer(f"{node.name}_fill", torch.as_tensor(fill, dtype=torch.float64)), eps, stat_dtype))


def _rms_zero_stays_zero(A, a, out: ChanInfo | None, weight=None) -> ChanInfo | None:
    """``y_j = x_j * rsqrt(ms + eps) [* w_j]``: a zero input stays zero when eps > 0 (a finite rsqrt) and w_j
    is finite; a dead stream channel then stays dead past the norm and its readers fold nothing. Not for a
    per-head norm (a head-split input): every dim of a kept head stays there, zero or not (the statistic
    divides by the head's full width and is not compensated per head)."""
    eps = a.get("eps")
    wt = A.tensor(weight) if weight is not None else None
    if out is None or out.split or (eps is not None and not (isinstance(eps, (int, float)) and eps > 0)) \
            or (weight is not None and (wt is None or not bool(torch.isfinite(wt).all()))):
        return out
    zero = A.info(a["input"]).zero
    return ChanInfo(out.dim, out.ids, out.const | zero, np.where(zero, 0.0, out.value))


def _full_width_rewrite(node: fx.Node, R, a) -> fx.Node:
    src = R.info(a["input"])
    keep = R.keep(src)
    if src is None or keep.all():
        return R.copy(node)
    if node.target is full_width_rms_norm:
        kept, fill, stat = R.tensor(a["kept"]).cpu().numpy(), R.tensor(a["fill"]).double().cpu().numpy(), \
            a.get("stat_dtype")
    else:
        kept, fill, stat = np.arange(len(src)), np.zeros(len(src)), a["stat_dtype"]
    return _full_width(node, R, R.arg(a["input"]), kept, fill, keep, src.value, a.get("eps"), stat)


@rule("rms_norm_full_width", upcast_rms_norm, full_width_rms_norm, names=("input", "eps", "stat_dtype"),
      per_target={full_width_rms_norm: ("input", "kept", "fill", "eps", "stat_dtype")}, rewrite=_full_width_rewrite)
def rms_norm_full_width(node, A, a):
    """T5's upcast RMSNorm and the full-width form: RMSNorm's coupling; removed channels are rebuilt from
    their constants at full width, so the statistic is the original one bit for bit."""
    src, s = A.info(a["input"]), A.shape(a["input"])
    if src is None or s is None or src.dim != len(s) - 1:
        A.freeze(src)
        return None
    A.need_const(src, src.ids)
    return _rms_zero_stays_zero(A, a, ChanInfo.dynamic(src.dim, src.ids))


@rule("rms_norm", getattr(F, "rms_norm", None), getattr(aten, "rms_norm", None) and aten.rms_norm.default,
      compensated_rms_norm, names=("input", "normalized_shape", "weight", "eps"),
      per_target={compensated_rms_norm: ("input", "weight", "n", "removed_sumsq", "eps")},
      rewrite=lambda n, R, a: _norm_rewrite(n, R, a, rms=True), heads=True)
def rms_norm(node, A, a):
    """RMSNorm: rms^2 = (sum_K x^2 + sum_R c^2) / N; same coupling as LayerNorm. Unlike LayerNorm it
    only scales each channel, ``y_j = x_j * rsqrt(rms^2 + eps) * w_j``: a zero input stays zero (eps > 0
    keeps the rsqrt finite, a finite w_j keeps the product zero), so a dead stream channel stays dead
    past the norm and its readers fold nothing."""
    return _rms_zero_stays_zero(A, a, _norm_analyze(node, A, a, has_bias=False), a.get("weight"))


def _group_layout(A, a, compensated: bool, n: int):
    """Group of each current channel, or None when the layout is not a known constant."""
    if compensated:
        gi = A.tensor(a["group_index"])
        return None if gi is None or gi.numel() != n else gi.cpu().long().numpy()
    groups = a["num_groups"]
    if not isinstance(groups, int) or groups < 1 or n % groups:
        return None
    return np.arange(n) // (n // groups)


def _group_norm_rewrite(node: fx.Node, R, a) -> fx.Node:
    src = R.info(a["input"])
    if src is None or R.keep(src).all():
        return R.copy(node)
    keep = R.keep(src)
    n = len(src)
    if node.target is compensated_group_norm:
        group = R.tensor(a["group_index"]).cpu().long().numpy()
        size = int(a["group_size"])
        count = R.tensor(a["removed_count"]).cpu().long().numpy().copy()
        mean = R.tensor(a["removed_mean"]).cpu().double().clone()
        m2 = R.tensor(a["removed_m2"]).cpu().double().clone()
    else:
        g = int(a["num_groups"])
        size = n // g
        group = np.arange(n) // size
        count = np.zeros(g, np.int64)
        mean, m2 = torch.zeros(g, dtype=torch.float64), torch.zeros(g, dtype=torch.float64)
    gone_group, gone_value = group[~keep], src.value[~keep]
    for q in np.unique(gone_group):
        values = gone_value[gone_group == q]
        mean[q], m2[q] = _merged_stats(int(count[q]), mean[q], m2[q], values)
        count[q] += len(values)
    eps = a.get("eps")
    return R.graph.call_function(compensated_group_norm, (
        R.arg(a["input"]), R.arg(a.get("weight")), R.arg(a.get("bias")),
        R.buffer(f"{node.name}_group_index", torch.as_tensor(group[keep], dtype=torch.long)), size,
        R.buffer(f"{node.name}_removed_count", torch.as_tensor(count, dtype=torch.long)),
        R.buffer(f"{node.name}_removed_mean", mean), R.buffer(f"{node.name}_removed_m2", m2),
        1e-5 if eps is None else float(eps)))


@rule("group_norm", F.group_norm, aten.group_norm.default, compensated_group_norm,
      names=("input", "num_groups", "weight", "bias", "eps"),
      per_target={aten.group_norm.default: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
                  compensated_group_norm: ("input", "weight", "bias", "group_index", "group_size",
                                           "removed_count", "removed_mean", "removed_m2", "eps")},
      rewrite=_group_norm_rewrite)
def group_norm(node, A, a):
    """GroupNorm over axis 1: as LayerNorm, per group (channel j couples input and output; input j
    must be a known constant to leave its group's statistic)."""
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    if (src is None or s is None or len(s) < 2 or src.dim != 1
            or _group_layout(A, a, node.target is compensated_group_norm, len(src)) is None):
        A.freeze(src)
        return None
    return _affine_out(A, src, a.get("weight"), a.get("bias"))


@rule("embedding", F.embedding, aten.embedding.default, names=("input", "weight"),
      per_target={aten.embedding.default: ("weight", "input")})
def embedding(node, A, a):
    """Row lookup: output channel j is column j of the table, const when that column is constant."""
    W = A.tensor(a["weight"])
    s = A.shape(node)
    if W is None or s is None or W.dim() != 2:
        A.freeze(list(node.args))
        return None
    A.freeze(a["input"])  # token indices, not channels
    ids = A.fresh(W.shape[1])
    A.attach(a["weight"], 1, ids)
    cols = W.double()
    const = (cols == cols[:1]).all(0).cpu().numpy()
    return ChanInfo(len(s) - 1, ids, const, np.where(const, cols[0].cpu().numpy(), 0.0))
