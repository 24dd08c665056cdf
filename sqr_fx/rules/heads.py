"""Attention over head-split tensors: ``scaled_dot_product_attention`` removes dims per head.

Head-split reshapes (``[B, T, H*D] -> [B, T, H, D]``, then ``transpose(1, 2)``) give q, k, v
head-split channel infos (``ChanInfo.split``). For one head h, query i, keys j and
``p_ij = softmax_j(scale * q_i . k_j + m_ij)`` (``m``: the mask, ``-inf`` where masked):

* **query/key dim d** contributes ``q_id k_jd`` to every score. If ``k_jd = c`` for every key
  (constant), it adds ``c q_id`` to the whole row i: softmax is invariant to a per-row shift, so
  ``p`` is unchanged when d leaves q and k. If ``q_id = 0`` for every query, it adds 0. Either way
  d goes from both q and k (their positions are coupled), and the ORIGINAL scale is passed
  explicitly (sdpa's default ``1/sqrt(D)`` would follow the new width).
* **value dim e**: ``o_ie = sum_j p_ij v_je``. A constant ``v_je = c`` gives ``o_ie = c`` because
  every row of ``p`` sums to 1 -- unless a row can be fully masked (its ``p`` is NaN), so with an
  ``attn_mask`` a constant value dim is treated as dynamic (kept, never folded). ``o`` carries
  v's channel ids: a value dim nothing reads leaves v and o together.
* **heads**: q, k and v must keep the same heads (``align_heads``), each with the same number of
  positions per head (the plan keeps head-split tensors rectangular); a per-head mask
  (``attn_mask.shape[-3] == H``) is gathered to the kept heads.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ..values import ChanInfo
from .registry import rule

aten = torch.ops.aten

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _as_heads(info: ChanInfo | None, shape) -> ChanInfo | None:
    """The info as [.., H, S, D] heads (axis -3) x dims (axis -1); None when laid out otherwise.
    A one-axis info is one head of D dims (axis -1) or, when D == 1, H heads of one dim (axis -3)."""
    if info is None or shape is None or len(shape) < 3:
        return None
    nd = len(shape)
    if info.split:
        return info if (info.head, info.dim) == (nd - 3, nd - 1) else None
    if info.dim == nd - 1:
        return replace(info, head=nd - 3, heads=1) if shape[-3] == 1 or nd == 3 else None
    if info.dim == nd - 3 and shape[-1] == 1:
        return replace(info, head=nd - 3, dim=nd - 1, heads=len(info))
    return None


def _alive_heads(R, info: ChanInfo) -> np.ndarray:
    return info.per_head(R.keep(info)).any(1)


def _rewrite(node: fx.Node, R, a):
    out = R.info(node)
    iq, iv = node.meta.get("sqr_fx.sdpa_heads", (None, None))
    if out is None or (R.keep(iq).all() and R.keep(iv).all()):
        return R.copy(node)
    new = {}
    scale = a.get("scale")
    if scale is None:  # sdpa's default follows q's width: pin the original one
        scale = 1.0 / math.sqrt(node.meta["sqr_fx.sdpa_d"])
    new["scale"] = scale
    mask = a.get("attn_mask")
    alive = _alive_heads(R, iq) | _alive_heads(R, iv)
    if node.meta.get("sqr_fx.mask_per_head") is not None and not alive.all():
        m = R.arg(mask)
        new["attn_mask"] = R.index_select(m, node.meta["sqr_fx.mask_per_head"], np.flatnonzero(alive),
                                          f"{node.name}_heads")
    return R.emit_like(node, a, new)


@rule("sdpa", F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default, names=_NAMES,
      rewrite=_rewrite, heads=True)
def sdpa(node: fx.Node, A, a) -> ChanInfo | None:
    """See the module docstring: q/k dims coupled and read only where the other side is not
    constant/zero, output = v's channels (constants folded only without a mask)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    sq, sk, sv, so = A.shape(q), A.shape(k), A.shape(v), A.shape(node)
    iq, ik, iv = _as_heads(A.info(q), sq), _as_heads(A.info(k), sk), _as_heads(A.info(v), sv)
    ok = (iq is not None and ik is not None and iv is not None and so is not None
          and iq.heads == ik.heads == iv.heads and len(iq) == len(ik)
          and sq[:-2] == sk[:-2] == sv[:-2] and sk[-2] == sv[-2]
          and not isinstance(a.get("dropout_p", 0.0), fx.Node) and float(a.get("dropout_p", 0.0) or 0.0) == 0.0
          and not a.get("enable_gqa", False) and not isinstance(a.get("scale"), fx.Node)
          and not isinstance(a.get("is_causal", False), fx.Node))
    H = iq.heads if ok else 1
    if ok and mask is not None:
        ms = A.shape(mask)
        ok = ms is not None and A.info(mask) is None
        if ok and H > 1 and len(ms) >= 3 and ms[-3] != 1:
            ok = ms[-3] == H and len(ms) == len(sq)  # per-head mask: gathered to the kept heads
            node.meta["sqr_fx.mask_per_head"] = len(ms) - 3
    if not ok:
        A.freeze([q, k, v, mask])  # nodes: frozen whatever their infos look like
        return None
    node.meta["sqr_fx.sdpa_d"] = sq[-1]
    node.meta["sqr_fx.sdpa_heads"] = (iq, iv)
    A.union(iq.ids, ik.ids)  # q dim d and k dim d of one head: one fate
    head_q, head_v = np.repeat(np.arange(H), len(iq) // H), np.repeat(np.arange(H), len(iv) // H)
    v_const = iv.const & (mask is None)  # rows summing to 1 are guaranteed only without a mask
    same = (head_v[:, None] == head_q[None, :]) & ~v_const[:, None]
    A.read(iq, iv.ids, same & ~ik.const[None, :])
    A.read(ik, iv.ids, same & ~iq.zero[None, :])
    A.align_heads(iq, ik, iv)
    # the output has v's layout: its info in the form v's own producer gave it
    return replace(A.info(v), const=v_const, value=np.where(v_const, iv.value, 0.0))
