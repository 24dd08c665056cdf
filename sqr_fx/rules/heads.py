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
  (``attn_mask.shape[-3] == H``, of q's rank or broadcast from fewer axes) is gathered to the kept heads.
* **kernel widths** (``minimize(..., align=N)``): the stored per-head widths stay minimal; where the
  kernel saw one head dim for q, k and v, the call becomes :func:`~sqr_fx.attention.padded_sdpa`, which
  appends zero dims to every head at run time up to one width, a multiple of N (at most the width
  before): a zero dim adds 0 to each score and yields an output dim of 0, cut off again; the scale is
  pinned. Fused attention kernels need one head dim (CPU) and multiples of 8 (CUDA).
* **grouped kv heads** (``enable_gqa=True``): q head t reads a copy of kv head ``t // r`` with ids of its
  own (``Analysis.copy_heads``), so a q head goes alone; where the kept q heads are no longer r per kept
  kv head, the rewrite gathers the kept kv heads for them (``index_select``) and drops ``enable_gqa``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from ..attention import padded_sdpa
from ..values import ChanInfo
from .attention import kernel_pads
from .registry import method, op_name, rule
from .shape import head_widths, kept_copies

aten = torch.ops.aten

_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "qk_pad", "v_pad")
_PADS = ("qk_pad", "v_pad")


def _as_heads(info: ChanInfo | None, shape, at: int = -1) -> ChanInfo | None:
    """The info as [.., H, S, D] heads (axis -3) x dims (axis ``at``: -1, or -2 for a transposed
    key); None when laid out otherwise. A one-axis info is one head of D dims (axis ``at``; with
    H > 1 heads on axis -3, that head repeated: the same channels in every head) or, when D == 1,
    H heads of one dim (axis -3)."""
    if info is None or shape is None or len(shape) < 3:
        return None
    nd = len(shape)
    d = nd + at
    if info.split:
        return info if (info.head, info.dim) == (nd - 3, d) else None
    if info.dim == d:  # channel d in every head alike: one head repeated (MQA's kv after repeat_kv)
        one = replace(info, head=nd - 3, heads=1)
        return one if shape[-3] == 1 or nd == 3 else _repeat_heads(one, shape[-3])
    if info.dim == nd - 3 and shape[d] == 1:
        return replace(info, head=nd - 3, dim=d, heads=len(info))
    return None


def _repeat_heads(info: ChanInfo, r: int) -> ChanInfo:
    """One head (MQA's single kv head, a one-axis info) as ``r`` heads read it: the same ids r times in a row
    (one fate: removing dim d removes it for all r readers)."""
    def rep(arr):
        return np.repeat(info.per_head(arr), r, axis=0).reshape(-1)

    return replace(info, ids=rep(info.ids), const=rep(info.const), value=rep(info.value), heads=info.heads * r)


def _attend(node: fx.Node, A, iq: ChanInfo, ik: ChanInfo, v: fx.Node, iv: ChanInfo, masked: bool,
            out: ChanInfo | None = None) -> ChanInfo:
    """The per-head facts shared by sdpa and matmul/softmax attention (module docstring); ``out``: the
    output's layout when it is not v's own (grouped kv heads)."""
    H = iq.heads
    A.union(iq.ids, ik.ids)  # q dim d and k dim d of one head: one fate
    head_q, head_v = np.repeat(np.arange(H), len(iq) // H), np.repeat(np.arange(H), len(iv) // H)
    v_const = iv.const & (not masked)  # rows summing to 1 are guaranteed only without a mask
    same = (head_v[:, None] == head_q[None, :]) & ~v_const[:, None]
    A.read(iq, iv.ids, same & ~ik.const[None, :])
    A.read(ik, iv.ids, same & ~iq.zero[None, :])
    A.align_heads(iq, ik, iv)
    # the output has v's layout: its info in the form v's own producer gave it
    base = out or A.info(v)
    if len(base) != len(iv):  # v's channels repeated over the heads (``_as_heads``): the output has them per head
        base = iv
    return replace(base, const=v_const, value=np.where(v_const, iv.value, 0.0))


def _repeats(g: np.ndarray, n: int, r: int) -> bool:
    """The kept copies read kept kv heads ``g`` (of ``n`` kept): each of them r times in a row, as
    enable_gqa reads them."""
    return len(g) == r * n and bool((g == np.arange(len(g)) // r).all())


def _alive_heads(R, info: ChanInfo) -> np.ndarray:
    return info.per_head(R.keep(info)).any(1)


def _rewrite(node: fx.Node, R, a):
    out = R.info(node)
    iq, iv = node.meta.get("sqr_fx.sdpa_heads", (None, None))
    if out is None:
        return R.copy(node)
    pads = kernel_pads(node.meta["sqr_fx.sdpa_kernel"], head_widths(R.keep(iq), iq)[1],
                        head_widths(R.keep(iv), iv)[1], R.plan.align)
    if R.keep(iq).all() and R.keep(iv).all() and pads == tuple(a.get(p, 0) for p in _PADS):
        return R.copy(node)
    new = {}
    scale = a.get("scale")
    if scale is None:  # sdpa's default follows q's width: pin the original one
        scale = 1.0 / math.sqrt(node.meta["sqr_fx.sdpa_d"])
    new["scale"] = scale
    gqa = node.meta.get("sqr_fx.sdpa_gqa")
    if gqa is not None:  # kept q heads no longer r per kept kv head: gather their kv heads, no enable_gqa
        src_k, src_v, r, copy_k, copy_v = gqa
        rows = {name: kept_copies(R, c, s, np.arange(c.heads) // r) for name, c, s in
                (("key", copy_k, src_k), ("value", copy_v, src_v))}
        if any(not _repeats(g, n, r) for _, g, n in rows.values()):
            for name, src in (("key", src_k), ("value", src_v)):
                new[name] = R.index_select(R.arg(a[name]), src.head, rows[name][1], f"{node.name}_{name}_copies")
            new["enable_gqa"] = False
    mask = a.get("attn_mask")
    alive = _alive_heads(R, iq) | _alive_heads(R, iv)
    if node.meta.get("sqr_fx.mask_per_head") is not None and not alive.all():
        dim, kept = node.meta["sqr_fx.mask_per_head"], np.flatnonzero(alive)
        if isinstance(mask, fx.Node) and mask.op == "get_attr" and len(mask.users) == 1:
            # a stored mask read only here: store its kept heads (not the whole mask and a gather)
            t = R.tensor(mask).index_select(dim, torch.as_tensor(kept, dtype=torch.long))
            new["attn_mask"] = R.buffer(f"{node.name}_mask", t)
        else:
            new["attn_mask"] = R.index_select(R.arg(mask), dim, kept, f"{node.name}_heads")
    emitted = R.emit_like(node, a, new)
    # arguments after ``is_causal`` go by name (sdpa's ``scale`` and ``enable_gqa`` are keyword-only; the
    # pads are set below)
    extra = dict(zip(_NAMES[6:], emitted.args[6:]))
    emitted.args = emitted.args[:6]
    emitted.kwargs = {k: v for k, v in {**extra, **emitted.kwargs}.items() if k not in _PADS}
    if any(pads):
        emitted.target = padded_sdpa
        emitted.kwargs = {**emitted.kwargs, "qk_pad": pads[0], "v_pad": pads[1]}
    elif emitted.target is padded_sdpa:
        emitted.target = F.scaled_dot_product_attention
    return emitted


@rule("sdpa", F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default, padded_sdpa,
      names=_NAMES[:8], rewrite=_rewrite, heads=True, per_target={padded_sdpa: _NAMES})
def sdpa(node: fx.Node, A, a) -> ChanInfo | None:
    """See the module docstring: q/k dims coupled and read only where the other side is not
    constant/zero, output = v's channels (constants folded only without a mask)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    sq, sk, sv, so = A.shape(q), A.shape(k), A.shape(v), A.shape(node)
    iq, ik, iv = _as_heads(A.info(q), sq), _as_heads(A.info(k), sk), _as_heads(A.info(v), sv)
    gqa = a.get("enable_gqa", False)
    ok = (iq is not None and ik is not None and iv is not None and so is not None and type(gqa) is bool
          and ik.heads == iv.heads and len(iq) // iq.heads == len(ik) // ik.heads
          and sq[:-3] == sk[:-3] == sv[:-3] and sk[-3:-1] == sv[-3:-1] and sq[-1] == sk[-1]
          and not isinstance(a.get("dropout_p", 0.0), fx.Node) and float(a.get("dropout_p", 0.0) or 0.0) == 0.0
          and not isinstance(a.get("scale"), fx.Node) and not isinstance(a.get("is_causal", False), fx.Node)
          and all(type(a.get(p, 0)) is int and a.get(p, 0) >= 0 for p in _PADS))
    # enable_gqa: q head t reads kv head t // r (r = q heads / kv heads); each q head reads a copy of its
    # kv head with a fate of its own (``copy_heads``): a q head can go alone, its kv head stays for the others
    ok = ok and (iq.heads == ik.heads and sq[-3] == sk[-3] if not gqa else
                 iq.split and ik.split and iv.split and sq[-3] == iq.heads and sk[-3] == ik.heads
                 and iq.heads % ik.heads == 0)
    H = iq.heads if ok else 1
    node.meta["sqr_fx.mask_per_head"] = None
    if ok and mask is not None:
        ms = A.shape(mask)
        ok = ms is not None and A.info(mask) is None
        if ok and H > 1 and len(ms) >= 3 and ms[-3] != 1:
            # per-head mask ([.., H, T, S], also timm's [H, T, S] attention bias): gathered to the kept heads
            ok = ms[-3] == H and len(ms) <= len(sq)
            node.meta["sqr_fx.mask_per_head"] = len(ms) - 3
    if not ok:
        A.freeze([q, k, v, mask])  # nodes: frozen whatever their infos look like
        return None
    node.meta["sqr_fx.sdpa_gqa"] = None
    if gqa:
        r, src_k, src_v = iq.heads // ik.heads, ik, iv
        ik, iv = (A.copy_heads(i, np.arange(i.heads * r) // r, i.head, i.dim) for i in (src_k, src_v))
        node.meta["sqr_fx.sdpa_gqa"] = (src_k, src_v, r, ik, iv)
    kernel = (sq[-1] + a.get("qk_pad", 0), sv[-1] + a.get("v_pad", 0))  # the head dims the kernel sees
    node.meta["sqr_fx.sdpa_d"], node.meta["sqr_fx.sdpa_kernel"] = kernel[0], kernel
    node.meta["sqr_fx.sdpa_heads"] = (iq, iv)
    out = _attend(node, A, iq, ik, v, iv, masked=mask is not None, out=iv if gqa else None)
    if kernel[0] == kernel[1]:  # one head dim for q, k and v: align pads it at run time (``kernel_pads``)
        A.kernel_heads(iq, ik, iv)
    if kernel_pads(kernel, sq[-1], sv[-1], A.align) != tuple(a.get(p, 0) for p in _PADS):
        A.local_change(node)  # the run-time padding changes even where no dim goes
    return out


# ---- attention written with matmul and softmax -------------------------------------------------
_MATMUL = (operator.matmul, torch.matmul, method("matmul"), aten.matmul.default, torch.bmm, method("bmm"),
           aten.bmm.default)
_SOFTMAX = (F.softmax, torch.softmax, method("softmax"), aten.softmax.int, aten._softmax.default)
# a masked_fill value this low gives exp(value - row max) == 0 in every float dtype (scores below
# 1e29 in magnitude): -inf, or the dtype minimum Hugging Face's eager attention uses
_MASKED = -1e30
_AFTER_SOFTMAX = ("dropout", "to", "_to_copy", "type_as", "contiguous", "clone", "float", "double")


_SCALE_OPS = ("mul", "truediv", "div", "imul", "itruediv")
# one-input elementwise maps of the scores (Gemma 2's logit soft-capping ``tanh(s / cap) * cap``): a map
# of each score on its own keeps heads apart and an exactly-zero q.k term exact, but NOT a per-row shift
_SCORE_MAPS = ("tanh", "sigmoid", "hardtanh", "clamp", "clip", "softsign", "erf", "neg")


def _key(node: fx.Node):
    return method(node.target) if node.op == "call_method" else node.target


def _is(node: Any, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and _key(node) in targets


def _shift_step(node: fx.Node, s: fx.Node, A) -> bool:
    """``node`` maps the scores ``s`` [.., H, T, S] so that a per-row shift of ``s`` stays a per-row
    shift, and keeps its shape. Tensor operands (a mask, a bias) must not depend on the head (size 1
    on axis -3): a per-head bias would need gathering to the kept heads, which is not done here."""
    name = op_name(node)
    others = [o for o in list(node.args) + list(node.kwargs.values()) if o is not s]
    if A.shape(node) is None or A.shape(node) != A.shape(s):
        return False
    for o in others:
        so = A.shape(o) if isinstance(o, fx.Node) else None
        if isinstance(o, fx.Node) and (so is None or (len(so) >= 3 and so[-3] != 1)):
            return False
    if name in _SCALE_OPS:  # by one number: the shift scales
        operands = list(node.args) + list(node.kwargs.values())
        return (len(operands) == 2 and operands[0] is s and operands[1] is not s
                and isinstance(operands[1], (int, float)) and not isinstance(operands[1], bool))
    if name in ("add", "sub", "iadd", "isub"):  # + a mask / bias that does not depend on s
        return s in node.args[:2] and not (name in ("sub", "isub") and node.args[1] is s)
    if name in ("masked_fill", "masked_fill_"):  # replaced entries get no shift: they must vanish
        value = node.kwargs.get("value", node.args[2] if len(node.args) > 2 else None)
        return node.args[0] is s and node.args[1] is not s and isinstance(value, float) and value <= _MASKED
    return False


def _keeps_values(node: fx.Node, A) -> bool:
    """Dropout (eval: minimize admits eval models only), casts, copies: elementwise, so each head's
    probabilities stay that head's (a cast rounds each entry on its own).
    A functional dropout that says it trains (``aten.dropout(p, 0.1, True)``, ``F.dropout``'s default) is random: not."""
    if node.op == "call_module":
        return isinstance(A.module(node), torch.nn.modules.dropout._DropoutNd)
    name = op_name(node)
    if name not in _AFTER_SOFTMAX:
        return False
    if name == "dropout":
        rate = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True))
        return training is False or (type(rate) in (int, float) and rate == 0)
    return True


def _value_readers(p: fx.Node) -> list[fx.Node]:
    """Readers of ``p`` apart from torch.export's metadata checks (dtype/device/layout: no values read)."""
    return [u for u in p.users if not (u.target is aten._assert_tensor_metadata.default
                                       and u.kwargs.get("size") is None and u.kwargs.get("stride") is None
                                       and len(u.args) == 1)]


def _softmax_dim(node: fx.Node) -> Any:
    return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)


def _score_map(node: fx.Node, s: fx.Node, A) -> bool:
    """``node`` maps each score on its own (``_SCORE_MAPS``, scalar extra arguments only), same shape."""
    extra = [o for o in list(node.args[1:]) + list(node.kwargs.values())]
    return (op_name(node) in _SCORE_MAPS and node.args[:1] == (s,) and A.shape(node) == A.shape(s)
            and not any(isinstance(o, fx.Node) for o in extra))


def _follow_scores(s: fx.Node, A) -> tuple[fx.Node, bool, bool] | None:
    """From ``q @ k^T`` through shift-preserving steps or per-score maps (each the only reader of the one
    before) to a softmax over the last axis, then (dropout aside) to ``p @ v``: returns (that matmul,
    masked, shifts: every step keeps a per-row shift a per-row shift)."""
    masked, shifts = False, True
    while True:
        if len(s.users) != 1:
            return None
        (u,) = s.users
        if _is(u, _SOFTMAX):
            d, shape = _softmax_dim(u), A.shape(u)
            if d is None or shape is None or int(d) not in (-1, len(shape) - 1):
                return None
            p = u
            break
        if _score_map(u, s, A):
            shifts = False
        elif not _shift_step(u, s, A):
            return None
        else:
            masked |= op_name(u) not in _SCALE_OPS
        s = u
    while len(_value_readers(p)) == 1 and _keeps_values(_value_readers(p)[0], A):
        p = _value_readers(p)[0]  # eval dropout, dtype casts: p's values unchanged (eval models only)
    # p must reach nothing but p @ v: any other reader would see the removed heads go
    if len(_value_readers(p)) != 1:
        return None
    (pv,) = _value_readers(p)
    return (pv, masked, shifts) if _is(pv, _MATMUL) and pv.args[0] is p and pv.args[1] is not p else None


@rule("matmul", *_MATMUL, names=("input", "other"), heads=True)
def matmul(node: fx.Node, A, a) -> ChanInfo | None:
    """``q @ k^T`` whose scores reach ``softmax(-1) @ v`` only through per-row shifts is attention:
    q/k/v are handled at ``p @ v`` exactly as for sdpa. Any other matmul of tracked tensors freezes."""
    x, y = node.args[0], node.args[1]
    sx, sy = A.shape(x), A.shape(y)
    if node in A.pending:  # p @ v of a recognised attention
        iq, ik, masked = A.pending.pop(node)
        iv = _as_heads(A.info(y), sy)
        if iv is not None and iv.heads == iq.heads and A.shape(node) is not None:
            return _attend(node, A, iq, ik, y, iv, masked)
        A.freeze(y, iq, ik)
        return None
    iq, ik = _as_heads(A.info(x), sx), _as_heads(A.info(y), sy, at=-2)
    if iq is not None and ik is not None and iq.heads == ik.heads and len(iq) == len(ik) \
            and sx[:-2] == sy[:-2] and A.shape(node) is not None:
        found = _follow_scores(node, A)
        if found is not None:
            if not found[2]:  # a per-score map (soft-capping) is no per-row shift: only a ZERO key dim adds
                ik = replace(ik, const=ik.zero, value=np.zeros(len(ik)))  # nothing to the scores
            A.pending[found[0]] = (iq, ik, found[1])
            return None
    A.freeze([x, y])
    return None


@rule("softmax", *_SOFTMAX, names=("input", "dim"))
def softmax(node: fx.Node, A, a) -> ChanInfo | None:
    """Softmax over another axis keeps channel j in place (its value depends on that axis' size:
    dynamic); over the channel axis it mixes channels: frozen."""
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    d = _softmax_dim(node)
    if src is None or s is None or d is None or (int(d) % len(s)) == src.dim:
        A.freeze(src)
        return None
    return ChanInfo.dynamic(src.dim, src.ids)
