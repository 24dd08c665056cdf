"""Mixture-of-experts linears: every expert reads the same input channels and writes the same outputs.

Identity (``W [E, out, in]``, row ``s`` routed to expert ``e(s)``)::

    y[s, o] = sum_i W[e(s), o, i] x[s, i]

Channel ``i`` is read by output ``o`` when ``W[e, o, i] != 0`` for SOME expert ``e`` (the routing is
data dependent, so every expert counts), and output ``o`` is exactly zero when it reads only zero
inputs (no bias). Hence an expert hidden unit (a ``gate_up_proj`` row pair and a ``down_proj``
column) goes only when it is dead in EVERY expert, and then from every expert at once. A constant
non-zero input channel would add ``c_i W[e(s), o, i]``, a different bias per expert: not folded,
such a channel is kept (frozen) wherever an expert reads it.

``repeat_interleave`` along a row axis (``batched_mm`` repeats each token once per chosen expert) keeps
every channel with its value.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from ..moe import expert_linear
from ..values import ChanInfo
from .registry import method, rule
from .weighted import NONZERO, READS, finite

aten = torch.ops.aten


def _experts_oi(W: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The stored experts as ``[E, out, in]`` (grouped mm stores ``[E, in, out]``)."""
    return W.transpose(1, 2) if transposed else W


def _expert_analyze(node: fx.Node, A, x, w, *, transposed: bool, others: list) -> ChanInfo | None:
    W = A.tensor(w)
    s_x, s_out = A.shape(x), A.shape(node)
    src = A.info(x)
    if W is None or W.dim() != 3 or s_x is None or s_out is None or len(s_x) != 2 or len(s_out) != 2 \
            or not finite(W):
        A.decline(node, "expert weights not a finite [E, *, *] parameter, or the input not 2-D", x, w, others)
        return None
    A.freeze(others)  # expert ids / offsets: indices, not channels
    Woi = _experts_oi(W, transposed)
    nz = (Woi != 0).any(0).cpu().numpy()
    if src is not None and (src.dim != 1 or len(src) != Woi.shape[2]):
        A.freeze(src)
        src = None
    node.meta[READS] = src
    node.meta[NONZERO] = nz
    out_ids = A.fresh(Woi.shape[1])
    if src is None:
        return ChanInfo(1, out_ids, ~nz.any(1), np.zeros(Woi.shape[1]))
    A.read(src, out_ids, nz)
    # a constant non-zero input adds a per-expert bias, which no single bias holds: keep it
    A.groups.freeze(src.ids[src.const & (src.value != 0) & nz.any(0)])
    const = ~(nz & ~src.zero[None, :]).any(1)
    return ChanInfo(1, out_ids, const, np.zeros(Woi.shape[1]))


def _expert_rewrite(node: fx.Node, R, a, *, transposed: bool, x: str, w: str) -> fx.Node:
    if R.info(node) is None:
        return R.copy(node)
    W = R.tensor(a[w])
    in_ax, out_ax = (1, 2) if transposed else (2, 1)
    keep_out = R.keep(R.info(node), W.shape[out_ax])
    src = node.meta.get(READS)
    keep_in = R.keep(src, W.shape[in_ax])
    Wn = W
    for ax, keep in ((out_ax, keep_out), (in_ax, keep_in)):
        if not keep.all():
            Wn = Wn.index_select(ax, torch.as_tensor(np.flatnonzero(keep)))
    new = {w: R.attr(a[w].target, Wn), x: R.arg(a[x])}
    return R.emit_like(node, a, new)


@rule("expert_linear", expert_linear, names=("x", "weight", "expert_ids"),
      rewrite=lambda n, R, a: _expert_rewrite(n, R, a, transposed=False, x="x", w="weight"))
def expert_linear_rule(node, A, a):
    """y[s] = W[ids[s]] @ x[s]: input i read by output o when some expert's weight there is non-zero."""
    return _expert_analyze(node, A, a["x"], a["weight"], transposed=False, others=[a["expert_ids"]])


@rule("grouped_mm", aten._grouped_mm.default, "transformers::grouped_mm_fallback.default",
      names=("input", "mat2", "offs"), per_target={"transformers::grouped_mm_fallback.default": ("input", "weight", "offs")},
      rewrite=lambda n, R, a: _expert_rewrite(n, R, a, transposed=True, x="input",
                                              w="weight" if "weight" in a.names else "mat2"))
def grouped_mm(node, A, a):
    """y[s] = x[s] @ W[g(s)] with rows grouped by the offsets (``W [E, in, out]``); 2-D input, 3-D weight,
    no bias, no output dtype (``aten._grouped_mm``'s other layouts are not followed)."""
    w = a.get("weight", a.get("mat2"))
    if a.get("bias") is not None or a.get("out_dtype") is not None:
        A.decline(node, "grouped mm with a bias or an output dtype")
        return None
    return _expert_analyze(node, A, a["input"], w, transposed=True, others=[a.get("offs")])


@rule("repeat_interleave", torch.repeat_interleave, method("repeat_interleave"), aten.repeat_interleave.self_int,
      names=("input", "repeats", "dim"))
def repeat_interleave(node, A, a):
    """``x.repeat_interleave(r, dim)`` with an int ``r`` on a non-channel axis: rows repeated, channels kept."""
    src, s = A.info(a["input"]), A.shape(a["input"])
    d = a.get("dim")
    if src is None or s is None or isinstance(a["repeats"], fx.Node) or type(d) is not int \
            or d % len(s) == src.dim or A.shape(node) is None or len(A.shape(node)) != len(s):
        A.freeze(src)
        return None
    return src
