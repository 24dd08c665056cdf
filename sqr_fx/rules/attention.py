"""Self-attention (``sqr_fx.attention.self_attention``): dims removed per head, heads when empty.

Identities, per head with softmax rows summing to 1:

* value dim d with a zero ``W_v`` row: its output is ``b_v[d]`` for every token, so
  ``W_o[:, d] * b_v[d]`` folds into the output bias and d leaves v and ``W_o``;
  a value dim no kept output reads (zero ``W_o`` column) simply goes.
* query/key dim d with ``W_k[d] == 0``: ``k_d = b_k[d]`` adds ``q_d b_k[d]`` to every score of a
  query, and softmax is shift-invariant per query; with ``W_q[d] == 0`` and ``b_q[d] == 0`` it adds 0.
  Either way d leaves q and k. The scale stays the ORIGINAL ``1/sqrt(head_dim)``.
* a head without value dims contributes nothing and goes. Kept heads share one width per
  projection (torch's layout): a head with fewer live dims is padded with zero rows, which
  add 0 to the scores (q) and 0 to the output (v with a zero ``W_o`` column).
* ``align=N``: the stored widths stay minimal; where q/k and v heads were equally wide, the call pads
  every head with zero dims at run time (``qk_pad``, ``v_pad``: :func:`~sqr_fx.attention.padded_sdpa`)
  to one width, a multiple of N (at most the width before), so the fused attention kernels apply.
* constant input channels fold into the three projection biases (they are Linear layers).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from ..attention import self_attention
from ..values import ChanInfo, shape_of
from .registry import rule
from .weighted import NONZERO, finite

_NAMES = ("input", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "out_weight", "out_bias",
          "num_heads", "scale", "batch_first", "qk_pad", "v_pad")
_PROJ = ("q", "k", "v")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _nonzero(t: torch.Tensor) -> np.ndarray:
    return (t != 0).cpu().numpy()


def _matvec(W: torch.Tensor, c: np.ndarray) -> np.ndarray:
    """``W @ c`` in float64, over the non-zero entries of ``c`` only (the others add exact zeros: the
    weights are finite), so a mostly-zero ``c`` costs a few columns instead of the whole matrix."""
    cols = np.flatnonzero(c)
    if not len(cols):
        return np.zeros(W.shape[0])
    return _np(W[:, torch.as_tensor(cols)]) @ c[cols]


def _analyze(node: fx.Node, A, a) -> ChanInfo | None:
    x = a["input"]
    src, s, out_s = A.info(x), A.shape(x), A.shape(node)
    T = {n: A.tensor(a[n]) for n in _NAMES[1:8]}
    bo = A.tensor(a.get("out_bias"))
    if any(t is None for t in T.values()) or s is None or out_s is None or (a.get("out_bias") is not None and bo is None):
        A.freeze(list(node.args))
        return None
    if not all(t is None or finite(t) for t in (*T.values(), bo)):  # 0 * inf is NaN: a zero value or dim is still read by an inf weight
        A.decline(node, "non-finite projection weight or bias")
        return None
    if src is not None and src.dim != len(s) - 1:
        A.freeze(src)
        src = None
    nzq, nzk, nzv, nzo = (_nonzero(T[f"{p}_weight"]) for p in ("q", "k", "v", "out"))
    node.meta[NONZERO] = (nzq, nzk, nzv, nzo)  # the rewrite slices these instead of reading the weights again
    bv = _np(T["v_bias"])
    out_ids = A.fresh(nzo.shape[0])
    if src is not None:  # every output may depend on every input a projection reads
        read = nzq.any(0) | nzk.any(0) | nzv.any(0)
        A.read(src, out_ids, np.broadcast_to(read, (nzo.shape[0], len(read))))
        dyn_in, c = ~src.const, np.where(src.const, src.value, 0.0)
    else:
        dyn_in, c = np.ones(nzv.shape[1], bool), np.zeros(nzv.shape[1])
    v_const = ~(nzv & dyn_in[None, :]).any(1)
    v_val = bv + _matvec(T["v_weight"], c)
    row_const = ~(nzo & ~v_const[None, :]).any(1)
    H = int(a["num_heads"])
    if any(not isinstance(a.get(p, 0), int) or a.get(p, 0) < 0 for p in ("qk_pad", "v_pad")):
        A.freeze(list(node.args))
        return None
    layout = _layout(nzq, _nonzero(T["q_bias"]), nzk, nzv, nzo, H)
    dq, dv = nzq.shape[0] // H, nzv.shape[0] // H
    pads = (a.get("qk_pad", 0), a.get("v_pad", 0))
    if shrinks(layout, H, dq, dv) or _call_pads(a, layout, dq, dv, A.align) != pads:
        A.local_change(node)  # heads or per-head dims to drop, whatever the channel plan says
    out_val = (_np(bo) if bo is not None else 0.0) + _matvec(T["out_weight"], np.where(v_const, v_val, 0.0))
    return ChanInfo(len(out_s) - 1, out_ids, row_const, np.where(row_const, out_val, 0.0))


def _packed(dims: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) positions: kept head i's live dims go to ``i * width`` onwards."""
    dest = [i * width + j for i, d in enumerate(dims) for j in range(len(d))]
    return torch.as_tensor(dest, dtype=torch.long), torch.as_tensor([x for d in dims for x in d], dtype=torch.long)


def pack_rows(W: torch.Tensor, b: torch.Tensor, heads: list[list[int]],
              width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each kept head's live dims, zero-padded to ``width`` per head."""
    dest, src = _packed(heads, width)
    W2 = W.new_zeros((len(heads) * width, W.shape[1]))
    b2 = b.new_zeros(len(heads) * width)
    W2[dest] = W[src]
    b2[dest] = b[src]
    return W2, b2


def pack_cols(Wo: torch.Tensor, vdims: list[list[int]], width: int) -> torch.Tensor:
    """Columns of the output projection for each kept head's value dims, zero-padded to ``width``."""
    dest, src = _packed(vdims, width)
    cols = Wo.index_select(1, src)
    if len(dest) == len(vdims) * width:  # no padding: the gather is the result
        return cols
    return Wo.new_zeros((Wo.shape[0], len(vdims) * width)).index_copy_(1, dest, cols)


def head_layout(qk_live: np.ndarray, v_live: np.ndarray, H: int, align: int = 1):
    """Kept heads (those with a live value dim), their live query/key and value dims, the shared widths.

    ``qk_live``/``v_live``: per query/key row and per value row, whether it must stay. ``align`` > 1
    (``minimize(..., align=N)``): a shared width below the current one is rounded up to a multiple of
    ``align`` (at most the current width), and equal query/key and value widths stay equal (the fused
    attention kernels need one head dim); the extra rows are zero padding, exact as above."""
    dq, dv = len(qk_live) // H, len(v_live) // H
    heads = [h for h in range(H) if v_live[h * dv:(h + 1) * dv].any()]
    vdims = [[h * dv + d for d in range(dv) if v_live[h * dv + d]] for h in heads]
    qdims = [[h * dq + d for d in range(dq) if qk_live[h * dq + d]] for h in heads]
    wq_, wv_ = max([1] + [len(d) for d in qdims]), max([1] + [len(d) for d in vdims])
    if not heads:  # nothing reaches the output: one all-zero head keeps the call well-formed
        heads, vdims, qdims = [0], [[]], [[]]
    elif align > 1:
        wq_, wv_ = (min(-(-w // align) * align, d) for w, d in ((wq_, dq), (wv_, dv)))
        if dq == dv:  # one head dim for q, k and v: torch's fused CPU attention kernel needs it
            wq_ = wv_ = max(wq_, wv_)
    return heads, qdims, vdims, wq_, wv_


def kernel_pads(kernel: tuple[int, int], wq: int, wv: int, align: int) -> tuple[int, int]:
    """(q/k, v) zero dims an attention kernel appends to every head at run time for ``align`` > 1: where the
    kernel saw one head dim D for q, k and v (``kernel``: its q/k and v widths, the stored ones plus the call's
    pads), the kept widths ``wq`` / ``wv`` are padded to one width, a multiple of ``align`` (at most D)."""
    if align <= 1 or kernel[0] != kernel[1]:
        return 0, 0
    width = min(-(-max(wq, wv) // align) * align, kernel[0])
    return width - wq, width - wv


def _call_pads(a, layout, dq: int, dv: int, align: int) -> tuple[int, int]:
    """:func:`kernel_pads` of a ``self_attention`` call (``a``) with stored per-head widths ``dq`` / ``dv``."""
    kernel = (dq + a.get("qk_pad", 0), dv + a.get("v_pad", 0))
    return kernel_pads(kernel, layout[3], layout[4], align)


def shrinks(layout, H: int, dq: int, dv: int) -> bool:
    """The layout drops a head or narrows the per-head widths."""
    heads, _, _, wq_, wv_ = layout
    return len(heads) < H or wq_ < dq or wv_ < dv


def _layout(nzq: np.ndarray, bq_nz: np.ndarray, nzk: np.ndarray, nzv: np.ndarray, nzo: np.ndarray, H: int,
            align: int = 1):
    """Softmax attention (from the projections' non-zero patterns): a value dim lives when it is read and
    reads; a query/key dim when k reads something (else a per-query shift) and q is not identically 0."""
    v_live = nzv.any(1) & nzo.any(0)
    qk_live = nzk.any(1) & (nzq.any(1) | bq_nz)
    return head_layout(qk_live, v_live, H, align)


def _rewrite(node: fx.Node, R, a) -> fx.Node:
    out_info, src = R.info(node), R.info(a["input"])
    if out_info is None:
        return R.copy(node)
    s = shape_of(a["input"])
    if src is not None and (s is None or src.dim != len(s) - 1):
        src = None  # the analysis' decision: an input tracked on another axis than the embedding was frozen
    T = {n: R.tensor(a[n]) for n in _NAMES[1:8]}
    dtype = T["q_weight"].dtype
    keep_in = R.keep(src, T["q_weight"].shape[1])
    bias64 = {p: _np(T[f"{p}_bias"]) for p in _PROJ}  # folds are summed in float64, then cast once
    nzq, nzk, nzv, nzo = node.meta[NONZERO]
    if src is not None:
        nzq, nzk, nzv = (nz[:, keep_in] for nz in (nzq, nzk, nzv))
        c = np.where(~keep_in & src.const, src.value, 0.0)
        cols = torch.as_tensor(np.flatnonzero(keep_in))
        for p in _PROJ:  # constant inputs fold into each projection's bias (Linear identity)
            bias64[p] = bias64[p] + _matvec(T[f"{p}_weight"], c)
            T[f"{p}_weight"] = T[f"{p}_weight"].index_select(1, cols)
    ko = torch.as_tensor(np.flatnonzero(R.keep(out_info)))
    bo_t = R.tensor(a.get("out_bias"))
    Wo = T["out_weight"].index_select(0, ko)
    bo = _np(bo_t)[ko.numpy()] if bo_t is not None else np.zeros(len(ko))
    nzo = nzo[ko.numpy()]
    v_reads = nzv.any(1)
    # softmax rows sum to 1: a value dim that reads nothing is its bias, folded into the output bias
    bo = bo + _matvec(Wo, np.where(v_reads, 0.0, bias64["v"]))
    H = int(a["num_heads"])
    layout = _layout(nzq, bias64["q"] != 0, nzk, nzv, nzo, H)  # (the stored widths: minimal)
    heads, qdims, vdims, wq_, wv_ = layout
    pads = _call_pads(a, layout, T["q_weight"].shape[0] // H, T["v_weight"].shape[0] // H, R.plan.align)
    b = {p: torch.as_tensor(bias64[p]).to(dtype) for p in _PROJ}
    Wq2, bq2 = pack_rows(T["q_weight"], b["q"], qdims, wq_)
    Wk2, bk2 = pack_rows(T["k_weight"], b["k"], qdims, wq_)
    Wv2, bv2 = pack_rows(T["v_weight"], b["v"], vdims, wv_)
    Wo2 = pack_cols(Wo, vdims, wv_)
    new = {"q_weight": Wq2, "q_bias": bq2, "k_weight": Wk2, "k_bias": bk2, "v_weight": Wv2, "v_bias": bv2,
           "out_weight": Wo2}
    args = [R.arg(a["input"])] + [R.attr(a[n].target, new[n]) for n in _NAMES[1:8]]
    bias_name = a["out_bias"].target if a.get("out_bias") is not None else f"{a['out_weight'].target}_bias"
    args += [R.attr(bias_name, torch.as_tensor(bo).to(dtype)), len(heads), a["scale"], a.get("batch_first", True)]
    if any(pads):
        args += list(pads)
    return R.graph.call_function(self_attention, tuple(args))


rule("attention", self_attention, names=_NAMES, rewrite=_rewrite)(_analyze)
