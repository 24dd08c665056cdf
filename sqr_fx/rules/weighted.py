"""Linear and convolution: the ops that read channels through weights and fold constants.

Identities (W: weights, b: bias, c_j: constant value of removed input channel j):

* unused input j (``W[:, j] == 0`` on every kept row): ``W x = W[:, K] x[K]``.
* constant input j, Linear / conv without padding: ``W x + b = W[:, K] x[K] + (b + sum_j c_j W[:, j].sum())``.
* constant input j, zero-padded conv: border outputs see padding, so a scalar bias is wrong.
  ``conv(x, W) = conv(x[K], W[:, K]) + conv(1_map, sum_j c_j W[:, j])`` with ``1_map`` an all-ones
  single-channel image of the LIVE input size: exact at every resolution.
* grouped conv (groups > 1): channels of one group are coupled (input and output), so a
  group is deleted whole and never needs a fold.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ..values import ChanInfo
from .registry import rule

aten = torch.ops.aten

#: ``node.meta`` key: the input info a weighted op's analysis followed (None: declined, nothing sliced)
READS = "sqr_fx.reads"
#: ``node.meta`` key: a weighted op's non-zero pattern ``[out, in]`` (kernel taps reduced), and on the
#: weight's ``get_attr`` node a rewrite emits, the pattern of the slice it stored (a slice of a finite
#: weight is finite), so the next round does not read every weight again
NONZERO = "sqr_fx.nonzero"

__all__ = ["ones_map", "finite"]


def ones_map(x: torch.Tensor) -> torch.Tensor:
    """All-ones single-channel batch-1 tensor with ``x``'s spatial size (broadcast over the batch)."""
    return x.new_ones((1, 1) + tuple(x.shape[2:]))


torch.fx.wrap("ones_map")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def finite(t: torch.Tensor) -> bool:
    """Every entry finite. A sum is finite only when every term is (inf or NaN propagates), so a finite
    sum settles it in one reduction; the exact check runs only when the sum is not finite (a NaN/inf
    entry, or finite entries whose sum overflows)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _row_values(nz: np.ndarray, bias: np.ndarray, ok: np.ndarray | None, wsum, probe) -> tuple:
    """Output rows that are constant, and their values: row ``o`` is const when every input it reads
    (``nz[o]``) is ``ok`` (const, or zero when the op pads), or reads nothing when ``ok`` is None (an
    untracked input). Its value is ``bias[o] + sum_i wsum[o, i] * probe[o, i]`` (``wsum(rows)``,
    ``probe(rows)``: those rows in float64, summed row by row as a full matrix would be), computed only
    where it can differ from ``bias[o]``: a row that reads nothing adds signed zeros (finite probes),
    which change only a bias of -0.0."""
    if ok is None:
        const = ~nz.any(1)
        return const, np.where(const, bias, 0.0)
    const = ~(nz & ~ok).any(1) if ok.any() else ~nz.any(1)
    value = np.where(const, bias, 0.0)
    rows = np.flatnonzero(const)
    if len(rows):
        rows = rows[nz[rows].any(1) | ((bias[rows] == 0) & np.signbit(bias[rows])) | ~np.isfinite(probe(rows)).all(1)]
    if len(rows):
        value[rows] = bias[rows] + (wsum(rows) * probe(rows)).sum(1)
    return const, value


def _weight(t: torch.Tensor | None, transposed: bool) -> torch.Tensor | None:
    return t.t() if t is not None and transposed else t


def _weighted_analyze(node: fx.Node, A, a, *, conv: bool, transposed: bool = False) -> ChanInfo | None:
    x, W = a["input"], _weight(A.tensor(a["weight"]), transposed)
    out_shape, x_shape = A.shape(node), A.shape(x)
    b = A.tensor(a.get("bias"))
    known = a["weight"].meta.get(NONZERO) if W is not None else None  # a slice the last rewrite stored
    known = known if known is not None and known.shape == tuple(W.shape[:2]) else None
    why = ("the weight is computed in forward, not a parameter" if W is None
           else "the bias is computed in forward" if a.get("bias") is not None and b is None
           else "unbatched input (its rank is not the weight's)" if conv and x_shape is not None
           and len(x_shape) != W.dim()
           # 0 * inf is NaN: even a zero input channel is read by a non-finite weight
           else "non-finite weight or bias" if (known is None and not finite(W))
           or (b is not None and not finite(b)) else None)
    if why is not None:
        A.decline(node, why)
        return None
    if out_shape is None or x_shape is None:
        A.freeze(list(node.args), dict(node.kwargs))
        return None
    bias = _np(b) if b is not None else np.zeros(W.shape[0])
    src = A.info(x)
    dim = 1 if conv else len(out_shape) - 1
    groups = int(a.get("groups", 1)) if conv else 1
    nzw = known if known is not None else ((W != 0).flatten(2).any(-1) if conv else (W != 0)).cpu().numpy()
    node.meta[NONZERO] = nzw

    def rows_of(rows: np.ndarray) -> np.ndarray:  # per (output, input) channel: the kernel's sum, float64
        return _np((W.flatten(2).sum(-1) if conv else W)[torch.as_tensor(rows)])

    padded = conv and _has_padding(a.get("padding", 0))
    if src is not None and (src.dim != (1 if conv else len(x_shape) - 1) or len(src) != W.shape[1] * groups):
        A.freeze(src)  # the tracked axis is not the one the weight reads (token mixing): not followed
        src = None
    node.meta[READS] = src  # the rewrite slices the input side by THIS decision, never by a declined info
    ok = None if src is None else src.const if not padded else src.zero
    probe = None if src is None else np.where(src.const, src.value, 0.0)
    if groups == 1:
        out_ids = A.fresh(W.shape[0])
        if src is not None:
            A.read(src, out_ids, nzw)
        const, value = _row_values(nzw, bias, None if ok is None else ok[None, :], rows_of,
                                   lambda rows: probe[None, :])
        return ChanInfo(dim, out_ids, const, value)
    # grouped conv: couple every input and output channel of each conv group
    if src is None:
        return ChanInfo.dynamic(dim, _frozen(A, W.shape[0]))
    cin_g, cout_g = W.shape[1], W.shape[0] // groups
    gin = src.ids.reshape(groups, cin_g)
    A.union(np.repeat(gin[:, :1], cin_g, 1).ravel(), gin.ravel())
    out_ids = np.repeat(gin[:, 0], cout_g)

    def per_row(v: np.ndarray) -> np.ndarray:  # [out, cin_g]: each output row's own group's inputs
        return np.repeat(v.reshape(groups, cin_g), cout_g, 0)

    const, value = _row_values(nzw, bias, per_row(ok), rows_of, lambda rows: per_row(probe)[rows])
    return ChanInfo(dim, out_ids, const, value)


def _frozen(A, n: int) -> np.ndarray:
    ids = A.fresh(n)
    A.groups.freeze(ids)
    return ids


def _has_padding(p: Any) -> bool:
    if isinstance(p, str):
        return p != "valid"
    if isinstance(p, (list, tuple)):
        return any(int(v) != 0 for v in p)
    return int(p) != 0


def _weighted_rewrite(node: fx.Node, R, a, *, conv: bool, transposed: bool = False) -> fx.Node:
    if R.info(node) is None:  # the analysis declined this op and froze what it touches
        return R.copy(node)
    W = _weight(R.tensor(a["weight"]), transposed)
    b = R.tensor(a.get("bias"))
    out_info, src = R.info(node), node.meta.get(READS)
    keep_out = R.keep(out_info, W.shape[0])
    groups = int(a.get("groups", 1)) if conv else 1
    Wn, bn = _take(W, 0, keep_out), b  # rows first: the column gather then copies less
    nz = node.meta[NONZERO][keep_out]
    correction = None
    if groups == 1 and src is not None:
        keep_in = R.keep(src, W.shape[1])
        fold = ~keep_in & src.const & (src.value != 0)
        Wn = _take(Wn, 1, keep_in)
        nz = nz[:, keep_in]
        if fold.any():
            c = torch.as_tensor(src.value[fold], dtype=torch.float64)
            K = torch.einsum("oi...,i->o...", W[:, torch.as_tensor(fold)].double(), c)
            if conv and _has_padding(a.get("padding", 0)):
                correction = K.unsqueeze(1).to(W.dtype)
            else:
                extra = K.flatten(1).sum(1) if conv else K
                bn = (b.double() if b is not None else torch.zeros(W.shape[0], dtype=torch.float64)) + extra
                bn = bn.to(W.dtype)
    elif groups > 1:
        groups = int(keep_out.sum()) // (W.shape[0] // groups)
    new = {"weight": R.attr(a["weight"].target, _weight(Wn, transposed))}
    new["weight"].meta[NONZERO] = nz
    if bn is not None:
        new["bias"] = R.attr(a["bias"].target if isinstance(a.get("bias"), fx.Node) else f"{a['weight'].target}_bias",
                             _take(bn, 0, keep_out))
    if conv and groups != int(a.get("groups", 1)):
        new["groups"] = groups
    new["input"] = R.arg(a["input"])
    out = R.emit_like(node, a, new)
    if correction is not None:
        out = _add_correction(node, R, a, out, new["input"], _take(correction, 0, keep_out))
    return out


def _take(t: torch.Tensor, dim: int, keep: np.ndarray) -> torch.Tensor:
    """The kept positions of ``t`` along ``dim`` (one gather; ``t`` itself when all are kept)."""
    if keep.all():
        return t
    idx = torch.as_tensor(np.flatnonzero(keep))
    if dim == 1 and t.dim() > 3:  # a conv kernel's input channels: gather whole kernels (3-D is faster)
        return t.reshape(t.shape[0], t.shape[1], -1).index_select(1, idx).reshape((t.shape[0], len(idx)) + t.shape[2:])
    return t.index_select(dim, idx)


def _add_correction(node, R, a, out, x_new, K) -> fx.Node:
    """out + conv(1_map, K): the folded constants' exact contribution, borders included."""
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[K.dim() - 2]
    ones = R.graph.call_function(ones_map, (x_new,))
    kern = R.buffer(f"{node.name}_const_kernel", K)
    corr = R.graph.call_function(
        fn, (ones, kern, None, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), 1)
    )
    return R.graph.call_function(torch.add, (out, corr))


@rule("linear", torch.nn.functional.linear, aten.linear.default, names=("input", "weight", "bias"),
      rewrite=lambda n, R, a: _weighted_rewrite(n, R, a, conv=False))
def linear(node, A, a):
    """y = x W^T + b; output feature o is const when every input it reads is const."""
    return _weighted_analyze(node, A, a, conv=False)


@rule("addmm", torch.addmm, aten.addmm.default, names=("bias", "input", "weight"),
      rewrite=lambda n, R, a: _weighted_rewrite(n, R, a, conv=False, transposed=True))
def addmm(node, A, a):
    """bias + x @ W (GPT-2's Conv1D, Linear after export decompositions): Linear with W transposed."""
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
        A.freeze(list(node.args))
        return None
    return _weighted_analyze(node, A, a, conv=False, transposed=True)


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@rule("conv", F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
      names=_CONV_NAMES, rewrite=lambda n, R, a: _weighted_rewrite(n, R, a, conv=True))
def conv(node, A, a):
    """Zero-padded conv: output o is const only when its inputs are zero (borders see padding),
    or const when there is no padding."""
    return _weighted_analyze(node, A, a, conv=True)
