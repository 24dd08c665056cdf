"""Graph interface and layout ops: where channels enter, leave, move and get re-indexed.

* graph inputs carry fresh ids (an input feature no layer reads is gathered away);
  graph outputs freeze what they return (outputs keep their shapes);
* ``cat`` on the channel axis concatenates index spaces; on another axis it couples;
* Swin's ``_patch_merging_pad`` repeats channel j 4 times with one id; zero padding keeps only zero constants;
* ``flatten``/``view``/``reshape`` that merge the channel axis with the dims after it
  repeat each channel id over its block of features (a conv channel -> H*W Linear columns);
* pooling and reductions over other axes keep channel j in place;
* slicing the channel axis selects ids (rewritten as an ``index_select`` on kept positions);
* reading a tensor's size along the channel axis freezes it (the number would change).
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..values import ChanInfo, shape_of
from .pointwise import _param_info
from .registry import method, op_name, rule

aten = torch.ops.aten


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


# ---- graph interface --------------------------------------------------------------------------
#: ``node.meta`` key on a graph input whose axis 1 the model accepts at another size (trace.py)
VARYING_AXIS1 = "sqr_fx.varying_axis1"


def _placeholder_rewrite(node, R, a):
    new = R.copy(node)
    R.raw_inputs[node] = new
    info = R.info(node)
    if info is None or R.keep(info).all():
        return new
    return R.index_select(new, info.dim, np.flatnonzero(R.keep(info)), f"{node.name}_kept")


def is_input_gather(x) -> bool:
    """A graph input read only through ``index_select`` on axis 1 (minimize's own input gather),
    apart from torch.export's guard, which checks the caller's input itself."""
    readers = [u for u in x.users if not _is_guard(u) and not _reads_other_size(u) and not _reads_metadata(u)] \
        if isinstance(x, fx.Node) else []
    return isinstance(x, fx.Node) and x.op == "placeholder" and len(readers) > 0 and all(
        u.target in (torch.index_select, aten.index_select.default) and u.args[0] is x and u.args[1] == 1
        for u in readers)


def _reads_other_size(node: fx.Node) -> bool:
    """``x.size(d)`` / ``aten.sym_size(x, d)`` for a literal d other than the channel axis 1."""
    is_size = node.target is aten.sym_size.int or (node.op == "call_method" and node.target == "size")
    s = shape_of(node.args[0]) if node.args else None
    return (is_size and s is not None and len(node.args) > 1 and type(node.args[1]) is int
            and _norm_dim(node.args[1], len(s)) != 1)


def _reads_metadata(node: fx.Node) -> bool:
    """``x.dim()``, ``x.ndim``, ``x.dtype`` ...: the same for the input and its gather."""
    return (node.op == "call_method" and node.target == "dim") or (
        node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA)


def _is_guard(node: fx.Node) -> bool:
    if node.op != "call_module" or _GuardsFn is None:
        return False
    owner = node.graph.owning_module
    return owner is not None and isinstance(owner.get_submodule(node.target), _GuardsFn)


@rule("placeholder", "placeholder", names=(), rewrite=_placeholder_rewrite)
def placeholder(node, A, a):
    """Graph inputs keep their shape; an input channel that nothing reads is gathered away."""
    if is_input_gather(node):
        return None  # its gather carries the channels (see index_select)
    s = A.shape(node)
    tm = node.meta.get("tensor_meta")
    if s is None or len(s) not in (2, 4, 5) or not tm.dtype.is_floating_point:
        return None
    if node.meta.get(VARYING_AXIS1):  # the model takes other sizes there: not channels ([B, H, W, C] input)
        return None
    info = ChanInfo.dynamic(1, A.fresh(s[1]))
    if not A.drop_inputs:
        A.freeze(info)
    return info


def _get_attr_rewrite(node, R, a):
    info = R.info(node)
    if info is None or R.keep(info).all():
        return R.alias(node)
    t = R.tensor(node).index_select(info.dim, torch.as_tensor(np.flatnonzero(R.keep(info)), dtype=torch.long))
    return R.attr(node.target, t)


@rule("get_attr", "get_attr", names=(), rewrite=_get_attr_rewrite)
def get_attr(node, A, a):
    """Parameters get channel ids from the op that reads them (see ``binary``)."""
    return None


@rule("output", "output", names=())
def output(node, A, a):
    """Graph outputs keep their shapes: everything returned is frozen."""
    A.freeze(list(node.args))
    return None


# ---- concatenation ----------------------------------------------------------------------------
def _cat_heads(infos: list[ChanInfo], d: int, A) -> ChanInfo | None:
    """Head-split parts laid out alike: cat on the per-head axis concatenates each head's dims (partial
    rotary's ``cat((rotated, passed), -1)``); on another axis channel (h, j) of every part is one."""
    first = infos[0]
    if not all(i.split and (i.head, i.dim, i.heads) == (first.head, first.dim, first.heads) for i in infos):
        return None
    if d == first.dim:
        def cat(attr):
            return np.concatenate([i.per_head(getattr(i, attr)) for i in infos], axis=1).reshape(-1)

        return replace(first, ids=cat("ids"), const=cat("const"), value=cat("value"))
    if d == first.head or any(len(i) != len(first) for i in infos):
        return None
    const = np.logical_and.reduce([i.const for i in infos])
    for i in infos[1:]:
        A.union(first.ids, i.ids)
        const &= i.value == first.value
    return replace(first, const=const, value=np.where(const, first.value, 0.0))


@rule("cat", torch.cat, torch.concat, aten.cat.default, names=("tensors", "dim"), heads=True)
def cat(node, A, a):
    """cat on the channel axis: ids concatenate; on another axis: channel j of every part is one.
    Head-split parts: ``_cat_heads``."""
    if isinstance(a["tensors"], fx.Node):  # a tuple made elsewhere (split(...)[::-1]): not followed
        A.freeze(a["tensors"])
        return None
    parts = list(a["tensors"])
    infos, shapes = [A.info(p) for p in parts], [A.shape(p) for p in parts]
    out_shape = A.shape(node)
    if out_shape is None or any(i is None for i in infos) or any(s is None for s in shapes):
        A.freeze(parts)
        return None
    d = _norm_dim(int(a.get("dim", 0)), len(out_shape))
    if any(i.split for i in infos):
        out = _cat_heads(infos, d, A) if all(len(s) == len(out_shape) for s in shapes) else None
        if out is None:
            A.freeze(parts)
        return out
    if all(i.dim == d for i in infos):
        return ChanInfo.concat(infos, d)
    if all(i.dim == infos[0].dim for i in infos):
        first = infos[0]
        const = np.logical_and.reduce([i.const for i in infos])
        for i in infos[1:]:
            A.union(first.ids, i.ids)
            const &= i.value == first.value  # a constant only if every part holds the same one
        return ChanInfo(first.dim, first.ids, const, np.where(const, first.value, 0.0))
    A.freeze(parts)
    return None


try:
    from torchvision.models.swin_transformer import _patch_merging_pad as _tv_pmp
except ImportError:  # pragma: no cover - torchvision is optional
    _tv_pmp = None


@rule("patch_merging_pad", _tv_pmp, names=("x",))
def patch_merging_pad(node, A, a):
    """Swin's ``_patch_merging_pad``: zero-pad H, W (axes -3, -2) to even sizes, then cat the four 2x2
    sub-grids on the last (channel) axis: channel j appears 4 times, with one id (one tensor, one fate).
    A padded position holds 0, not the constant: only zero constants stay constant. Copied as is (the
    function reads its widths from the tensor)."""
    x = a["x"]
    src, s, out_s = A.info(x), A.shape(x), A.shape(node)
    if src is None or s is None or out_s is None or len(s) < 3 or src.dim != len(s) - 1 \
            or out_s[-1] != 4 * len(src):
        A.freeze(src)
        return None
    zero = src.zero  # odd H or W at some input size: padding can happen
    return ChanInfo.concat([ChanInfo(src.dim, src.ids, zero, np.zeros(len(src)))] * 4, src.dim)


# ---- flatten / view / reshape -----------------------------------------------------------------
def _reshape_map(in_shape, out_shape, info: ChanInfo):
    """(out_dim, inner) when the reshape keeps channel blocks intact, else None.

    With P = prod(in[:c]): the channel axis maps to out dim k when prod(out[:k]) == P and
    out[k] == C * prod(in[c+1:c+1+m]) for some m: each channel becomes a contiguous block of
    ``inner`` positions (any such k is exact: the P leading elements and the block layout are
    the same). Any other reshape mixes channels across dims and is not followed.
    """
    c, C = info.dim, in_shape[info.dim]
    P = math.prod(in_shape[:c])
    acc = 1
    for k, size in enumerate(out_shape):
        if acc == P:
            inner = 1
            for m in range(c + 1, len(in_shape) + 1):
                if size == C * inner:
                    return k, inner
                if m < len(in_shape):
                    inner *= in_shape[m]
            # no block here; with size-1 dims (batch 1) a later k may still have prod(out[:k]) == P
        acc *= size
        if acc > P:
            return None
    return None


def _split_map(in_shape, out_shape, info: ChanInfo):
    """Out axis k when the reshape splits the channel axis into (out[k], out[k+1]) = (heads, D)."""
    c, C = info.dim, in_shape[info.dim]
    P, rest = math.prod(in_shape[:c]), math.prod(in_shape[c + 1:])
    for k in range(len(out_shape) - 1):
        if math.prod(out_shape[:k]) == P and out_shape[k] * out_shape[k + 1] == C \
                and math.prod(out_shape[k + 2:]) == rest:
            return k
    return None


def _split3_map(in_shape, out_shape, info: ChanInfo):
    """Out axis k when the reshape splits the channel axis into (out[k], out[k+1], out[k+2]) = (G, H, D):
    a fused projection's (3, heads, head_dim) (timm's ``qkv.reshape(B, N, 3, H, D)``)."""
    c, C = info.dim, in_shape[info.dim]
    P, rest = math.prod(in_shape[:c]), math.prod(in_shape[c + 1:])
    for k in range(len(out_shape) - 2):
        if math.prod(out_shape[:k]) == P and out_shape[k] * out_shape[k + 1] * out_shape[k + 2] == C \
                and math.prod(out_shape[k + 3:]) == rest:
            return k
    return None


def _grouped(src: ChanInfo, k: int, out_shape, A) -> ChanInfo:
    """The info of a three-factor split at out axis k: groups (axis k) x heads (k + 1) x dims (k + 2).
    Group g's head h and group g''s head h go together (``align_heads``): every group keeps the same
    heads, so the kept positions stay a (G, H', D') grid and the reshape's literal sizes can say so."""
    G, H = out_shape[k], out_shape[k + 1]
    out = replace(src, dim=k + 2, head=k + 1, heads=G * H, group=k, groups=G)
    A.align_heads(*[out.group_part(g) for g in range(G)])
    return out


def widths(keep: np.ndarray, info: ChanInfo) -> dict[int, int]:
    """Kept size of each channel-carrying axis of ``info`` (a grouped info keeps its G groups)."""
    if not info.split:
        return {info.dim: int(keep.sum())}
    h, d = head_widths(keep, info)
    if info.group is not None:
        assert h % info.groups == 0, "groups left with different heads"
        h //= info.groups
    return {info.head: h, info.dim: d}


def _merged(src: ChanInfo, in_shape, out_shape):
    """A head-split info whose two axes are adjacent, merged back into one axis (None: not that)."""
    lo = min(src.head, src.dim)
    if abs(src.head - src.dim) != 1:
        return None
    for k in range(len(out_shape)):
        if math.prod(out_shape[:k]) == math.prod(in_shape[:lo]) and out_shape[k] == len(src) \
                and math.prod(out_shape[k + 1:]) == math.prod(in_shape[lo + 2:]):
            order = np.arange(len(src))
            if src.head > src.dim:  # memory order is (d, h): channel shuffle's transposed merge
                order = src.per_head(order).T.reshape(-1)
            return ChanInfo(k, src.ids[order], src.const[order], src.value[order])
    return None


def _heads_repeated(src: ChanInfo, in_shape, out_shape):
    """``[.., H, r, .., D] -> [.., H * r, .., D]`` (the head axis merged with the axis after it, Hugging
    Face's ``repeat_kv``): head ``h * r + j`` of the output holds channel (h, d) of the input at index j of
    the merged axis, so it carries (h, d)'s id and value (one tensor, one fate; a constant stays the
    constant at every index). None when the reshape is not that."""
    a, r = src.head, in_shape[src.head + 1] if src.head + 1 < len(in_shape) else 0
    if src.dim <= a + 1 or r < 1 or tuple(out_shape) != tuple(in_shape[:a]) + (src.heads * r,) + tuple(in_shape[a + 2:]):
        return None

    def rep(arr):
        return np.repeat(src.per_head(arr), r, axis=0).reshape(-1)

    return ChanInfo(src.dim - 1, rep(src.ids), rep(src.const), rep(src.value), head=a, heads=src.heads * r)


def _axes_moved(src: ChanInfo, old_to_new: dict[int, int]) -> ChanInfo | None:
    """A head-split info on the same positions with its two axes renumbered (None: an axis is dropped)."""
    if src.head not in old_to_new or src.dim not in old_to_new:
        return None
    return replace(src, head=old_to_new[src.head], dim=old_to_new[src.dim])


def _squeezed_heads(node, A, x, src: ChanInfo):
    """unsqueeze / squeeze(dims) of a head-split tensor: size-1 axes come or go around the head axes."""
    s_in, s_out = A.shape(x), A.shape(node)
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if s_in is None or s_out is None or d is None:
        return None
    nd = len(s_in)
    if "unsqueeze" in op_name(node):
        if type(d) is not int:
            return None
        d = _norm_dim(d, nd + 1)
        return _axes_moved(src, {a: a + (a >= d) for a in range(nd)})
    dims = [d] if type(d) is int else list(d)
    if not all(type(v) is int for v in dims):
        return None
    gone = {_norm_dim(v, nd) for v in dims if s_in[_norm_dim(v, nd)] == 1}  # squeezing a size > 1 is a no-op
    if len(s_out) != nd - len(gone):
        return None
    return _axes_moved(src, {a: a - sum(g < a for g in gone) for a in range(nd) if a not in gone})


def _layout(src: ChanInfo, s_in, s_out):
    """Where the reshape puts ``src``'s channels, read off one pair of sizes: ("merged", out axis) for
    head axes merged back, ("repeated", ...) for heads repeated (``repeat_kv``), ("split", out axis, heads), ("block", out axis, inner > 1), or None."""
    if src.split:
        if s_in == s_out:
            return ("same",)
        if src.group is not None:
            return None
        m = _merged(src, s_in, s_out)
        if m is not None:
            return ("merged", m.dim)
        r = _heads_repeated(src, s_in, s_out)
        return None if r is None else ("repeated", r.head, r.dim, r.heads)
    m = _reshape_map(s_in, s_out, src)
    if m is not None:
        return ("block", m[0], m[1] > 1)
    k = _split_map(s_in, s_out, src)
    if k is not None:
        return ("split", k, s_out[k])
    k = _split3_map(s_in, s_out, src)
    return None if k is None else ("split3", k, s_out[k], s_out[k + 1])


def _reshaped(node, A, x, copies: bool = False):
    """The info of a reshape-like view of ``x`` (see the callers). ``copies``: the caller's rewrite picks
    the kept copies of a repeat of kv heads (view/reshape); for the others a repeat's copies share their
    kv head's ids (one fate, the repeat stays uniform)."""
    node.meta.pop(_REPEAT, None)
    src, s_in, s_out = A.info(x), A.shape(x), A.shape(node)
    if src is None or s_in is None or s_out is None:
        A.freeze(src)
        return None
    if s_in != s_out:
        # Precondition: the channels land in the same place at every input size the graph accepts.
        # The sizes of a reshape are read at the traced size: ``reshape(-1, 6)`` of [B, 6, 1, 1] keeps
        # channels on axis 1 there, and cuts each channel's spatial positions into rows elsewhere.
        here = _layout(src, s_in, s_out)
        others = A.other_shapes(x), A.other_shapes(node)
        pairs = list(zip(*others)) if None not in others else None
        if pairs is None or any(o_in is None or o_out is None or (o_in, o_out) != (s_in, s_out) and
                                _layout(src, o_in, o_out) != here for o_in, o_out in pairs):
            A.decline(node, "where the channels land depends on the input size (a reshape read at the traced "
                            "size)" if pairs is not None else "no other input size known to check the reshape at",
                      src)
            return None
    if src.split:  # the same shape, the two head axes merged back into one, or heads repeated
        out = src if s_in == s_out else None if src.group is not None else (
            _merged(src, s_in, s_out) or _heads_repeated(src, s_in, s_out))
        if out is None:
            A.freeze(src)
        elif out.heads > src.heads and copies:  # repeat_kv: each q head's copy of its kv head has its own fate
            r = out.heads // src.heads
            node.meta[_REPEAT] = (src, r)
            gather = _gathered_after(node)
            if gather is not None:  # the gather of heads after it makes the copies it keeps (``index_select``)
                A.owed[gather] = src
                return None
            out = A.copy_heads(src, np.arange(out.heads) // r, out.head, out.dim)
        return out
    m = _reshape_map(s_in, s_out, src)
    if m is None:
        k = _split_map(s_in, s_out, src)
        if k is None:
            k = _split3_map(s_in, s_out, src) if not src.blocks else None
            if k is None:
                A.freeze(src)
                return None
            return _grouped(src, k, s_out, A)
        return replace(src, dim=k + 1, head=k, heads=s_out[k])
    k, inner = m
    out = replace(src.repeat(inner), blocks=True) if inner > 1 else src
    return out.with_dim(k)


def head_widths(keep: np.ndarray, info: ChanInfo) -> tuple[int, int]:
    """(kept heads, kept positions per kept head) of a head-split info; the plan keeps it rectangular."""
    per = info.per_head(keep).sum(1)
    alive = per > 0
    assert (per[alive] == per[alive].max()).all(), "head-split tensor left ragged"
    return int(alive.sum()), int(per.max())


@rule("flatten", torch.flatten, method("flatten"), aten.flatten.using_ints, nn.Flatten,
      method("squeeze"), method("unsqueeze"), torch.squeeze, torch.unsqueeze,
      *[getattr(aten.squeeze, o) for o in aten.squeeze.overloads()],
      *[getattr(aten.unsqueeze, o) for o in aten.unsqueeze.overloads()], heads=True)
def flatten(node, A, a):
    """Shape-only re-indexing with no channel sizes in its arguments: copied as is.
    Precondition: ``squeeze`` names its axes. ``x.squeeze()`` drops whichever axes have size 1 at run
    time (the batch axis at batch 1), so the channel axis' position is not a property of the graph."""
    x = a["input"]
    if "squeeze" in op_name(node) and "unsqueeze" not in op_name(node) and len(node.args) < 2 \
            and "dim" not in node.kwargs:
        if A.info(x) is not None:
            A.decline(node, "squeeze() without axes: which axes go depends on the run-time shape", A.info(x))
        return None
    src = A.info(x)
    if src is not None and src.split and "squeeze" in op_name(node):
        out = _squeezed_heads(node, A, x, src)
        if out is None:
            A.freeze(src)
        return out
    return _reshaped(node, A, x)


_REPEAT = "sqr_fx.repeat_heads"


def kept_copies(R, out: ChanInfo, src: ChanInfo, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(kept heads t of the copies ``out`` of ``src``'s heads ``sources`` (:meth:`Analysis.copy_heads`),
    the rank of each one's source among ``src``'s kept heads, how many heads ``src`` keeps)."""
    src_alive = src.per_head(R.keep(src)).any(1)
    t = np.flatnonzero(out.per_head(R.keep(out)).any(1))
    sources = np.asarray(sources)
    assert src_alive[sources[t]].all() and (out.per_head(R.keep(out))[t] == src.per_head(R.keep(src))[sources[t]]).all(), \
        "a kept copy keeps other dims than its source"  # (Plan._keep_copies_even)
    return t, (np.cumsum(src_alive) - 1)[sources[t]], int(src_alive.sum())


def _select(R, x, axis: int, idx: np.ndarray, n: int, hint: str):
    """``x`` (of ``n`` positions along ``axis`` in the new graph) at positions ``idx``: x itself when that is
    all of them in order, else one ``index_select``."""
    if len(idx) == n and (idx == np.arange(n)).all():
        return x
    return R.index_select(x, axis, idx, hint)


def _repeated(node) -> tuple[ChanInfo, int] | None:
    """(source info, r) when ``node`` is a repeat of kv heads (the merge ``[.., KV, r, .., D] -> [.., KV * r,
    .., D]``) that the analysis followed."""
    return node.meta.get(_REPEAT) if isinstance(node, fx.Node) else None


def _gathered_after(node) -> Optional[fx.Node]:
    """The one reader of ``node`` when it is a gather of whole heads by a constant index (``index_select`` on
    the head axis: the kept copies a GQA rewrite picks), else None."""
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    return u if u.target in _INDEX_SELECT and u.args and u.args[0] is node and len(u.args) == 3 and not u.kwargs \
        and isinstance(u.args[2], fx.Node) and u.args[2].op == "get_attr" else None


def _view_rewrite(node, R, a):
    """view/reshape hold literal sizes: the channel axis' entry becomes the kept width. A repeat of kv
    heads (``repeat_kv``) repeats the kept kv heads, then gathers the copies whose q heads are kept
    (unless a gather of heads follows it already: that one is rewritten to pick them)."""
    out_info, repeat = R.info(node), _repeated(node)
    if repeat is not None:
        src, r = repeat
        if R.keep(src).all() and (out_info is None or R.keep(out_info).all()):
            return R.copy(node)
        h, d = head_widths(R.keep(src), src)
        new = {src.head: h * r, src.dim - 1: d}
    elif out_info is None or R.keep(out_info).all():
        return R.copy(node)
    else:
        new = widths(R.keep(out_info), out_info)
    sizes = list(node.args[1:]) if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else list(node.args[1])
    for axis, n in new.items():
        if sizes[axis] != -1:
            sizes[axis] = n
    y = R.graph.call_function(torch.reshape, (R.arg(node.args[0]), tuple(R.arg(s) for s in sizes)))
    if repeat is None or out_info is None:  # (no info: the gather after it picks the copies)
        return y
    t, g, n = kept_copies(R, out_info, src, np.arange(out_info.heads) // r)
    return _select(R, y, out_info.head, g * r + t % r, n * r, f"{node.name}_copies")


@rule("view", method("view"), method("reshape"), torch.reshape, aten.view.default, aten.reshape.default,
      aten._unsafe_view.default, rewrite=_view_rewrite, heads=True)
def view(node, A, a):
    """Followed when it keeps channel blocks intact or splits/merges attention heads; sizes given
    by nodes on the channel axes freeze."""
    out = _reshaped(node, A, node.args[0], copies=True)
    if out is not None:
        sizes = list(node.args[1:]) if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else list(node.args[1])
        axes = (out.dim, out.head) + ((out.group,) if out.group is not None else ()) if out.split else (out.dim,)
        if len(sizes) != len(A.shape(node)) or any(isinstance(sizes[d], fx.Node) and not (
                d == out.dim and not out.split and A.info(node.args[0]).split
                and _width_read(sizes[d], len(out))) for d in axes):
            A.freeze(out)
            return None
    return out


def _width_read(v: fx.Node, n: int) -> bool:
    """``v`` reads a tensor's size along an axis of traced size ``n`` (timm's ``B, N, C = x.shape`` then
    ``.reshape(B, N, C)`` merging heads back): the merged axis holds the heads' ``n`` positions, so at
    every input where this reshape merges them (the precondition of ``_reshaped``) the value is ``n``,
    and the rewrite writes the kept width in its place, as for a literal ``n``."""
    if v.target is aten.sym_size.int or (v.op == "call_method" and v.target == "size" and len(v.args) == 2):
        t, d = v.args[0], v.args[1]
    elif v.target is operator.getitem and isinstance(v.args[0], fx.Node) and type(v.args[1]) is int and (
            (v.args[0].target is getattr and v.args[0].args[1] == "shape")
            or (v.args[0].op == "call_method" and v.args[0].target == "size" and len(v.args[0].args) == 1)):
        t, d = v.args[0].args[0], v.args[1]
    else:
        return False
    s = shape_of(t)
    return type(d) is int and s is not None and -len(s) <= d < len(s) and s[d] == n


def _unflatten_rewrite(node, R, a):
    """The literal sizes of the unflattened axes that carry channels become the kept widths."""
    out_info = R.info(node)
    if out_info is None or R.keep(out_info).all():
        return R.copy(node)
    x, sizes = node.args[0], list(a["sizes"])
    d = _norm_dim(int(a["dim"]), len(shape_of(x)))
    for axis, n in widths(R.keep(out_info), out_info).items():
        if d <= axis < d + len(sizes) and sizes[axis - d] != -1:
            sizes[axis - d] = n
    return R.graph.call_function(torch.unflatten, (R.arg(x), d, tuple(sizes)))


@rule("unflatten", torch.unflatten, method("unflatten"), aten.unflatten.int, names=("input", "dim", "sizes"),
      rewrite=_unflatten_rewrite, heads=True)
def unflatten(node, A, a):
    """``x.unflatten(d, sizes)`` is a view: followed like ``view`` (channel blocks, head splits)."""
    out = _reshaped(node, A, a["input"])
    sizes = a.get("sizes")
    if out is not None and (isinstance(a.get("dim"), fx.Node) or not isinstance(sizes, (list, tuple))
                            or any(isinstance(v, fx.Node) for v in sizes)):
        A.freeze(out)
        return None
    return out


# ---- permutations and broadcasting views -------------------------------------------------------
try:
    from torchvision.ops.misc import Permute as _Permute
except ImportError:  # pragma: no cover
    _Permute = None


@rule("permute", torch.permute, method("permute"), aten.permute.default, _Permute, torch.transpose,
      method("transpose"), aten.transpose.int, method("t"), torch.t, aten.t.default, torch.movedim,
      method("movedim"), heads=True)
def permute(node, A, a):
    """A permutation of axes moves the channel axis; positions along it are untouched."""
    x = node.args[0]
    src, s_in = A.info(x), A.shape(x)
    if src is None or s_in is None or A.shape(node) is None:
        A.freeze(src)
        return None
    nd = len(s_in)
    if node.op == "call_module":
        perm = list(A.module(node).dims)
    elif node.target in (torch.transpose, aten.transpose.int, torch.movedim) or node.target in ("transpose", "movedim"):
        d0, d1 = (_norm_dim(int(v), nd) for v in node.args[1:3])
        if node.target in (torch.movedim, "movedim"):
            order = [d for d in range(nd) if d != d0]
            order.insert(d1, d0)
            perm = order
        else:
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
    elif node.target in ("t", torch.t, aten.t.default):
        perm = list(range(nd))[::-1]
    else:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        perm = [_norm_dim(int(d), nd) for d in dims]
    if src.split:
        group = None if src.group is None else perm.index(src.group)
        return replace(src, dim=perm.index(src.dim), head=perm.index(src.head), group=group)
    return src.with_dim(perm.index(src.dim))


@rule("roll", torch.roll, method("roll"), aten.roll.default, names=("input", "shifts", "dims"))
def roll(node, A, a):
    """A cyclic shift along other axes keeps channel j in place (constants stay constant); rolling
    the channel axis, or the flattened tensor (no ``dims``), moves values across channels: frozen."""
    x, dims = a["input"], a.get("dims")
    src, s = A.info(x), A.shape(x)
    dims = [dims] if isinstance(dims, int) else list(dims or ())
    if src is None or s is None or not dims or not all(isinstance(d, int) for d in dims) or src.dim in {
            _norm_dim(d, len(s)) for d in dims}:
        A.freeze(src)
        return None
    return src.with_dim(src.dim)


def _expand_sizes(node) -> list:
    return list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])


def _expand_rewrite(node, R, a):
    """Literal sizes on the channel axes become the kept widths."""
    out = R.info(node)
    if out is None or R.keep(out).all() or node.target == "expand_as":
        return R.copy(node)  # (expand_as takes its sizes from the other tensor, whose channels are coupled)
    sizes = _expand_sizes(node)
    widths = zip((out.head, out.dim), head_widths(R.keep(out), out)) if out.split else [(out.dim, int(R.keep(out).sum()))]
    for axis, n in widths:
        if sizes[axis] != -1:
            sizes[axis] = n
    return R.graph.call_method("expand", (R.arg(node.args[0]), tuple(R.arg(v) for v in sizes)))


@rule("expand", method("expand"), aten.expand.default, method("expand_as"), rewrite=_expand_rewrite, heads=True)
def expand(node, A, a):
    """Broadcast along other axes keeps channel j; a literal size on the channel axis would freeze.
    A head-split tensor broadcast along other axes (``repeat_kv``'s ``[B, KV, 1, T, D] -> [B, KV, r, T, D]``)
    keeps its heads; literal sizes on its head axes are rewritten to the kept widths."""
    x = node.args[0]
    src, s_in, s_out = A.info(x), A.shape(x), A.shape(node)
    if src is not None and src.split:
        off = len(s_out) - len(s_in) if s_in is not None and s_out is not None else -1
        axes = (src.head, src.dim)
        ok = off >= 0 and node.target != "expand_as" and all(s_out[v + off] == s_in[v] for v in axes)
        if ok:
            sizes = _expand_sizes(node)
            ok = len(sizes) == len(s_out) and all(type(sizes[v + off]) is int for v in axes)
        if not ok:
            A.freeze(src)
            return None
        return replace(src, head=src.head + off, dim=src.dim + off)
    if src is None and s_in:  # a learned token (ViT's class token) joins the channels of its last axis
        src = _param_info(x, A, len(s_in) - 1)
    if src is None or s_in is None or s_out is None:
        A.freeze(src)
        return None
    dim = src.dim + len(s_out) - len(s_in)
    if node.target == "expand_as":  # the other tensor's width sets this one's: one group, or both kept
        other = A.info(node.args[1])
        if other is not None and not other.split and other.dim == dim and len(other) == len(src) == s_out[dim]:
            A.union(src.ids, other.ids)
            return src.with_dim(dim)
        A.freeze(src, node.args[1])
        return None
    sizes = _expand_sizes(node)
    if s_out[dim] != len(src) or (sizes[dim] != -1 and (type(sizes[dim]) is not int or src.blocks)):
        A.freeze(src)  # (a literal width is rewritten to the kept one)
        return None
    return src.with_dim(dim)


# ---- slicing ----------------------------------------------------------------------------------
def _slice_rewrite(node, R, a):
    if _PIECES in getattr(node.args[0], "meta", {}):
        return R.copy(node)  # one output of a split: the split itself was rewritten
    if node.meta.get(_HEAD_POS) is not None:
        out, src = R.info(node), R.info(node.args[0])
        return R.copy(node) if R.keep(src).all() and R.keep(out).all() else _head_slice_rewrite(
            node, R, node.meta[_HEAD_POS])
    out_info, src = R.info(node), R.info(node.args[0])
    pos = node.meta.get("sqr_fx.slice_pos")
    if out_info is None or pos is None or (R.keep(src, 0).all() and R.keep(out_info).all()):
        return R.copy(node)  # (no positions: the op indexes another axis and is copied as is)
    if src is None:  # the input gather of a graph input, which keeps its shape: select from it directly
        return R.index_select(R.arg(node.args[0]), out_info.dim, pos[R.keep(out_info)], f"{node.name}_idx")
    if len(pos) == len(src) and (pos == np.arange(len(src))).all() and node.target not in _INDEX_SELECT:
        return R.copy(node)  # x[:, :] does not slice the channel axis: removed channels leave by themselves
        # (an identity index_select holds an index tensor of the old width: it is re-emitted below)
    rank = np.cumsum(R.keep(src)) - 1
    idx = rank[pos[R.keep(out_info)]]
    x = R.arg(node.args[0])
    if node.target in _INDEX_SELECT:
        return R.index_select(x, out_info.dim, idx, f"{node.name}_idx")
    if node.target is operator.getitem:
        index = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
        index[src.dim] = slice(None)  # (bounds computed on other axes: their new nodes)
        x = R.graph.call_function(operator.getitem, (x, R.arg(tuple(index))))
    return R.index_select(x, out_info.dim, idx, f"{node.name}_idx")


def _index_heads(node, src: ChanInfo, s_in) -> ChanInfo | None:
    """Indexing a head-split tensor along other axes only (``x[:, :, None]``, ``x[..., 1:]`` on the
    sequence axis, a full slice of a head axis): the same positions, axes renumbered. None otherwise.
    A one-axis info goes through here for indices holding ``None`` (its channel axis sliced whole)."""
    nd = len(s_in)
    if not src.split:
        out = _index_heads(node, replace(src, head=src.dim, heads=1), s_in)
        return None if out is None else replace(out, head=None, heads=1)
    if node.target is aten.slice.Tensor:
        d = _norm_dim(int(node.args[1]) if len(node.args) > 1 else 0, nd)
        bounds = list(node.args[2:5]) + [None] * (3 - len(node.args[2:5]))
        if d not in (src.head, src.dim):
            return src  # another axis, by any bounds (also computed at run time): every position stays
        if any(v is not None and type(v) is not int for v in bounds):
            return None
        full = len(range(s_in[d])[slice(*bounds)]) == s_in[d]
        return src if full or d not in (src.head, src.dim) else None
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if sum(i is Ellipsis for i in idx) > 1:
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        real = sum(i is not None for i in idx) - 1
        idx = idx[:k] + (slice(None),) * (nd - real) + idx[k + 1:]
    moved, old, new = {}, 0, 0
    for i in idx:
        if i is None:
            new += 1
            continue
        if old >= nd:
            return None
        if type(i) is int and old not in (src.head, src.dim):
            old += 1
            continue
        if not isinstance(i, slice) or any(v is not None and type(v) is not int for v in (i.start, i.stop, i.step)):
            return None
        if old in (src.head, src.dim) and len(range(s_in[old])[i]) != s_in[old]:
            return None
        moved[old] = new
        old, new = old + 1, new + 1
    moved.update({a: new + a - old for a in range(old, nd)})
    return _axes_moved(src, moved)


_HEAD_POS = "sqr_fx.head_slice_pos"


def _group_index(node, src: ChanInfo, s_in) -> ChanInfo | None:
    """``x[g]`` / ``x[:, g]`` ... of a grouped info: an int on the group axis and full slices before it
    (nothing after) take group ``g``; None for any other index."""
    if node.target is not operator.getitem or len(node.args) < 2:  # aten.slice of a grouped tensor: not followed
        return None
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if s_in is None or len(idx) != src.group + 1 or type(idx[-1]) is not int \
            or any(i != slice(None) for i in idx[:-1]):
        return None
    g = idx[-1]
    return src.group_part(g % src.groups) if -src.groups <= g < src.groups else None


def _per_head_slice(node, src: ChanInfo, s_in) -> np.ndarray | None:
    """Positions along the per-head axis when ``node`` slices only that axis with literal bounds."""
    nd = len(s_in)
    if node.target is aten.slice.Tensor:
        bounds = list(node.args[2:5]) + [None] * (3 - len(node.args[2:5]))
        d = _norm_dim(int(node.args[1]) if len(node.args) > 1 else 0, nd)
        if d != src.dim or any(v is not None and type(v) is not int for v in bounds):
            return None
        return np.arange(s_in[d])[slice(*bounds)]
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if idx.count(Ellipsis) == 1 and idx.index(Ellipsis) == 0 and len(idx) == 2:
        idx = (slice(None),) * (nd - 1) + idx[1:]
    if len(idx) != nd or not all(isinstance(i, slice) for i in idx) or any(
            i != slice(None) for k, i in enumerate(idx) if k != src.dim):
        return None
    sl = idx[src.dim]
    if any(v is not None and type(v) is not int for v in (sl.start, sl.stop, sl.step)):
        return None
    return np.arange(s_in[src.dim])[sl]


def _take_dims(src: ChanInfo, pos: np.ndarray) -> ChanInfo:
    """Positions ``pos`` of every head of a head-split info."""
    def take(arr):
        return src.per_head(arr)[:, pos].reshape(-1)

    return replace(src, ids=take(src.ids), const=take(src.const), value=take(src.value))


def _head_slice_rewrite(node, R, pos: np.ndarray):
    """The kept heads keep the same dims (``uniform_heads``): one index_select of the new positions."""
    src, out = R.info(node.args[0]), R.info(node)
    keep_in, keep_out = src.per_head(R.keep(src)), out.per_head(R.keep(out))
    rows_in, rows_out = keep_in[keep_in.any(1)], keep_out[keep_in.any(1)]
    assert (rows_in == rows_in[0]).all() and (rows_out == rows_out[0]).all(), "head slice left uneven"
    rank = np.cumsum(rows_in[0]) - 1
    return _select(R, R.arg(node.args[0]), out.dim, rank[pos[rows_out[0]]], int(rows_in[0].sum()), f"{node.name}_idx")


@rule("slice", operator.getitem, aten.slice.Tensor, names=("input", "index"), rewrite=_slice_rewrite,
      per_target={aten.slice.Tensor: ("input", "dim", "start", "end", "step")}, heads=True)
def getitem(node, A, a):
    """x[..., a:b:s, ...] on the channel axis keeps the selected ids (other axes: unchanged).
    Precondition: the axis is not a flatten of channels with spatial axes (its positions move with
    the input's size, so literal positions would select other features at another size).
    A head-split tensor is followed only where its head axes keep every position (``_index_heads``)."""
    x = node.args[0]
    if _PIECES in getattr(x, "meta", {}):  # split(...)[i]
        return x.meta[_PIECES][node.args[1]] if type(node.args[1]) is int else None
    src, s_in, s_out = A.info(x), A.shape(x), A.shape(node)
    if src is not None and src.group is not None:  # qkv[0] of a fused qkv: one group, an ordinary head split
        out = _group_index(node, src, s_in)
        if out is None:
            A.freeze(src)
        return out
    with_none = node.target is operator.getitem and isinstance(node.args[1], tuple) and None in node.args[1]
    if src is not None and (src.split or with_none):
        out = _index_heads(node, src, s_in) if s_in is not None and s_out is not None else None
        if out is None and src.split and s_in is not None and s_out is not None:
            pos = _per_head_slice(node, src, s_in)
            if pos is not None:  # x[..., :r] of a head-split x (partial rotary): the same dims of every head
                out = _take_dims(src, pos)
                node.meta[_HEAD_POS] = pos
                A.uniform_heads(src)
                A.align_heads(src, out)
        if out is None:
            A.freeze(src)
        return out
    if src is not None and not src.split and node.target is operator.getitem and s_in is not None \
            and s_out is not None:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(i, fx.Node) and A.shape(i) is not None for i in idx):  # x[:, ids]: advanced indexing
            return _gathered(node, A, src, s_in, s_out, idx)
    if src is not None and src.blocks:
        A.decline(node, "slices an axis that flattens channels with spatial axes", src)
        return None
    if src is None or s_in is None or s_out is None:
        A.freeze(src)
        return None
    if node.target is operator.getitem:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        # bounds computed at run time (timm's crop ``x[:, :H, :W, :]`` after window padding) only off the channel axis
        plain = all((isinstance(i, slice) and (k != src.dim or all(not isinstance(v, fx.Node)
                                                                  for v in (i.start, i.stop, i.step))))
                    or (type(i) is int and k != src.dim) for k, i in enumerate(idx))
        if not plain or len(idx) > len(s_in):
            A.freeze(src)
            return None
        sl = idx[src.dim] if src.dim < len(idx) else slice(None)
        ints_before = sum(type(i) is int for i in idx[:src.dim])  # x[:, 0] drops an axis before channels
        pos = np.arange(s_in[src.dim])[sl]
        node.meta["sqr_fx.slice_pos"] = pos
        return src.take(pos).with_dim(src.dim - ints_before)
    else:
        d = _norm_dim(int(node.args[1]) if len(node.args) > 1 else 0, len(s_in))
        args = list(node.args[2:5]) + [None] * (3 - len(node.args[2:5]))
        if d == src.dim and any(isinstance(v, fx.Node) for v in args):
            A.freeze(src)
            return None
        sl = slice(*args) if d == src.dim else slice(None)
    pos = np.arange(s_in[src.dim])[sl]
    node.meta["sqr_fx.slice_pos"] = pos
    return src.take(pos)


def _gathered(node, A, src: ChanInfo, s_in, s_out, idx) -> Optional[ChanInfo]:
    """Advanced indexing with index TENSORS on axes other than the channel axis (``x[:, ids]``, CLIP's
    ``x[arange(B), eos]``, ``aten.index``): every output position is a whole channel vector of ``x`` at
    some position, so each channel keeps its id and value. Precondition: the indexed axes are
    contiguous and every other entry is a full slice (``None`` in ``aten.index``); the indexed block
    becomes the index's broadcast shape in place (torch's rule for adjacent advanced indices), so the
    channel axis stays where it is before the block and keeps its distance to the end after it."""
    nd = len(s_in)
    full = [i is None or (isinstance(i, slice) and i == slice(None)) for i in idx]
    tensors = [k for k, i in enumerate(idx) if isinstance(i, fx.Node) and A.shape(i) is not None]
    ok = (len(idx) <= nd and tensors == list(range(tensors[0], tensors[-1] + 1))
          and all(full[k] for k in range(len(idx)) if k not in tensors) and src.dim not in tensors
          and all(A.shape(idx[k]) is not None for k in tensors))
    if not ok:
        A.decline(node, "advanced indexing other than index tensors on adjacent non-channel axes", src)
        return None
    if src.dim < tensors[0]:
        return src
    return src.with_dim(len(s_out) - (nd - src.dim))


@rule("index", aten.index.Tensor, names=("input", "indices"))
def index(node, A, a):
    """``aten.index(x, [None, ids])`` (torch.export's ``x[:, ids]``): as advanced indexing in ``getitem``."""
    x, indices = a["input"], a["indices"]
    src, s_in, s_out = A.info(x), A.shape(x), A.shape(node)
    if src is None or src.split or s_in is None or s_out is None or not isinstance(indices, (list, tuple)):
        A.freeze(src)
        return None
    return _gathered(node, A, src, s_in, s_out, tuple(indices))


@rule("select", torch.select, method("select"), aten.select.int, names=("input", "dim", "index"), heads=True)
def select(node, A, a):
    """x.select(d, i) (``x[:, 0]`` after torch.export) on another axis drops that axis and keeps
    every channel with its value; selecting on the channel axis freezes. On the group axis of a
    grouped info (a fused qkv's ``qkv[0]`` after torch.export) it takes that group: its heads."""
    x = a["input"]
    src, s_in = A.info(x), A.shape(x)
    if src is None or s_in is None or A.shape(node) is None or isinstance(a["dim"], fx.Node):
        A.freeze(src)
        return None
    d = _norm_dim(int(a["dim"]), len(s_in))
    if src.split and type(a["index"]) is not int:
        A.freeze(src)
        return None
    if src.split:
        i = a["index"]
        out = (src.group_part(i % src.groups) if d == src.group and -src.groups <= i < src.groups else None) \
            if src.group is not None else (
            None if d in (src.head, src.dim) else _axes_moved(src, {v: v - (v > d) for v in range(len(s_in)) if v != d}))
        if out is None:
            A.freeze(src)
        return out
    if d == src.dim:
        A.freeze(src)
        return None
    return src.with_dim(src.dim - (d < src.dim))


_INDEX_SELECT = (torch.index_select, aten.index_select.default)


_HEAD_GATHER = "sqr_fx.head_gather"


def _index_select_rewrite(node, R, a):
    gather = node.meta.get(_HEAD_GATHER)
    if gather is None:
        return _slice_rewrite(node, R, a)
    out, (src, pos, r) = R.info(node), gather
    if R.keep(out).all() and R.keep(src).all():
        return R.copy(node)
    t, g, n = kept_copies(R, out, src, pos // r)
    # after a repeat of kv heads (r > 1) the input holds every kept kv head r times: copy t is row g * r + j
    return _select(R, R.arg(node.args[0]), out.head, g * r + pos[t] % r, n * r, f"{node.name}_idx")


@rule("index_select", *_INDEX_SELECT, names=("input", "dim", "index"), rewrite=_index_select_rewrite, heads=True)
def index_select(node, A, a):
    """A gather along the channel axis with a constant index (minimize's own input gather) selects ids.
    On a head-split tensor, a gather of whole heads copies those heads (``Analysis.copy_heads``: each copy
    can go alone); right after a repeat of kv heads (the GQA rewrite's pick of the kept copies) it copies
    the repeated kv heads directly. A gather along another axis keeps every position; one inside the
    heads freezes."""
    node.meta.pop(_HEAD_GATHER, None)
    x = a["input"]
    src, s_in, idx = A.info(x), A.shape(x), A.tensor(a["index"])
    repeat = _repeated(x) if src is None and A.owed.pop(node, None) is not None else None
    if repeat is not None or (src is not None and src.split):
        base, r = repeat if repeat is not None else (src, 1)
        head = base.head
        d = _norm_dim(int(a["dim"]), len(s_in)) if s_in is not None and type(a["dim"]) is int else None
        if d is None or idx is None or idx.dim() != 1 or (d != head and repeat is not None) \
                or (repeat is None and d == src.dim):  # inside the heads, or a computed index
            A.freeze(src, base)
            return None
        if d != head:
            return src
        pos = idx.cpu().numpy().astype(np.int64)
        if len(pos) == 0 or pos.min() < 0 or pos.max() >= base.heads * r:
            A.freeze(src, base)
            return None
        node.meta[_HEAD_GATHER] = (base, pos, r)
        return A.copy_heads(base, pos // r, head, base.dim - (1 if repeat is not None else 0))
    if src is not None and src.blocks:
        A.decline(node, "gathers along an axis that flattens channels with spatial axes", src)
        return None
    if is_input_gather(x) and idx is not None:  # the gathered features are the graph's input channels
        pos = idx.cpu().numpy().astype(np.int64)
        node.meta["sqr_fx.slice_pos"] = pos
        info = ChanInfo.dynamic(1, A.fresh(len(pos)))
        if not A.drop_inputs:
            A.freeze(info)
        return info
    if src is None or s_in is None or idx is None or A.shape(node) is None:
        A.freeze(src)
        return None
    if _norm_dim(int(a["dim"]), len(s_in)) != src.dim:
        return src
    pos = idx.cpu().numpy().astype(np.int64)
    node.meta["sqr_fx.slice_pos"] = pos
    return src.take(pos)


# ---- split / chunk -----------------------------------------------------------------------------
_PIECES = "sqr_fx.pieces"


def _split_rewrite(node, R, a):
    x = node.args[0]
    src, pieces = R.info(x), node.meta.get(_PIECES)
    if src is None or pieces is None or node.meta.get("sqr_fx.split_dim") != src.dim or (
            R.keep(src).all() and all(R.keep(p).all() for p in pieces)):
        return R.copy(node)
    # per-head pieces (``_take_dims``): each kept head keeps the same dims of every piece (``uniform_heads``)
    sizes = [head_widths(R.keep(p), p)[1] if p.split else int(R.keep(p).sum()) for p in pieces]
    return R.graph.call_function(torch.split, (R.arg(x), sizes, src.dim))


@rule("split", torch.split, method("split"), aten.split.Tensor, aten.split_with_sizes.default,
      method("split_with_sizes"), torch.chunk, method("chunk"), aten.chunk.default, torch.tensor_split,
      method("tensor_split"), names=("input", "sections", "dim"), rewrite=_split_rewrite, heads=True)
def split(node, A, a):
    """Pieces along the channel axis take their positions' ids (rewritten with the kept counts);
    along another axis every piece carries the whole channel info. The tuple itself is untracked:
    ``getitem`` hands each piece its info. A head-split input (GPT-NeoX's ``[B, H, T, 3D]`` fused
    qkv, ``chunk(3, -1)``) split along its per-head axis gives each piece the same dims of every head;
    every kept head keeps the same dims (``uniform_heads``), so the rewrite's sizes are each piece's
    kept dims per head. Along its head axis: frozen."""
    x = node.args[0]
    src, s_in = A.info(x), A.shape(x)
    node.meta.pop(_PIECES, None)  # (a copy from an earlier round carries the old pieces)
    node.meta.pop("sqr_fx.split_dim", None)
    sections = next((a.get(k) for k in ("sections", "split_size_or_sections", "split_size", "split_sizes", "chunks",
                                         "indices_or_sections") if a.get(k) is not None), None)
    pieces_only = all(u.target is operator.getitem and type(u.args[1]) is int for u in node.users)
    if src is not None and src.blocks:
        A.decline(node, "splits an axis that flattens channels with spatial axes", src)
        return None
    if src is None or s_in is None or sections is None or isinstance(sections, fx.Node) or not pieces_only or (
            isinstance(sections, (list, tuple)) and any(isinstance(v, fx.Node) for v in sections)):
        A.freeze(src)  # the tuple read as a whole (cat of a slice of it, hstack ...): untracked
        return None
    d = _norm_dim(int(a.get("dim", 0)), len(s_in))
    fn = {"chunk": torch.chunk, "tensor_split": torch.tensor_split}.get(
        op_name(node).split("_with")[0], torch.split)
    if src.split:
        if d == src.head:
            A.freeze(src)
            return None
        if d == src.dim:
            node.meta["sqr_fx.split_dim"] = d
            node.meta[_PIECES] = pieces = [_take_dims(src, p.numpy()) for p in fn(torch.arange(s_in[d]), sections)]
            A.uniform_heads(src)
            A.align_heads(src, *pieces)
            return None
    if d != src.dim:
        n = len(fn(torch.empty(s_in[d]), sections))
        node.meta[_PIECES] = [src] * n
        return None
    node.meta["sqr_fx.split_dim"] = d
    node.meta[_PIECES] = [src.take(p.numpy()) for p in fn(torch.arange(len(src)), sections)]
    return None


@rule("unbind", torch.unbind, method("unbind"), aten.unbind.int, names=("input", "dim"), heads=True)
def unbind(node, A, a):
    """``x.unbind(d)``: piece i is ``x.select(d, i)``. On the group axis of a grouped info (timm's
    ``q, k, v = qkv.unbind(0)``) piece g is group g (an ordinary head split over the same heads); on
    an axis carrying no channels every piece carries the channels with that axis dropped; on a
    channel axis: frozen. The tuple is untracked: ``getitem`` hands each piece its info. Copied as is
    (the unbound axis keeps its size)."""
    x = a["input"]
    src, s_in = A.info(x), A.shape(x)
    node.meta.pop(_PIECES, None)  # (a copy from an earlier round carries the old pieces)
    pieces_only = all(u.target is operator.getitem and type(u.args[1]) is int for u in node.users)
    if src is None or s_in is None or isinstance(a.get("dim", 0), fx.Node) or not pieces_only:
        A.freeze(src)
        return None
    d = _norm_dim(int(a.get("dim", 0)), len(s_in))
    if src.group is not None:
        pieces = [src.group_part(g) for g in range(src.groups)] if d == src.group else None
    elif src.split:
        moved = None if d in (src.head, src.dim) else _axes_moved(
            src, {v: v - (v > d) for v in range(len(s_in)) if v != d})
        pieces = None if moved is None else [moved] * s_in[d]
    else:
        pieces = None if d == src.dim else [src.with_dim(src.dim - (d < src.dim))] * s_in[d]
    if pieces is None:
        A.freeze(src)
        return None
    node.meta[_PIECES] = pieces
    return None


# ---- pooling and reductions -------------------------------------------------------------------
_POOL = [F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
         F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.avg_pool1d, F.avg_pool2d,
         F.avg_pool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
         nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         aten.max_pool2d.default, aten.max_pool1d.default, aten.max_pool3d.default, aten.avg_pool2d.default,
         aten.avg_pool1d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool2d.default,
         aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
         aten._adaptive_avg_pool2d.default]


def _pool_name(node, A) -> str:
    return (type(A.module(node)).__name__ if node.op == "call_module"
            else str(getattr(node.target, "__name__", node.target))).lower()


def _avg_changes_constants(node, A) -> bool:
    """avg pooling whose windows can include padding or cut-off borders, or that divides by a
    ``divisor_override`` (a constant c becomes c k^2 / d): a constant does not stay that constant."""
    name = _pool_name(node, A)
    if "avg" not in name or "adaptive" in name:
        return False
    if node.op == "call_module":
        m = A.module(node)
        pad, ceil, div = m.padding, m.ceil_mode, getattr(m, "divisor_override", None)
    else:  # canonical layout: (input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        args = list(node.args) + [None] * 7
        pad, ceil, div = args[3] or 0, args[4] or False, args[6]
    pads = pad if isinstance(pad, (list, tuple)) else [pad]
    return any(int(p) != 0 for p in pads) or bool(ceil) or div is not None


@rule("pool", *_POOL)
def pool(node, A, a):
    """Spatial pooling keeps channel j in place; max/adaptive-avg of a constant is the constant.
    Precondition: the input has the op's batched rank (``*pool2d`` on [N, C, H, W]); on a lower rank
    torch pools an unbatched tensor and axis 1 is a spatial axis, not the channels."""
    x = a["input"]
    src, s = A.info(x), A.shape(x)
    rank = next((r for k, r in (("1d", 3), ("2d", 4), ("3d", 5)) if k in _pool_name(node, A)), None)
    if src is not None and s is not None and len(s) != rank:
        A.decline(node, f"input of rank {len(s)}: torch pools it as unbatched, over the channel axis", src)
        return None
    if src is None or src.dim != 1 or A.shape(node) is None or s is None:
        A.freeze(src)
        return None
    if _avg_changes_constants(node, A):
        return ChanInfo(src.dim, src.ids, np.zeros(len(src), bool), np.zeros(len(src)))
    return src


@rule("reduce", torch.mean, method("mean"), aten.mean.dim, torch.amax, method("amax"), aten.amax.default,
      torch.sum, method("sum"), aten.sum.dim_IntList)
def reduce(node, A, a):
    """mean/amax over axes other than the channel axis keep channel j; sum makes a constant size-dependent,
    except zero: a sum of zeros is zero at every size (a MoE layer summing its experts' outputs per token)."""
    x = node.args[0]
    src, s_in = A.info(x), A.shape(x)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if src is None or s_in is None or dims is None or A.shape(node) is None:
        A.freeze(src)
        return None
    dims = [_norm_dim(int(d), len(s_in)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if src.dim in dims:
        A.freeze(src)
        return None
    new_dim = src.dim if keep else src.dim - sum(d < src.dim for d in dims)
    is_sum = "sum" in str(getattr(node.target, "__name__", node.target))
    const = src.zero if is_sum else src.const
    return ChanInfo(new_dim, src.ids, const, np.where(const, src.value, 0.0))


# ---- shape reads ------------------------------------------------------------------------------
_METADATA = {"ndim", "dtype", "device", "is_cuda", "is_cpu", "is_meta", "requires_grad", "layout", "is_sparse",
             "is_quantized", "is_floating_point", "is_complex"}


@rule("size", method("size"), aten.sym_size.int, getattr, heads=True)
def size(node, A, a):
    """Reading the channel axis' size (or the whole shape) freezes it: the number would change.
    ``q.dtype`` of a head-split q (eager attention's ``softmax(...).to(q.dtype)``) reads no channel."""
    x = node.args[0] if node.args else None
    src = A.info(x)
    if src is None:
        return None
    if node.target is getattr and node.args[1] in _METADATA:
        return None  # x.ndim, x.dtype, x.device ...: nothing that counts channels
    if src.split:
        A.freeze(src)
        return None
    if node.target is getattr and node.args[1] != "shape":
        A.freeze(src)  # x.T, x.mT, x.data ...: a tensor, not metadata, and not followed
        return None
    whole = node.target is getattr or (node.op == "call_method" and len(node.args) < 2 and "dim" not in node.kwargs)
    if whole:
        # x.shape / x.size() used only as [i] for other axes (batch size, sequence length) is harmless
        # (an unpacked size nothing uses, as in ``b, _, h, w = x.shape``, reads nothing)
        if all(u.target is operator.getitem and type(u.args[1]) is int
               and (_norm_dim(u.args[1], len(A.shape(x) or ())) != src.dim or not u.users) for u in node.users):
            return None
        A.freeze(src)
        return None
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if d is None or _norm_dim(int(d), len(A.shape(x) or ())) == src.dim:
        A.freeze(src)
    return None


try:  # torch.export's input-shape guard: reads shapes of graph inputs, which never change
    from torch.export._unlift import GuardsFn as _GuardsFn
except ImportError:  # pragma: no cover - older torch
    _GuardsFn = None


def _guard_rewrite(node, R, a):
    """export's guard checks the caller's inputs: it reads the graph inputs themselves, never
    minimize's gather of them (which has fewer features than the guard expects)."""
    return R.copy(node, R.raw_inputs)


@rule("shape_guard", method("dim"), _GuardsFn, rewrite=_guard_rewrite)
def shape_guard(node, A, a):
    """Reads only the rank / the graph inputs' shapes: no channel is affected."""
    return None


try:  # the guard symbolic_trace writes for an argument fixed to None (``concrete_args``)
    from torch.fx._symbolic_trace import _assert_is_none
except ImportError:  # pragma: no cover - older torch
    _assert_is_none = None


@rule("python_check", torch._assert, _assert_is_none, operator.eq, operator.ne, operator.lt, operator.le,
      operator.gt, operator.ge, operator.not_, operator.mod, operator.floordiv, names=("input", "other"),
      per_target={torch._assert: ("condition", "message"), _assert_is_none: ("value", "msg"),
                  operator.not_: ("input",)})
def python_check(node, A, a):
    """Python-level checks and size arithmetic on numbers (``torch._assert(x.ndim == 4)``, FX's guards of
    arguments fixed to their defaults, timm's ``(ws - W % ws) % ws``): they read no tensor value, so no
    channel is affected. The same ops on tensors are not followed (their operands keep their channels)."""
    tensors = [x for x in node.all_input_nodes if A.shape(x) is not None]
    if tensors:
        A.decline(node, "a comparison or integer arithmetic of tensors", tensors)
    return None


@rule("assert_metadata", aten._assert_tensor_metadata.default,
      names=("input", "size", "stride", "dtype", "device", "layout"), heads=True)
def assert_metadata(node, A, a):
    """torch.export's check of a tensor's dtype/device/layout (after GPT-2's embeddings, before Qwen3's
    float32 q_norm on head-split q): the channel count is not read, so nothing is frozen, head-split or
    not; an asserted size or stride freezes."""
    if a.get("size") is not None or a.get("stride") is not None:
        A.freeze(a["input"])
    return None


from .weighted import ones_map as _ones_map  # noqa: E402


@rule("shape_read", _ones_map)
def ones_map_rule(node, A, a):
    """The folded-constant correction's all-ones map reads only batch and spatial sizes."""
    return None
