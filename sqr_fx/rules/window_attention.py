"""Shifted-window attention (torchvision Swin V1/V2): value dims, query/key dims and heads removed.

Targets: ``torchvision.models.swin_transformer.shifted_window_attention`` (``torch.fx.wrap``-ped,
one node after ``symbolic_trace``) and sqr_fx's own :func:`sqr_fx.window_attention.window_attention`,
which the rewrite emits: torchvision derives every width from the input (``C // num_heads`` per
head, ``C`` outputs, scale ``(C // num_heads) ** -0.5``), so a call with narrower heads than the
residual stream, at the original scale, is only expressible in the explicit form.

Proofs in docs/rules.md ("Shifted-window attention"). In short, per window and head, softmax rows
summing to 1 and being invariant to a per-query shift (the relative position bias and the -100
shift mask are additive per (query, key), so still a per-query shift):

* a value dim with a zero ``W_v`` row is ``b_v[d]`` at every token, padded ones included:
  ``W_o[:, d] b_v[d]`` folds into the output bias; a value dim with a zero ``W_o`` column goes;
* softmax (V1): a query/key dim with ``W_k[d] == 0`` (a per-query shift) or ``W_q[d] == 0 and
  b_q[d] == 0`` (adds 0) goes; the scale stays the original one (explicit ``scale``);
* cosine (V2): ``q`` and ``k`` are L2-normalized per head, so a dim goes only when it is exactly 0
  in both (``W_q[d] == 0, b_q[d] == 0, W_k[d] == 0, b_k[d] == 0``; torchvision zeroes ``b_k``);
* a head without value dims goes with its relative-position-bias and logit-scale slices;
* input channels: the window partition zero-PADS the map, so a padded token has ``x = 0`` where a
  constant channel holds ``c``. A constant input channel is therefore foldable only where the pad
  cannot see the difference: ``c == 0``, or read by ``W_q`` alone (padded queries are cropped).
  Every other constant input counts as a dynamic read (kept).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import numpy as np
import torch
from torch import fx

from ..trace import tied_targets
from ..values import ChanInfo, shape_of
from ..window_attention import window_attention
from .attention import head_layout, pack_cols, pack_rows, shrinks
from .registry import rule

try:
    from torchvision.models.swin_transformer import _get_relative_position_bias as _tv_rpb
    from torchvision.models.swin_transformer import shifted_window_attention as _tv_swa
except ImportError:  # pragma: no cover - torchvision is optional
    _tv_swa = _tv_rpb = None

_TV_NAMES = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
             "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
_SQ_NAMES = ("input", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "proj_weight", "proj_bias",
             "relative_position_bias", "window_size", "num_heads", "shift_size", "scale", "logit_scale")
_PROJ = ("q", "k", "v")


def _head_axis(a: Any, H: int) -> Optional[int]:
    """Axis of a per-head tensor (relative position bias ``[1, H, N, N]``, logit scale ``[H, 1, 1]``)
    that holds the heads; -1 when it broadcasts over them; None when not understood (the op stays frozen)."""
    if a is None:
        return -1
    s = shape_of(a)
    if s is None:
        return None
    if all(d == 1 for d in s) or (len(s) >= 3 and s[-3] == 1 != H):
        return -1
    return len(s) - 3 if len(s) >= 3 and s[-3] == H else None


def _parse(node: fx.Node, a, tensor) -> Optional[dict[str, Any]]:
    """Uniform view of a window-attention call: float64 q/k/v/o weights and biases, heads, scale.

    ``tensor``: the caller's ``get_attr`` reader (None for a computed or tied tensor). None: not
    understood (training mode, computed weights, odd per-head tensors), the op stays frozen."""
    H, ws, shift = a.get("num_heads"), a.get("window_size"), a.get("shift_size")
    if not (isinstance(H, int) and H > 0 and all(isinstance(v, (list, tuple)) and len(v) == 2
                                               and all(isinstance(i, int) for i in v) for v in (ws, shift))):
        return None
    cosine = a.get("logit_scale") is not None
    if node.target is _tv_swa:
        if a.get("training", True) is not False:
            return None  # dropout would be live: the pass keeps eval-mode functions only
        qkv, wo = tensor(a["qkv_weight"]), tensor(a["proj_weight"])
        if qkv is None or wo is None or qkv.shape[0] % 3:
            return None
        b = a.get("qkv_bias")
        bqkv = tensor(b) if b is not None else qkv.new_zeros(qkv.shape[0])
        if bqkv is None:
            return None
        W = dict(zip(_PROJ, qkv.double().chunk(3)))
        B = dict(zip(_PROJ, bqkv.double().chunk(3)))
        if cosine:
            B["k"] = torch.zeros_like(B["k"])  # torchvision zeroes the key bias of cosine attention
        scale = None if cosine else float((qkv.shape[1] // H) ** -0.5)  # its C // num_heads, C = input width
        dtype = qkv.dtype
    else:
        W, B = {}, {}
        for p in _PROJ:
            W[p], B[p] = tensor(a[f"{p}_weight"]), tensor(a[f"{p}_bias"])
            if W[p] is None or B[p] is None:
                return None
        wo, dtype = tensor(a["proj_weight"]), W["q"].dtype
        scale = a.get("scale")
        if wo is None or not (cosine or isinstance(scale, float)):
            return None
        W = {p: t.double() for p, t in W.items()}
        B = {p: t.double() for p, t in B.items()}
    pb = a.get("proj_bias")
    bo = tensor(pb) if pb is not None else wo.new_zeros(wo.shape[0])
    if bo is None or any(W[p].shape[0] % H for p in _PROJ) or W["q"].shape != W["k"].shape:
        return None
    rpb_ax, ls_ax = _head_axis(a.get("relative_position_bias"), H), _head_axis(a.get("logit_scale"), H)
    if not isinstance(a.get("relative_position_bias"), fx.Node) or rpb_ax is None or ls_ax is None:
        return None
    return dict(W=W, B=B, Wo=wo.double(), bo=bo.double(), H=H, scale=scale, cosine=cosine, dtype=dtype,
                rpb_ax=rpb_ax, ls_ax=ls_ax)


def _layout(c: dict[str, Any], align: int = 1):
    """Kept heads, their live query/key and value dims, and the shared widths (module docstring)."""
    W = {p: c["W"][p].numpy() for p in _PROJ}
    bq, bk = c["B"]["q"].numpy(), c["B"]["k"].numpy()
    v_live = (W["v"] != 0).any(1) & (c["Wo"].numpy() != 0).any(0)
    q_zero = ~(W["q"] != 0).any(1) & (bq == 0)
    if c["cosine"]:  # normalized q and k: only a dim that is exactly 0 in both leaves the norms alone
        qk_live = ~(q_zero & ~(W["k"] != 0).any(1) & (bk == 0))
    else:  # k_d constant: a per-query shift; q_d == 0: adds 0
        qk_live = (W["k"] != 0).any(1) & ~q_zero
    return head_layout(qk_live, v_live, c["H"], align)


def _analyze(node: fx.Node, A, a):
    x = a["input"]
    src, s, out_s = A.info(x), A.shape(x), A.shape(node)
    c = _parse(node, a, A.tensor)
    if c is None or s is None or out_s is None or len(s) != 4 or len(out_s) != 4 or c["W"]["q"].shape[1] != s[3]:
        A.freeze(list(node.args), dict(node.kwargs))
        return None
    if src is not None and (src.dim != 3 or getattr(src, "split", False)):
        A.freeze(src)
        src = None
    W = {p: c["W"][p].numpy() for p in _PROJ}
    Wo, bo, bv = c["Wo"].numpy(), c["bo"].numpy(), c["B"]["v"].numpy()
    out_ids = A.fresh(Wo.shape[0])
    n_in = W["q"].shape[1]
    if src is not None:
        kv_reads = (W["k"] != 0).any(0) | (W["v"] != 0).any(0)
        # padded tokens hold 0: a constant folds exactly only when it is 0 or only q reads it
        ok = src.zero | (src.const & ~kv_reads)
        read = (W["q"] != 0).any(0) | kv_reads
        A.read(replace(src, const=ok, value=np.where(ok, src.value, 0.0)), out_ids,
               np.broadcast_to(read, (Wo.shape[0], n_in)))
        dyn_in = ~ok
    else:
        dyn_in = np.ones(n_in, bool)
    v_const = ~((W["v"] != 0) & dyn_in[None, :]).any(1)  # = b_v at every token, padded ones included
    row_const = ~((Wo != 0) & ~v_const[None, :]).any(1)
    out_val = bo + Wo @ np.where(v_const, bv, 0.0)
    H = c["H"]
    if shrinks(_layout(c, A.align), H, W["q"].shape[0] // H, W["v"].shape[0] // H):
        A.local_change(node)
    return ChanInfo(3, out_ids, row_const, np.where(row_const, out_val, 0.0))


def _slice_heads(R, a: Any, ax: int, heads: list[int], hint: str) -> Any:
    """The per-head tensor ``a`` (an old-graph node) restricted to ``heads`` along ``ax``, in the new graph.

    A single-use parameter is sliced in place (torchvision's relative position bias table too), so
    removed heads' parameters leave the model; anything else gets an ``index_select``."""
    if ax < 0:
        return R.arg(a)
    tied = tied_targets(R.old)

    def own(n: Any) -> bool:  # a parameter only this reader reads: safe to slice in place
        return isinstance(n, fx.Node) and n.op == "get_attr" and len(n.users) == 1 and n.target not in tied

    if own(a):
        t = R.tensor(a)
        return R.attr(a.target, t.index_select(ax, torch.as_tensor(heads, device=t.device)))
    if (a.op == "call_function" and a.target is _tv_rpb and len(a.users) == 1 and len(a.args) == 3
            and own(a.args[0]) and not a.kwargs):
        table, index, ws = a.args
        t = R.tensor(table)
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == shape_of(a)[ax]:
            t = t.index_select(1, torch.as_tensor(heads, device=t.device))
            return R.graph.call_function(_tv_rpb, (R.attr(table.target, t), R.arg(index), ws))
    return R.index_select(R.arg(a), ax, np.asarray(heads), hint)


def _rewrite(node: fx.Node, R, a):
    out_info, src = R.info(node), R.info(a["input"])
    if out_info is None:
        return R.copy(node)
    c = _parse(node, a, R.tensor)
    W, B = dict(c["W"]), dict(c["B"])
    H = c["H"]
    dq, dv = W["q"].shape[0] // H, W["v"].shape[0] // H
    keep_in = R.keep(src, W["q"].shape[1])
    if src is not None and not keep_in.all():
        cin = torch.as_tensor(np.where(~keep_in & src.const, src.value, 0.0), device=W["q"].device)
        for p in _PROJ:  # removed inputs are 0, read by q only, or unread (see the analysis)
            B[p] = B[p] + W[p] @ cin
            W[p] = W[p][:, torch.as_tensor(keep_in, device=W[p].device)]
    ko = torch.as_tensor(R.keep(out_info), device=c["Wo"].device)
    Wo, bo = c["Wo"][ko], c["bo"][ko]
    v_reads = (W["v"] != 0).any(1)
    bo = bo + Wo[:, ~v_reads] @ B["v"][~v_reads]  # softmax rows sum to 1: a constant value dim is its bias
    layout = _layout(dict(c, W=W, B=B, Wo=Wo), R.plan.align)
    if keep_in.all() and bool(ko.all()) and not shrinks(layout, H, dq, dv):
        return R.copy(node)
    heads, qdims, vdims, wq_, wv_ = layout
    new = {}
    for p, dims, width in (("q", qdims, wq_), ("k", qdims, wq_), ("v", vdims, wv_)):
        new[f"{p}_weight"], new[f"{p}_bias"] = pack_rows(W[p], B[p], dims, width)
    new["proj_weight"], new["proj_bias"] = pack_cols(Wo, vdims, wv_), bo
    if node.target is _tv_swa:  # named after the qkv tensor, one name per tensor: ``attn.qkv.weight`` ->
        # ``attn.qkv.q_weight`` (its Linear module holds one qkv weight); a tensor of another name, ``P.qkv1``
        # or a top-level ``qkv``, -> ``P.qkv1_q_weight`` / ``qkv_q_weight`` (two calls whose tensors share a
        # module once both wrote ``P.q_weight``: the second overwrote the first)
        qkv = a["qkv_weight"].target
        names = {f"{p}_{w}": f"{qkv[:-len('weight')]}{p}_{w}" if qkv.endswith(".weight") else f"{qkv}_{p}_{w}"
                 for p in _PROJ for w in ("weight", "bias")}
    else:
        names = {f"{p}_{w}": a[f"{p}_{w}"].target for p in _PROJ for w in ("weight", "bias")}
    names["proj_weight"] = a["proj_weight"].target
    pb = a.get("proj_bias")
    names["proj_bias"] = pb.target if pb is not None else f"{a['proj_weight'].target}_bias"
    t = {k: R.attr(names[k], v.to(c["dtype"])) for k, v in new.items()}
    rpb, ls = a["relative_position_bias"], a.get("logit_scale")
    if len(heads) < H:  # the removed heads' slices of the per-head tensors go too
        rpb = _slice_heads(R, rpb, c["rpb_ax"], heads, f"{node.name}_heads")
        ls = _slice_heads(R, ls, c["ls_ax"], heads, f"{node.name}_heads") if ls is not None else None
    else:
        rpb, ls = R.arg(rpb), R.arg(ls)
    args = (R.arg(a["input"]), t["q_weight"], t["q_bias"], t["k_weight"], t["k_bias"], t["v_weight"], t["v_bias"],
            t["proj_weight"], t["proj_bias"], rpb, list(a["window_size"]), len(heads), list(a["shift_size"]),
            c["scale"], ls)
    return R.graph.call_function(window_attention, args)


_TARGETS = [window_attention] + ([_tv_swa] if _tv_swa is not None else [])
rule("window_attention", *_TARGETS, names=_SQ_NAMES, rewrite=_rewrite,
     per_target={_tv_swa: _TV_NAMES} if _tv_swa is not None else None)(_analyze)
