"""Rotary position embeddings (RoPE): ``sqr_fx.attention.rotary(x, cos, sin, half)`` (rotate_half form)
and ``rotary_interleaved(x, cos, sin)`` (GPT-J's rotate_every_two: pairs (2i, 2i + 1), the same facts).

The front end rewrites ``x * cos + rotate_half(x) * sin`` to that one call (``patterns.py``). With
``h = half = D/2``, pair ``(i, i + h)`` and tables ``c = cos``, ``s = sin`` at some position::

    y_i     = x_i     c_i     - x_{i+h} s_i
    y_{i+h} = x_{i+h} c_{i+h} + x_i     s_{i+h}

so output dims i and i + h read exactly input dims i and i + h: the pair is ONE channel group
(``A.union``), removed together from x (its producer's rows) and y (its readers). Values:

* **zero stays zero**: both members exactly 0 gives ``y_i = y_{i+h} = 0`` (finite tables);
* **a constant does not stay constant**: a constant non-zero pair gives ``y`` that varies with the
  tables, i.e. with the position. For a key this matters: in plain attention a constant key dim is a
  per-query shift of the scores (softmax drops it); after rotation the pair's share of the score is
  ``(q_i k_i + q_{i+h} k_{i+h}) cos(a_m - a_n) + (q_i k_{i+h} - q_{i+h} k_i) sin(a_m - a_n)``, which
  depends on the key position n, so it is NOT removable. The output is therefore ``zero`` where the
  whole pair is zero and dynamic everywhere else.

Attention then removes a pair from q and k when the rotated query pair is zero for every token or
the rotated key pair is (``rules/heads.py``: zero is a constant), and whole heads as usual. The
rewrite passes the tables at the kept dims only: ``index_select`` on their last axis when every kept
head keeps the same dims, a per-head gather (tables broadcast over heads) otherwise.
Preconditions: ``x``'s channels are its last axis (head-split or not), the tables broadcast against
``x`` without widening it, are untracked, and do not vary along the head axis.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import fx

from ..attention import rotary, rotary_interleaved
from ..values import ChanInfo, shape_of
from .registry import rule


def _tables_ok(A, t: Any, info: ChanInfo, shape: tuple[int, ...]) -> bool:
    """``t`` is a number, or an untracked tensor broadcasting against x (rank ``len(shape)``) with
    size D or 1 on the last axis and size 1 on the head axis."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return True
    st = A.shape(t) if isinstance(t, fx.Node) else None
    if st is None or A.info(t) is not None or len(st) > len(shape) or (st and st[-1] not in (1, shape[-1])):
        return False
    if any(a not in (1, b) for a, b in zip(st[::-1], shape[::-1])):
        return False
    if info.split:
        h = info.head - (len(shape) - len(st))
        return h < 0 or st[h] == 1
    return True


def _rewrite(node: fx.Node, R, a) -> fx.Node:
    src = R.info(a["x"])
    if src is None or R.keep(src).all():
        return R.copy(node)
    keep = src.per_head(R.keep(src))
    rows = keep[keep.any(1)]
    n_in = len(node.meta["sqr_fx.rotary_shape"])
    uniform = (rows == rows[0]).all()
    tables = []
    for name in ("cos", "sin"):
        t = a[name]
        if not isinstance(t, fx.Node) or shape_of(t)[-1] == 1 or (uniform and rows[0].all()):
            tables.append(R.arg(t))  # (every kept head keeps all dims: only whole heads went)
            continue
        rt = len(shape_of(t))
        if uniform:
            tables.append(R.index_select(R.arg(t), rt - 1, np.flatnonzero(rows[0]), f"{node.name}_{name}"))
            continue
        # heads keep different pairs: gather [.., 1, T, D] -> [.., H', T, D'] (the head axis is size 1)
        new = R.arg(t)
        for _ in range(n_in - rt):
            new = R.graph.call_function(torch.unsqueeze, (new, 0))
        idx = np.stack([np.flatnonzero(r) for r in rows])
        new = R.index_select(new, n_in - 1, idx.reshape(-1), f"{node.name}_{name}")
        new = R.graph.call_function(torch.unflatten, (new, n_in - 1, tuple(idx.shape)))
        new = R.graph.call_function(torch.movedim, (new, n_in - 1, src.head))
        tables.append(R.graph.call_function(torch.squeeze, (new, src.head + 1)))
    x = R.arg(a["x"])
    if node.target is rotary_interleaved:
        return R.graph.call_function(rotary_interleaved, (x, *tables))
    return R.graph.call_function(rotary, (x, *tables, int(rows[0].sum()) // 2))


def _pairs(node: fx.Node, D: int) -> tuple[np.ndarray, np.ndarray]:
    """The two members of every rotation pair: (i, i + D/2), or (2i, 2i + 1) interleaved."""
    if node.target is rotary_interleaved:
        return np.arange(0, D, 2), np.arange(1, D, 2)
    return np.arange(D // 2), np.arange(D // 2, D)


@rule("rotary", rotary, rotary_interleaved, names=("x", "cos", "sin", "half"), rewrite=_rewrite, heads=True,
      per_target={rotary_interleaved: ("x", "cos", "sin")})
def rotary_rule(node: fx.Node, A, a) -> ChanInfo | None:
    """Pairs (i, i + half) (or (2i, 2i + 1)) of every head are one group; zero pairs stay zero, nothing
    else is constant."""
    x = a["x"]
    src, s = A.info(x), A.shape(x)
    if src is None or s is None:
        A.freeze(src)
        return None
    half = a.get("half", s[-1] // 2)
    ok = (type(half) is int and A.shape(node) == s and s[-1] == 2 * half and src.dim == len(s) - 1 and not src.blocks
          and all(_tables_ok(A, a[n], src, s) for n in ("cos", "sin")))
    if not ok:
        A.decline(node, "x's channels are not its last axis of 2 * half dims, or the cos/sin tables are "
                        "tracked, vary per head, or widen x", src, a["cos"], a["sin"])
        return None
    node.meta["sqr_fx.rotary_shape"] = s
    lo, hi = _pairs(node, s[-1])
    ids = src.per_head(src.ids)
    A.union(ids[:, lo].reshape(-1), ids[:, hi].reshape(-1))
    z = src.per_head(src.zero)
    pair_zero = z[:, lo] & z[:, hi]
    zero = np.zeros_like(z)
    zero[:, lo], zero[:, hi] = pair_zero, pair_zero
    return replace(src, const=zero.reshape(-1), value=np.zeros(len(src)))
