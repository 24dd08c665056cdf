"""Written-out normalizations, rotary embeddings and MoE batched linears recognized as the op they compute
(needs traced shapes).

Written-out LayerNorms: ``layer_norm_pattern.py``.
Transformers' ``batched_mm`` experts ``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)`` become one
:func:`sqr_fx.moe.expert_linear` call.

Hugging Face writes RMSNorm out (Llama, Mistral, Qwen, Gemma, T5, OLMo ...)::

    variance = x.pow(2).mean(-1, keepdim=True)          # or (x * x).mean, x.square().mean
    x = x * torch.rsqrt(variance + eps)                  # operands in either order

T5 takes the mean square of a cast, ``x.to(torch.float32).pow(2).mean(-1, keepdim=True)``, and multiplies
``x`` itself: that form becomes :func:`sqr_fx.layers.upcast_rms_norm` (the same ops; its rewrite rebuilds
removed constant channels at full width, so the float32 statistic stays the original one bit for bit).

The ``mean`` over the channel axis would freeze the residual stream. The subgraph computes exactly
``F.rms_norm(x, (C,), None, eps)`` (the same formula; only float rounding may differ), so it is
rewritten to that call, whose rule removes stream channels with a compensated RMS (the weight
multiply after it, ``weight * x`` or Gemma's ``(1 + weight) * x``, stays an ordinary per-channel
product). Matched only when every intermediate has no other reader, the mean is over the last axis
with ``keepdim=True``, and ``eps`` is a Python number; anything else is left as it is.

Rotary position embeddings (Llama, Mistral, Qwen2 ...) are written out too::

    x * cos + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * sin     # rotate_half form

Each of the slices, the negation and the cat would see a head-split tensor alone and freeze it; the
subgraph is rewritten to one :func:`sqr_fx.attention.rotary` call (the same ops, in the same order),
whose rule couples each rotation pair ``(i, i + D/2)`` (``rules/rotary.py``). GPT-J's interleaved form
``x * cos + stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) * sin`` (pairs ``(2i, 2i + 1)``) becomes
one :func:`sqr_fx.attention.rotary_interleaved` call the same way, and so does timm EVA's
``stack(...).reshape(x.shape)`` where the reshape gives X's shape on every derived input shape.

Attention padded at run time, as a portable ``minimize(..., align=N)`` result writes it
(``sdpa(pad(q), pad(k), pad(v)).narrow(-1, 0, size - p_v)``), becomes one
:func:`sqr_fx.attention.padded_sdpa` call again: minimized once more, the pads are kernel widths, not
channels.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

from .rules.registry import op_name
from .values import shape_of

__all__ = ["fused_slots_from_pattern", "rms_norm_from_pattern", "rotary_from_pattern", "expert_linear_from_pattern",
           "padded_sdpa_from_pattern"]

aten = torch.ops.aten


def _only_user(n: Any) -> bool:
    return isinstance(n, fx.Node) and len(n.users) == 1


def _squared(n: Any) -> Optional[fx.Node]:
    """X when ``n`` is X ** 2 (``pow(X, 2)``, ``X * X``, ``square(X)``)."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    name = op_name(n)
    if name in ("pow", "pow_") and len(n.args) == 2 and n.args[1] == 2 and isinstance(n.args[0], fx.Node):
        return n.args[0]
    if name == "mul" and len(n.args) == 2 and n.args[0] is n.args[1] and isinstance(n.args[0], fx.Node):
        return n.args[0]
    if name == "square" and len(n.args) == 1:
        return n.args[0]
    return None


def _mean_last(n: Any) -> Optional[fx.Node]:
    """The squared tensor when ``n`` is its mean over the last axis with keepdim."""
    if not isinstance(n, fx.Node) or op_name(n) != "mean" or len(n.args) < 2:
        return None
    x, dims = n.args[0], n.args[1]
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    s = shape_of(x)
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if s is None or keep is not True or len(dims) != 1 or not isinstance(dims[0], int):
        return None
    return x if dims[0] % len(s) == len(s) - 1 else None


def _cast_of(n: Any) -> Optional[tuple[fx.Node, torch.dtype]]:
    """(X, dtype) when ``n`` only converts X to a floating dtype (``X.to(d)``, ``aten._to_copy(X, dtype=d)``,
    ``X.float()``, ``X.double()``), nothing else (no device, layout or memory format)."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") or not n.args \
            or not isinstance(n.args[0], fx.Node):
        return None
    name, rest, kw = op_name(n), n.args[1:], dict(n.kwargs)
    if name in ("float", "double") and not rest and not kw:
        return n.args[0], torch.float32 if name == "float" else torch.float64
    if name == "to" and len(rest) == 1 and not kw and isinstance(rest[0], torch.dtype):
        d = rest[0]
    elif name == "_to_copy" and not rest and set(kw) == {"dtype"}:
        d = kw["dtype"]
    else:
        return None
    return (n.args[0], d) if isinstance(d, torch.dtype) and d.is_floating_point else None


def _rsqrt_of(n: Any) -> Optional[tuple[fx.Node, float]]:
    """(X, eps) when ``n`` is rsqrt(mean(X ** 2, -1, keepdim=True) + eps), intermediates unshared."""
    if not isinstance(n, fx.Node) or op_name(n) != "rsqrt" or not _only_user(n.args[0]):
        return None
    add = n.args[0]
    if op_name(add) != "add" or len(add.args) != 2:
        return None
    mean, eps = add.args if isinstance(add.args[1], (int, float)) else add.args[::-1]
    if not isinstance(eps, (int, float)) or not _only_user(mean) or add.kwargs.get("alpha", 1) != 1:
        return None
    sq = _mean_last(mean)
    if not _only_user(sq):
        return None
    x = _squared(sq)
    return (x, float(eps)) if x is not None else None


def _last_dims(gm: fx.GraphModule, nodes: set[fx.Node], example_inputs: tuple) -> dict[fx.Node, set[int]]:
    """The last-axis sizes ``nodes`` take on the derived input shapes the graph accepts."""
    return {n: {sh[-1] for sh in v} for n, v in _shapes_seen(gm, nodes, example_inputs).items()}


def _shapes_seen(gm: fx.GraphModule, nodes: set[fx.Node], example_inputs: tuple) -> dict[fx.Node, set[tuple]]:
    """The shapes ``nodes`` take on the derived input shapes the graph accepts."""
    from .verify import _clone, _new_values, derived_inputs

    seen: dict[fx.Node, set[tuple]] = {n: set() for n in nodes}

    class Record(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in seen and isinstance(out, torch.Tensor) and out.dim():
                seen[n].add(tuple(int(v) for v in out.shape))
            return out

    g = torch.Generator().manual_seed(1)
    single = []  # every non-batch axis of every input alone, one larger (channels-last images, [C, L] ...)
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor):
            for d in range(1, x.dim()):
                shape = list(x.shape)
                shape[d] += 1
                single.append(tuple(_new_values(x, tuple(shape), g) if j == i else v
                                    for j, v in enumerate(example_inputs)))
    for inputs in [v for _, v in derived_inputs(example_inputs)[1:]] + single:
        try:
            with torch.no_grad():
                Record(gm).run(*_clone(inputs))
        except Exception:  # noqa: BLE001 - a shape the model refuses says nothing
            continue
    return seen


def rms_norm_from_pattern(gm: fx.GraphModule, example_inputs: tuple = ()) -> int:
    """Rewrite every written-out RMSNorm (module docstring) to ``F.rms_norm``; returns how many.
    Needs ``tensor_meta`` (shape propagation) on the graph. ``F.rms_norm`` takes the normalized width
    as a literal, so a match is rewritten only when its last axis keeps the traced width on every
    derived input shape the graph accepts (a feature axis, not a sequence or flattened axis)."""
    matches = []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or op_name(node) != "mul" or len(node.args) != 2:
            continue
        a, b = node.args
        for x, r in ((a, b), (b, a)):
            found = _rsqrt_of(r) if _only_user(r) else None
            s = shape_of(x) if found is not None else None
            if found is None or s is None or shape_of(node) != s:
                continue
            cast = _cast_of(found[0]) if found[0] is not x and _only_user(found[0]) else None
            if found[0] is x or (cast is not None and cast[0] is x):
                matches.append((node, x, r, found[1], cast[1] if cast is not None else None))
                break
    if not matches:
        return 0
    from .layers import upcast_rms_norm

    widths = _last_dims(gm, {m[1] for m in matches}, example_inputs)
    count = 0
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier match's product -> its rms_norm (chained norms)
    for node, x0, r, eps, stat in matches:
        x, s = replaced.get(x0, x0), shape_of(x0)
        if widths[x0] - {s[-1]}:
            continue  # the last axis changes with the input's shape: not a fixed normalized width
        with gm.graph.inserting_before(node):
            if stat is None:
                new = gm.graph.call_function(F.rms_norm, (x, (s[-1],), None, eps))
            else:  # T5: the mean square of a cast, the product with x itself (the same ops, in order)
                new = gm.graph.call_function(upcast_rms_norm, (x, eps, stat))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        replaced[node] = new
        add = r.args[0]
        mean = next(v for v in add.args if isinstance(v, fx.Node))
        sq = mean.args[0]
        base = _squared(sq)
        for dead in (node, r, add, mean, sq) + ((base,) if base is not x0 else ()):
            if not dead.users:
                gm.graph.erase_node(dead)
        count += 1
    if count:
        gm.recompile()
    return count



# ---- rotary position embedding ------------------------------------------------------------------------------
def _slice_of(n: Any) -> Optional[tuple[fx.Node, int, range]]:
    """(X, axis, positions) when ``n`` slices one axis of X with literal bounds and nothing else
    (``X[..., a:b:s]``, ``X[:, :, a:b]``, ``aten.slice(X, d, a, b, s)``); axis is non-negative."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node) \
            or n.kwargs:
        return None
    x, s = n.args[0], shape_of(n.args[0])
    if s is None or not s:
        return None
    if n.target is aten.slice.Tensor:
        d, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
        if not all(v is None or type(v) is int for v in (d, start, end, step)) or d is None:
            return None
        return x, d % len(s), range(s[d])[slice(start, end, step)]
    if n.target is operator.getitem:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if idx.count(Ellipsis) == 1 and idx[-1] is not Ellipsis and idx[:-1] == (Ellipsis,):
            idx = (slice(None),) * (len(s) - 1) + idx[-1:]
        if Ellipsis in idx or len(idx) != len(s) or not all(isinstance(i, slice) for i in idx) \
                or any(v is not None and type(v) is not int for i in idx for v in (i.start, i.stop, i.step)):
            return None
        cut = [d for d, i in enumerate(idx) if i != slice(None)]
        d = cut[0] if len(cut) == 1 else len(s) - 1
        return (x, d, range(s[d])[idx[d]]) if len(cut) <= 1 else None
    return None


def _last_axis_positions(n: Any) -> Optional[tuple[fx.Node, range, list[fx.Node]]]:
    """(X, positions, the slices) when ``n`` slices X's last axis, possibly after full slices of other
    axes (``aten.slice(aten.slice(X, 0, 0, max), 3, 0, 8)`` after torch.export), each read only by the next."""
    found = _slice_of(n)
    if found is None or found[1] != len(shape_of(found[0])) - 1:
        return None
    x, _, pos = found
    chain = [n]
    while _only_user(x):
        up = _slice_of(x)
        if up is None or up[2] != range(shape_of(up[0])[up[1]]):  # not a full slice: a real selection
            break
        chain.append(x)
        x = up[0]
    return x, pos, chain


def _rotation_of(n: Any) -> Optional[tuple[fx.Node, bool, list[fx.Node], Optional[fx.Node]]]:
    """(X, interleaved, intermediate nodes, the reshape or None) when ``n`` is ``rotate_half(X)`` =
    ``cat((-X[..., D/2:], X[..., :D/2]), -1)`` or ``rotate_every_two(X)`` =
    ``stack((-X[..., 1::2], X[..., ::2]), -1).flatten(-2)`` (or ``.reshape(sizes)`` / ``.view(sizes)``
    giving X's traced shape: the caller checks it gives X's shape on every derived input too), with
    unshared intermediates."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return None
    inter = [n]
    reshaped = None
    interleaved = op_name(n) in ("flatten", "reshape", "view")
    if interleaved:  # flatten(stack(...), -2): the trailing pair axis back into the last one
        inner, s = n.args[0] if n.args else None, shape_of(n.args[0]) if n.args else None
        if s is None or not _only_user(inner) or op_name(inner) != "stack":
            return None
        if op_name(n) == "flatten":
            start = n.kwargs.get("start_dim", n.args[1] if len(n.args) > 1 else 0)
            end = n.kwargs.get("end_dim", n.args[2] if len(n.args) > 2 else -1)
            if type(start) is not int or type(end) is not int or start % len(s) != len(s) - 2 \
                    or end % len(s) != len(s) - 1:
                return None
        else:  # ``.reshape(x.shape)`` (timm's EVA): X's shape back, checked by the caller on every derived input
            reshaped = n
        n = inner
        inter.append(n)
    elif op_name(n) not in ("cat", "concat"):
        return None
    if n.op != "call_function":
        return None
    parts = n.args[0] if n.args else None
    d = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or type(d) is not int:
        return None
    neg, lo = parts
    if not (_only_user(neg) and _only_user(lo) and op_name(neg) == "neg" and len(neg.args) == 1 and not neg.kwargs):
        return None
    hi = _last_axis_positions(neg.args[0]) if _only_user(neg.args[0]) else None
    lo_ = _last_axis_positions(lo)
    if hi is None or lo_ is None or hi[0] is not lo_[0]:
        return None
    x, s = hi[0], shape_of(hi[0])
    D = s[-1]
    if interleaved:
        ok = d % (len(s) + 1) == len(s) and hi[1] == range(1, D, 2) and lo_[1] == range(0, D, 2)
    else:
        ok = d % len(s) == len(s) - 1 and hi[1] == range(D // 2, D) and lo_[1] == range(D // 2)
    if D % 2 or not ok or (reshaped is not None and shape_of(reshaped) != s):
        return None
    return x, interleaved, inter + [neg] + hi[2] + lo_[2], reshaped


def _mul_operands(n: Any) -> Optional[tuple[Any, Any]]:
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") or op_name(n) != "mul" \
            or len(n.args) != 2 or n.kwargs:
        return None
    return n.args[0], n.args[1]


def _rotary_match(node: fx.Node):
    """(X, cos, sin, interleaved, nodes the call replaces) for ``X * cos + rotation(X) * sin`` (module docstring)."""
    for m_cos, m_sin in (node.args, node.args[::-1]):
        a, b = _mul_operands(m_cos), _mul_operands(m_sin)
        if a is None or b is None:
            continue
        for r, sin in (b, b[::-1]):
            found = _rotation_of(r) if _only_user(r) else None
            if found is None:
                continue
            x, interleaved, inter, reshaped = found
            for xx, cos in (a, a[::-1]):
                if xx is x and cos is not x and sin is not x:
                    return x, cos, sin, interleaved, [node, m_cos, m_sin] + inter, reshaped
    return None


def _erase_unread(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the pure size computations among ``nodes`` (and their inputs) that nothing reads any more."""
    from .rewrite import _impure

    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n.users or n.op not in ("call_function", "call_method") or _impure(n) or n.graph is not gm.graph:
            continue
        todo.extend(n.all_input_nodes)
        gm.graph.erase_node(n)


def rotary_from_pattern(gm: fx.GraphModule, example_inputs: tuple = ()) -> int:
    """Rewrite every written-out rotary embedding ``X * cos + rotate_half(X) * sin`` (operands of each
    product and of the sum in either order) to one :func:`sqr_fx.attention.rotary` call, and the
    interleaved (GPT-J) ``X * cos + rotate_every_two(X) * sin`` to one ``rotary_interleaved`` call;
    returns how many.

    The call computes the same ops in the same order (products and sums commute exactly in floating
    point), so the graph's function is unchanged bit for bit. Matched only when the slices, the
    negation, the cat / stack and both products have no other reader; X itself may have any readers.
    Needs ``tensor_meta`` (the slices' bounds are checked against X's traced last-axis width).

    timm's EVA writes the interleaved rotation as ``stack(...).reshape(x.shape)`` (after torch.export:
    ``reshape(stack, [s0, 3, s1 * s2, 64])``). A reshape whose result keeps the last width D of a
    contiguous ``[..., D/2, 2]`` tensor moves whole rows, so it equals ``flatten(-2)`` exactly when it
    gives X's shape; that is checked at the traced shape and on every derived input shape the graph
    accepts (as for the RMSNorm width), else the match is left alone."""
    from .attention import rotary, rotary_interleaved

    matches = []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or op_name(node) != "add" or len(node.args) != 2 \
                or node.kwargs or not all(_only_user(a) for a in node.args):
            continue
        match = _rotary_match(node)
        if match is not None:
            matches.append((node,) + match)
    reshapes = {m[-1]: m[1] for m in matches if m[-1] is not None}
    if reshapes:  # each reshape must give its X's shape on the derived inputs too (none known: left alone)
        seen = _shapes_seen(gm, set(reshapes) | set(reshapes.values()), example_inputs) if example_inputs else None
        matches = [m for m in matches if m[-1] is None or (seen is not None and seen[m[-1]] == seen[m[1]])]
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier match's sum -> its call (X of a later match)
    for node, x0, cos, sin, interleaved, dead, reshaped in matches:
        x, cos, sin = (replaced.get(v, v) for v in (x0, cos, sin))
        with gm.graph.inserting_before(node):
            if interleaved:
                new = gm.graph.call_function(rotary_interleaved, (x, cos, sin))
            else:
                new = gm.graph.call_function(rotary, (x, cos, sin, shape_of(x0)[-1] // 2))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        replaced[node] = new
        sizes = reshaped.all_input_nodes[1:] if reshaped is not None else []
        for n in dead:  # in data-flow order from the sum back to X's slices
            if not n.users:
                gm.graph.erase_node(n)
        _erase_unread(gm, sizes)  # ``x.shape`` / sym sizes the reshape read: left, they would read X's channels
    if matches:
        gm.recompile()
    return len(matches)


# ---- slots of a fused projection viewed as (groups, slots, dims) ------------------------------------------
def _slot_split(v: Any) -> Optional[tuple[fx.Node, list, int, int, int]]:
    """(X, leading sizes, G, S, D) when ``v`` views X's last axis as (G, S, D), the leading axes unchanged."""
    if not isinstance(v, fx.Node) or v.op != "call_function" or op_name(v) not in ("view", "reshape") \
            or len(v.args) != 2 or not isinstance(v.args[0], fx.Node) or not isinstance(v.args[1], (list, tuple)):
        return None
    x, sizes = v.args[0], list(v.args[1])
    sx, sv = shape_of(x), shape_of(v)
    if sx is None or sv is None or len(sv) != len(sx) + 2 or len(sizes) != len(sv) or sv[:len(sx) - 1] != sx[:-1] \
            or sv[-3] * sv[-2] * sv[-1] != sx[-1]:
        return None
    return x, sizes[:len(sx) - 1], sv[-3], sv[-2], sv[-1]


def _slot_selection(u: fx.Node, gm: fx.GraphModule, nd: int, S: int) -> Optional[tuple[list[int], list[fx.Node]]]:
    """(slots, nodes) when ``u`` (after full slices of any axis, each read only by the next) takes literal
    slots along axis ``nd - 2``: ``x[..., a:b, :]`` or ``aten.index(x, [None, ..., stored ids])``."""
    chain = []
    while True:
        found = _slice_of(u)
        if found is None or found[1] == nd - 2 or found[2] != range(shape_of(found[0])[found[1]]):
            break
        if not _only_user(u):
            return None
        chain.append(u)
        (u,) = u.users
    found = _slice_of(u)
    if found is not None and found[1] == nd - 2:
        return list(found[2]), chain + [u]
    if u.target is aten.index.Tensor and len(u.args) == 2 and isinstance(u.args[1], (list, tuple)) \
            and len(u.args[1]) == nd - 1 and all(i is None for i in u.args[1][:-1]) \
            and isinstance(u.args[1][-1], fx.Node) and u.args[1][-1].op == "get_attr":
        from .trace import fetch_attr

        t = fetch_attr(gm, u.args[1][-1].target)
        if isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and t.dtype != torch.bool \
                and bool(((t >= -S) & (t < S)).all()):
            return [int(i) % S for i in t.tolist()], chain + [u]
    return None


def _merge_of(n: Any, nd: int) -> bool:
    """``n`` flattens axes (nd - 3, nd - 2): groups and slots into one head axis."""
    if not isinstance(n, fx.Node) or n.target is not aten.flatten.using_ints or len(n.args) != 3:
        return False
    return [d % nd if type(d) is int else None for d in n.args[1:]] == [nd - 3, nd - 2]


def fused_slots_from_pattern(gm: fx.GraphModule) -> int:
    """Falcon's grouped qkv (``new_decoder_architecture``)::

        qkv = fused.view(B, T, G, S, D)                 # G kv groups of S = r q heads + k + v
        q = qkv[:, :, :, :-2].flatten(2, 3)                                   # [B, T, G * r, D]
        k = torch.broadcast_to(qkv[:, :, :, [-2]], q_shape).flatten(2, 3)     # each kv head r times

    The (G, S, D) view would be a three-factor split whose slots no rule selects. Each selection of slots
    P followed by the merge of (G, P) into heads is the gather of its channels from the unsplit axis,
    ``fused.index_select(-1, idx).view(B, T, G * |P|, D)`` with idx = (g, p, d) in row-major order; a
    single slot broadcast to r copies is ``view(B, T, G, D)[..., None, :].expand(.., r, ..).reshape(B, T,
    G * r, D)``, Hugging Face's ``repeat_kv``. Pure data movement: the same values, bit for bit. The
    rules then see an ordinary head split (q heads) and repeated kv heads. Returns how many selections
    were rewritten; needs ``tensor_meta`` (the caller propagates shapes again afterwards)."""
    count = 0
    for v in list(gm.graph.nodes):
        found = _slot_split(v)
        if found is None:
            continue
        x, lead, G, S, D = found
        nd = len(lead) + 3
        for u in list(v.users):
            sel = _slot_selection(u, gm, nd, S)
            if sel is None or not _only_user(sel[1][-1]):
                continue
            slots, chain = sel
            (nxt,) = chain[-1].users
            r = None
            if not _merge_of(nxt, nd):  # a single slot broadcast over r heads, then merged
                sb = shape_of(nxt)
                if len(slots) != 1 or op_name(nxt) not in ("broadcast_to", "expand") or not _only_user(nxt) \
                        or sb is None or len(sb) != nd or sb[-3] != G or sb[-1] != D \
                        or not _merge_of(next(iter(nxt.users)), nd):
                    continue
                r, chain = sb[-2], chain + [nxt]
                (nxt,) = nxt.users
            idx = torch.tensor([(g * S + p) * D + d for g in range(G) for p in slots for d in range(D)])
            name = f"sqr_fx_slots_{count}_{v.name}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, idx)
            with gm.graph.inserting_before(nxt):
                gather = gm.graph.call_function(aten.index_select.default,
                                                (x, nd - 3, gm.graph.get_attr(name)))
                if r is None:
                    new = gm.graph.call_function(aten.view.default, (gather, [*lead, G * len(slots), D]))
                else:
                    heads = gm.graph.call_function(aten.view.default, (gather, [*lead, G, D]))
                    one = gm.graph.call_function(aten.unsqueeze.default, (heads, nd - 2))
                    rep = gm.graph.call_function(aten.expand.default, (one, [-1] * (nd - 2) + [r, -1]))
                    new = gm.graph.call_function(aten.reshape.default, (rep, [*lead, G * r, D]))
            nxt.replace_all_uses_with(new)
            for n in [nxt] + chain[::-1]:
                if not n.users:
                    gm.graph.erase_node(n)
            count += 1
        if count and not v.users:
            gm.graph.erase_node(v)
    if count:
        gm.recompile()
    return count


# ---- mixture-of-experts batched linear ------------------------------------------------------------------------
def _index_rows(n: Any) -> Optional[tuple[fx.Node, fx.Node]]:
    """(W, ids) when ``n`` is ``W[ids]``: one index tensor on the first axis of a ``get_attr`` tensor."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.kwargs:
        return None
    if n.target is aten.index.Tensor and len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) \
            and len(n.args[1]) == 1:
        w, ids = n.args[0], n.args[1][0]
    elif n.target is operator.getitem and len(n.args) == 2:
        w, ids = n.args
    else:
        return None
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(ids, fx.Node)):
        return None
    s, si = shape_of(w), shape_of(ids)
    return (w, ids) if s is not None and len(s) == 3 and si is not None and len(si) == 1 else None


def _unsqueezed(n: Any, dim: int) -> Optional[fx.Node]:
    """X when ``n`` is ``X.unsqueeze(dim)`` (dim as written, or its non-negative form for a 2-D X)."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") or op_name(n) != "unsqueeze" \
            or n.kwargs or len(n.args) != 2 or type(n.args[1]) is not int:
        return None
    x, s = n.args[0], shape_of(n.args[0])
    return x if isinstance(x, fx.Node) and s is not None and len(s) == 2 and n.args[1] % 3 == dim % 3 else None


def expert_linear_from_pattern(gm: fx.GraphModule) -> int:
    """Rewrite every ``bmm(W[ids], x.unsqueeze(-1)).squeeze(-1)`` (transformers' ``batched_mm`` experts,
    ``W [E, out, in]`` a ``get_attr`` tensor, ``x [S, in]``, ``ids [S]``) to one
    :func:`sqr_fx.moe.expert_linear` call (the same ops in the same order); returns how many. Matched only
    when the gathered weights, the unsqueeze and the bmm have no other reader. Needs ``tensor_meta``."""
    from .moe import expert_linear

    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or op_name(node) != "squeeze" or node.kwargs \
                or len(node.args) != 2 or type(node.args[1]) is not int or node.args[1] % 3 != 2:
            continue
        bmm = node.args[0]
        if not _only_user(bmm) or op_name(bmm) != "bmm" or bmm.kwargs or len(bmm.args) != 2:
            continue
        g, u = bmm.args
        found, x = _index_rows(g) if _only_user(g) else None, _unsqueezed(u, -1) if _only_user(u) else None
        if found is None or x is None:
            continue
        w, ids = found
        if shape_of(w)[2] != shape_of(x)[1] or shape_of(ids)[0] != shape_of(x)[0]:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(expert_linear, (x, w, ids))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        for dead in (node, bmm, g, u):
            gm.graph.erase_node(dead)
        count += 1
    if count:
        gm.recompile()
    return count


# ---- attention padded at run time (sqr_fx's own portable form of ``padded_sdpa``) ------------------------------
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)


def _zero_pad_last(n: Any) -> Optional[tuple[fx.Node, int]]:
    """(X, p) when ``n`` is X with p > 0 zeros appended on its last axis (``F.pad(X, (0, p))``, constant mode,
    value 0 or None; ``aten.constant_pad_nd``, ``aten.pad``) and nothing else reads it."""
    if not _only_user(n) or n.op != "call_function" or n.target not in (F.pad, aten.pad.default,
                                                                         aten.constant_pad_nd.default):
        return None
    names = ("input", "pad", "value") if n.target is aten.constant_pad_nd.default else ("input", "pad", "mode", "value")
    if len(n.args) > len(names) or set(n.kwargs) - set(names):
        return None
    a = {**dict(zip(names, n.args)), **n.kwargs}
    pad, x = a.get("pad"), a.get("input")
    if not isinstance(x, fx.Node) or not isinstance(pad, (list, tuple)) or len(pad) != 2 \
            or not all(type(p) is int for p in pad) or pad[0] != 0 or pad[1] <= 0 \
            or a.get("mode", "constant") != "constant" or a.get("value") not in (None, 0, 0.0):
        return None
    return x, pad[1]


def _last_size_minus(n: Any, of: fx.Node, p: int) -> bool:
    """``n`` is ``of.shape[-1] - p`` (``getattr(of, 'shape')[-1]``, ``of.size(-1)``, ``aten.sym_size.int``; the
    last axis by -1 or its index), or the int that is at the traced shape."""
    s = shape_of(of)
    if s is None:
        return False
    last = (-1, len(s) - 1)
    if type(n) is int:
        return n == s[-1] - p
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target is not operator.sub or n.kwargs \
            or len(n.args) != 2 or n.args[1] != p or not isinstance(n.args[0], fx.Node):
        return False
    size = n.args[0]
    if size.op == "call_function" and size.target is operator.getitem and size.args[1] in last:
        sh = size.args[0]
        return isinstance(sh, fx.Node) and sh.op == "call_function" and sh.target is getattr \
            and tuple(sh.args) == (of, "shape")
    if size.op == "call_method" and size.target == "size" and tuple(size.args) in ((of, -1), (of, len(s) - 1)):
        return True
    return size.op == "call_function" and size.target is aten.sym_size.int and size.args[0] is of \
        and size.args[1] in last


def _cut_last(u: fx.Node, of: fx.Node, p: int) -> bool:
    """``u`` keeps the first ``of.shape[-1] - p`` positions of ``of``'s last axis (``narrow``, ``aten.slice``)."""
    s = shape_of(of)
    if s is None or u.op not in ("call_function", "call_method") or u.kwargs:
        return False
    last = (-1, len(s) - 1)
    if op_name(u) == "narrow" and len(u.args) == 4 and u.args[0] is of:
        return u.args[1] in last and u.args[2] == 0 and _last_size_minus(u.args[3], of, p)
    if u.target is aten.slice.Tensor and len(u.args) in (4, 5) and u.args[0] is of:
        return u.args[1] in last and u.args[2] == 0 and (len(u.args) == 4 or u.args[4] == 1) \
            and _last_size_minus(u.args[3], of, p)
    return False


def padded_sdpa_from_pattern(gm: fx.GraphModule, example_inputs: tuple = ()) -> int:
    """Rewrite ``sdpa(pad(q), pad(k), pad(v))[..., :-p_v]`` (zero dims appended to the head axis of q and k
    alike and of v, the output cut back: how a portable ``minimize(..., align=N)`` result writes
    :func:`sqr_fx.attention.padded_sdpa` out) to one ``padded_sdpa`` call, so that minimizing such a result
    again treats the pads as kernel widths, not as channels (a pad on the channel axis freezes them). The
    same function by construction: ``padded_sdpa`` runs these ops, and cuts ``out.shape[-1] - p_v``; a cut
    written as an int literal is matched only where the output's last axis has that size at every derived input
    shape (a head axis; a sequence axis there would make the literal another cut). Needs ``tensor_meta``;
    returns how many."""
    from .attention import padded_sdpa

    count = 0
    literal_ok: Optional[dict[fx.Node, set[int]]] = None
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        if len(node.args) > 6 or set(node.kwargs) - set(_SDPA_NAMES):
            continue
        a = {**dict(zip(_SDPA_NAMES, node.args)), **node.kwargs}
        q, k, v = (a.get(n) for n in _SDPA_NAMES[:3])
        if not all(isinstance(t, fx.Node) for t in (q, k, v)) or len({q, k, v}) != 3:
            continue
        qp, kp, vp = (_zero_pad_last(t) for t in (q, k, v))
        if (qp is None) != (kp is None) or (qp is not None and qp[1] != kp[1]) or (qp is None and vp is None):
            continue
        cut = None
        if vp is not None:
            users = list(node.users)
            if len(users) != 1 or not _cut_last(users[0], node, vp[1]):
                continue
            cut = users[0]
            if type(cut.args[3]) is int:
                if literal_ok is None:  # (one run over the derived shapes for every literal cut of the graph)
                    literal_ok = _last_dims(gm, {n for n in gm.graph.nodes if n.target in _SDPA}, example_inputs)
                if not example_inputs or literal_ok.get(node, set()) - {shape_of(node)[-1]}:
                    continue
        new_args = {n: a[n] for n in _SDPA_NAMES[3:] if n in a}
        new_args.update(query=qp[0] if qp else q, key=kp[0] if kp else k, value=vp[0] if vp else v,
                        qk_pad=qp[1] if qp else 0, v_pad=vp[1] if vp else 0)
        out = cut if cut is not None else node
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(padded_sdpa, (), new_args)
        new.meta = dict(out.meta)
        length = [cut.args[3]] if cut is not None and isinstance(cut.args[3], fx.Node) else []
        out.replace_all_uses_with(new)
        for d in [out] + ([node] if cut is not None else []):
            gm.graph.erase_node(d)
        _erase_unread(gm, [q, k, v] + length)  # (the pads and the size arithmetic, now unread)
        count += 1
    if count:
        gm.recompile()
    return count
