"""Written-out LayerNorm recognized as ``F.layer_norm`` (needs traced shapes; see ``patterns.py``).

ConvNeXt's channels-first LayerNorm, hand-written transformer blocks::

    u = x.mean(a, keepdim=True); v = ((x - u) ** 2).mean(a, keepdim=True)   # or x.var(a, unbiased=False),
    y = (x - u) / torch.sqrt(v + eps)                                         # var_mean(x, a, correction=0);
                                                                              # or (x - u) * rsqrt(v + eps)

becomes ``F.layer_norm(x, (C,), None, None, eps)`` (between two permutes when ``a`` is not the last axis);
every precondition of that identity is checked (:func:`_layer_norm_match`), anything else stays written out
(its mean over the channel axis then keeps the stream, which is exact).
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

from .patterns import _only_user, _shapes_seen, _squared
from .rules.registry import op_name
from .values import shape_of

__all__ = ["layer_norm_from_pattern"]


# ---- written-out LayerNorm ----------------------------------------------------------------------------------
def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _one_axis(x: Any, dims: Any) -> Optional[int]:
    """The non-negative axis when ``dims`` names exactly one axis of ``x`` as a literal int."""
    s = shape_of(x)
    d = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if s is None or len(d) != 1 or type(d[0]) is not int or not -len(s) <= d[0] < len(s):
        return None
    return d[0] % len(s)


def _call(n: Any, *names: str) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and op_name(n) in names \
        and bool(n.args) and isinstance(n.args[0], fx.Node)


def _mean_axis(n: Any) -> Optional[tuple[fx.Node, int]]:
    """(X, axis) for ``X.mean(axis, keepdim=True)`` over one literal axis, no dtype."""
    if not _call(n, "mean") or len(n.args) > 3 or set(n.kwargs) - {"dim", "keepdim"} \
            or _arg(n, 2, "keepdim", False) is not True:
        return None
    ax = _one_axis(n.args[0], _arg(n, 1, "dim"))
    return (n.args[0], ax) if ax is not None else None


def _biased_var_axis(n: Any) -> Optional[tuple[fx.Node, int]]:
    """(X, axis) for a BIASED variance over one literal axis with keepdim (``var`` or ``var_mean``):
    ``unbiased=False`` or ``correction=0`` stated explicitly (torch's default is the unbiased one)."""
    if not _call(n, "var", "var_mean") or set(n.kwargs) - {"dim", "unbiased", "correction", "keepdim"}:
        return None
    rest = list(n.args[2:])
    if getattr(n.target, "_overloadname", None) == "correction" and rest:
        return None  # aten's correction overloads take everything after dim by keyword
    unbiased = rest.pop(0) if rest else n.kwargs.get("unbiased")
    keepdim = rest.pop(0) if rest else n.kwargs.get("keepdim", False)
    correction = n.kwargs.get("correction")
    if rest or keepdim is not True or (unbiased is not None and type(unbiased) is not bool):
        return None
    biased = (unbiased is False and correction is None) or (
        unbiased is None and type(correction) in (int, float) and correction == 0)
    ax = _one_axis(n.args[0], _arg(n, 1, "dim"))
    return (n.args[0], ax) if biased and ax is not None else None


def _centred(n: Any) -> Optional[tuple[fx.Node, fx.Node]]:
    """(X, U) for ``X - U`` (no alpha)."""
    if not _call(n, "sub") or len(n.args) != 2 or n.kwargs or not isinstance(n.args[1], fx.Node):
        return None
    return n.args[0], n.args[1]


def _item(n: Any, i: int) -> Optional[fx.Node]:
    """T when ``n`` is ``T[i]`` (a tuple output's element)."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2 \
            and n.args[1] == i and isinstance(n.args[0], fx.Node):
        return n.args[0]
    return None


def _layer_norm_match(node: fx.Node):
    """(X, axis, eps, pattern nodes) for ``(X - U) / sqrt(V + eps)`` or ``(X - U) * rsqrt(V + eps)`` with
    U the mean of X over one axis and V its biased variance over the same axis (both keepdim):
    ``V = ((X - U) ** 2).mean(axis)``, ``X.var(axis, unbiased=False)`` / ``correction=0``, or
    ``var_mean``'s pair; ``eps`` a Python number; every intermediate read only inside the pattern."""
    name = op_name(node)
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        return None
    pairs = [(node.args[0], node.args[1], "sqrt")] if name in ("div", "truediv") else \
        [(node.args[0], node.args[1], "rsqrt"), (node.args[1], node.args[0], "rsqrt")] if name == "mul" else []
    for c, r, want in pairs:
        if not (_only_user(r) and _call(r, want) and len(r.args) == 1 and not r.kwargs):
            continue
        add = r.args[0]
        if not (_only_user(add) and add.op in ("call_function", "call_method") and op_name(add) == "add"
                and len(add.args) == 2 and not add.kwargs):
            continue
        v, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
        if not (type(eps) in (int, float) and eps >= 0 and isinstance(v, fx.Node) and _only_user(v)):
            continue
        xu = _centred(c)
        if xu is None:
            continue
        x, u = xu
        nodes = [node, r, add, v, c]
        vm = _item(v, 0)
        if vm is not None:  # var_mean: (var, mean) of one call
            found = _biased_var_axis(vm)
            if found is None or found[0] is not x or _item(u, 1) is not vm:
                continue
            axis, nodes = found[1], nodes + [u, vm]
        else:
            mu = _mean_axis(u)
            if mu is None or mu[0] is not x:
                continue
            axis = mu[1]
            var = _biased_var_axis(v)
            if var is not None:
                if var[0] is not x or var[1] != axis:
                    continue
            else:
                m = _mean_axis(v)
                sq = _squared(m[0]) if m is not None and _only_user(m[0]) else None
                c2 = _centred(sq)
                if m is None or m[1] != axis or c2 is None or c2 != (x, u):
                    continue
                nodes += [m[0]] + ([sq] if sq is not c else [])
            nodes.append(u)
        inner = set(nodes)
        if not all(set(k.users) <= inner | {None} for k in nodes if k is not node):
            continue  # an intermediate read elsewhere: the pattern is not a closed LayerNorm
        return x, axis, float(eps), nodes
    return None


def layer_norm_from_pattern(gm: fx.GraphModule, example_inputs: tuple = ()) -> int:
    """Rewrite every written-out LayerNorm (see :func:`_layer_norm_match`) to ``F.layer_norm(x, (C,), None,
    None, eps)``, over the last axis directly and over another axis between two permutes (ConvNeXt's
    channels-first form); returns how many. The same formula (float rounding only may differ). Only
    where the normalized axis keeps its traced size on every derived input shape the graph accepts
    (``F.layer_norm`` takes the width as a literal); the weight and bias products after it are left as
    ordinary per-channel ops. Needs ``tensor_meta``."""
    matches = [(node,) + m for node in list(gm.graph.nodes) for m in [_layer_norm_match(node)] if m is not None]
    if not matches:
        return 0
    seen = _shapes_seen(gm, {m[1] for m in matches}, example_inputs)
    count, permuted = 0, False
    replaced: dict[fx.Node, fx.Node] = {}  # a match's output that an earlier rewrite replaced -> its new node
    for node, x, axis, eps, nodes in matches:
        s = shape_of(x)
        if any(len(sh) != len(s) or sh[axis] != s[axis] for sh in seen[x]) or shape_of(node) != s:
            continue
        x = replaced.get(x, x)  # (one LayerNorm feeding the next: read the first one's new node)
        with gm.graph.inserting_before(node):
            if axis == len(s) - 1:
                new = gm.graph.call_function(F.layer_norm, (x, (s[axis],), None, None, eps))
            else:
                perm = [d for d in range(len(s)) if d != axis] + [axis]
                back = sorted(range(len(s)), key=perm.__getitem__)
                moved = gm.graph.call_function(torch.permute, (x, perm))
                normed = gm.graph.call_function(F.layer_norm, (moved, (s[axis],), None, None, eps))
                new = gm.graph.call_function(torch.permute, (normed, back))
                permuted = True
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        replaced[node] = new
        left = list(nodes)
        while any(not n.users for n in left):  # readers first: a node frees its inputs once erased
            for dead in [n for n in left if not n.users]:
                gm.graph.erase_node(dead)
                left.remove(dead)
        count += 1
    if count:
        gm.recompile()
        if permuted:  # the permuted intermediates need their shapes
            from .trace import propagate_shapes
            propagate_shapes(gm, example_inputs)
    return count
