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
* constant input channels fold into the three projection biases (they are Linear layers).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx

from ..attention import self_attention
from ..values import ChanInfo, shape_of
from .registry import rule

_NAMES = ("input", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "out_weight", "out_bias",
          "num_heads", "scale", "batch_first")
_PROJ = ("q", "k", "v")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _analyze(node: fx.Node, A, a) -> ChanInfo | None:
    x = a["input"]
    src, s, out_s = A.info(x), A.shape(x), A.shape(node)
    T = {n: A.tensor(a[n]) for n in _NAMES[1:8]}
    bo = A.tensor(a.get("out_bias"))
    if any(t is None for t in T.values()) or s is None or out_s is None or (a.get("out_bias") is not None and bo is None):
        A.freeze(list(node.args))
        return None
    if src is not None and src.dim != len(s) - 1:
        A.freeze(src)
        src = None
    Wq, Wk, Wv, Wo = (_np(T[f"{p}_weight"]) for p in ("q", "k", "v", "out"))
    bv = _np(T["v_bias"])
    out_ids = A.fresh(Wo.shape[0])
    if src is not None:  # every output may depend on every input a projection reads
        read = (Wq != 0).any(0) | (Wk != 0).any(0) | (Wv != 0).any(0)
        A.read(src, out_ids, np.broadcast_to(read, (Wo.shape[0], len(read))))
        dyn_in, c = ~src.const, np.where(src.const, src.value, 0.0)
    else:
        dyn_in, c = np.ones(Wv.shape[1], bool), np.zeros(Wv.shape[1])
    v_const = ~((Wv != 0) & dyn_in[None, :]).any(1)
    v_val = bv + Wv @ c
    row_const = ~((Wo != 0) & ~v_const[None, :]).any(1)
    H = int(a["num_heads"])
    if shrinks(_layout(Wq, _np(T["q_bias"]), Wk, Wv, Wo, H, A.align), H, Wq.shape[0] // H, Wv.shape[0] // H):
        A.local_change(node)  # heads or per-head dims to drop, whatever the channel plan says
    out_val = (_np(bo) if bo is not None else 0.0) + Wo @ np.where(v_const, v_val, 0.0)
    return ChanInfo(len(out_s) - 1, out_ids, row_const, np.where(row_const, out_val, 0.0))


def pack_rows(W: torch.Tensor, b: torch.Tensor, heads: list[list[int]],
              width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each kept head's live dims, zero-padded to ``width`` per head."""
    W2 = W.new_zeros((len(heads) * width, W.shape[1]))
    b2 = b.new_zeros(len(heads) * width)
    for i, dims in enumerate(heads):
        W2[i * width:i * width + len(dims)] = W[dims]
        b2[i * width:i * width + len(dims)] = b[dims]
    return W2, b2


def pack_cols(Wo: torch.Tensor, vdims: list[list[int]], width: int) -> torch.Tensor:
    """Columns of the output projection for each kept head's value dims, zero-padded to ``width``."""
    Wo2 = Wo.new_zeros((Wo.shape[0], len(vdims) * width))
    for i, dims in enumerate(vdims):
        Wo2[:, i * width:i * width + len(dims)] = Wo[:, dims]
    return Wo2


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


def shrinks(layout, H: int, dq: int, dv: int) -> bool:
    """The layout drops a head or narrows the per-head widths."""
    heads, _, _, wq_, wv_ = layout
    return len(heads) < H or wq_ < dq or wv_ < dv


def _layout(Wq, bq, Wk, Wv, Wo, H: int, align: int = 1):
    """Softmax attention: a value dim lives when it is read and reads; a query/key dim when k reads
    something (else a per-query shift) and q is not identically 0."""
    v_live = (Wv != 0).any(1) & (Wo != 0).any(0)
    qk_live = (Wk != 0).any(1) & ((Wq != 0).any(1) | (bq != 0))
    return head_layout(qk_live, v_live, H, align)


def _rewrite(node: fx.Node, R, a) -> fx.Node:
    out_info, src = R.info(node), R.info(a["input"])
    if out_info is None:
        return R.copy(node)
    s = shape_of(a["input"])
    if src is not None and (s is None or src.dim != len(s) - 1):
        src = None  # the analysis' decision: an input tracked on another axis than the embedding was frozen
    T = {n: R.tensor(a[n]).double() for n in _NAMES[1:8]}
    dtype = R.tensor(a["q_weight"]).dtype
    E_in = T["q_weight"].shape[1]
    keep_in = R.keep(src, E_in)
    if src is not None:
        c = torch.as_tensor(np.where(~keep_in & src.const, src.value, 0.0))
        for p in _PROJ:  # constant inputs fold into each projection's bias (Linear identity)
            T[f"{p}_bias"] = T[f"{p}_bias"] + T[f"{p}_weight"] @ c
            T[f"{p}_weight"] = T[f"{p}_weight"][:, torch.as_tensor(keep_in)]
    ko = torch.as_tensor(R.keep(out_info))
    bo_t = R.tensor(a.get("out_bias"))
    Wo = T["out_weight"][ko]
    bo = (bo_t.double()[ko] if bo_t is not None else torch.zeros(int(ko.sum()), dtype=torch.float64))
    Wq, bq, Wk, bk, Wv, bv = (T[f"{p}_{w}"] for p in _PROJ for w in ("weight", "bias"))
    v_reads = (Wv != 0).any(1)
    bo = bo + Wo[:, ~v_reads] @ bv[~v_reads]  # softmax rows sum to 1: a constant value dim is its bias
    heads, qdims, vdims, wq_, wv_ = _layout(Wq, bq, Wk, Wv, Wo, int(a["num_heads"]), R.plan.align)
    Wq2, bq2 = pack_rows(Wq, bq, qdims, wq_)
    Wk2, bk2 = pack_rows(Wk, bk, qdims, wq_)
    Wv2, bv2 = pack_rows(Wv, bv, vdims, wv_)
    Wo2 = pack_cols(Wo, vdims, wv_)
    new = {"q_weight": Wq2, "q_bias": bq2, "k_weight": Wk2, "k_bias": bk2, "v_weight": Wv2, "v_bias": bv2,
           "out_weight": Wo2}
    args = [R.arg(a["input"])] + [R.attr(a[n].target, new[n].to(dtype)) for n in _NAMES[1:8]]
    bias_name = a["out_bias"].target if a.get("out_bias") is not None else f"{a['out_weight'].target}_bias"
    args += [R.attr(bias_name, bo.to(dtype)), len(heads), a["scale"], a.get("batch_first", True)]
    return R.graph.call_function(self_attention, tuple(args))


rule("attention", self_attention, names=_NAMES, rewrite=_rewrite)(_analyze)
