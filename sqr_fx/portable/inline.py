"""Step 3 of :func:`sqr_fx.portable.finish`: every sqr_fx helper call becomes its ``*_ops`` body,
traced into the graph with the call's constant arguments."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .common import _container, _get_attrs, _original_params, _split, fetch, sqr_fx_references
from .modules import _CONV_DIMS, _rank
from .ops import (expert_linear_ops, full_width_rms_norm_ops, group_norm_ops, layer_norm_ops, ones_map_ops,
                  rms_norm_ops, rotary_interleaved_ops, rotary_ops, self_attention_ops, upcast_rms_norm_ops,
                  window_attention_ops)


def _trace_into(gm: fx.GraphModule, node: fx.Node, fn: Callable[..., Any], args: tuple) -> bool:
    """Replace ``node`` by ``fn`` traced on its arguments (Nodes become Proxies) right before it; on any
    failure the graph is left as it was and False returned."""
    g = gm.graph
    tracer = fx.proxy.GraphAppendingTracer(g)
    before = set(g.nodes)
    wrap = lambda a: fx.Proxy(a, tracer) if isinstance(a, fx.Node) else a  # noqa: E731
    try:
        with g.inserting_before(node):
            out = fn(*[wrap(a) for a in args])
        if not isinstance(out, fx.Proxy):
            raise TypeError("the traced body returned no graph value")
    except Exception:  # noqa: BLE001 - left as the helper call: exact, only not portable
        for n in reversed([n for n in g.nodes if n not in before]):
            g.erase_node(n)
        return False
    out.node.meta = {k: v for k, v in node.meta.items() if k in ("tensor_meta", "nn_module_stack", "stack_trace")}
    node.replace_all_uses_with(out.node)
    g.erase_node(node)
    return True




class _Stack:
    """q, k, v projections of one attention call as ONE weight (and one bias) again, the original's
    ``in_proj_weight`` / ``qkv.weight``: registered first, committed (the three old tensors deleted)
    only when the call was inlined, undone otherwise."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, ws: list, bs: list, names: tuple[str, str, str],
                 trainable: tuple[str, ...], originals: set[str]):
        self.gm, self.node, self.ok = gm, node, False
        self.olds = [t for t in ws + bs if t is not None]
        attrs = _get_attrs(gm)
        if not all(isinstance(t, fx.Node) and t.op == "get_attr" and set(t.users) == {node}
                   and len(attrs[t.target]) == 1 for t in self.olds):
            return
        stem = _split(ws[0].target)[0]
        if not stem or any(_split(w.target) != (stem, names[2].format(p)) for w, p in zip(ws, "qkv")) \
                or any(_split(t.target)[0] != stem for t in self.olds):
            return
        cont = _container(gm, stem)
        # a bare container, or (nothing removed: the traced graph itself) the MultiheadAttention module the
        # front end took in_proj_weight / in_proj_bias from
        if type(cont) not in (nn.Module, nn.MultiheadAttention) or any(hasattr(cont, n) for n in names[:2]):
            return
        W = [fetch(gm, w.target) for w in ws]
        B = [fetch(gm, b.target) if b is not None else None for b in bs]
        if not all(isinstance(w, nn.Parameter) for w in W) or len({(w.dtype, w.device, w.shape[1:]) for w in W}) != 1:
            return
        self.stem, self.cont, self.names = stem, cont, names
        self.sizes = [int(w.shape[0]) for w in W]
        cont.register_parameter(names[0], nn.Parameter(torch.cat([w.detach() for w in W]),
                                                       requires_grad=W[0].requires_grad))
        self.bias = False
        if any(b is not None for b in B):
            bias = torch.cat([b.detach() if b is not None else w.detach().new_zeros(w.shape[0])
                              for w, b in zip(W, B)])
            if any(f"{stem}.{n}" in originals for n in trainable) or (
                    not originals and all(isinstance(b, nn.Parameter) for b in B)):
                cont.register_parameter(names[1], nn.Parameter(bias))
                self.bias = True
            elif bool(bias.any()):  # a bias the original did not have (folded constants): a buffer
                cont.register_buffer(names[1], bias)
                self.bias = True
            # else: the zero biases the trace made up for an attention without bias go
        g = gm.graph
        self.new: list[fx.Node] = []
        with g.inserting_before(node):
            wn = g.get_attr(f"{stem}.{names[0]}")
            bn = g.get_attr(f"{stem}.{names[1]}") if self.bias else None
            self.new += [n for n in (wn, bn) if n is not None]
            lo, self.weights, self.biases = 0, [], []
            for n in self.sizes:
                self.weights.append(g.call_method("narrow", (wn, 0, lo, n)))
                self.biases.append(g.call_method("narrow", (bn, 0, lo, n)) if bn is not None else None)
                lo += n
            self.new += self.weights + [b for b in self.biases if b is not None]
        self.ok = True

    def done(self, inlined: bool) -> None:
        if not self.ok:
            return
        g = self.gm.graph
        if inlined:
            for t in self.olds:
                g.erase_node(t)
                delattr(self.cont, _split(t.target)[1])
            return
        for n in reversed(self.new):
            g.erase_node(n)
        for name in self.names[:2]:
            if hasattr(self.cont, name):
                delattr(self.cont, name)


def inline_helpers(gm: fx.GraphModule, model: Optional[nn.Module] = None, recompile: bool = True) -> list[str]:
    """Replace every sqr_fx helper call by torch ops (module docstring, 3.); returns what still needs sqr_fx
    (nothing when every call matched its pattern). ``recompile=False``: the graph only (:func:`finish`
    recompiles once)."""
    from ..attention import padded_sdpa, padded_sdpa_ops, rotary, rotary_interleaved, self_attention
    from ..layers import (compensated_group_norm, compensated_layer_norm, compensated_rms_norm, full_width_rms_norm,
                          upcast_rms_norm)
    from ..moe import expert_linear
    from ..rules.weighted import ones_map
    from ..window_attention import window_attention

    originals = _original_params(model)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is padded_sdpa:  # (called with keywords: bound by name)
            try:
                bound = inspect.signature(padded_sdpa).bind(*node.args, **node.kwargs)
            except TypeError:
                continue
            bound.apply_defaults()
            _trace_into(gm, node, padded_sdpa_ops, tuple(bound.args))
            continue
        if node.op != "call_function" or node.kwargs:
            continue
        t, a = node.target, tuple(node.args)
        if t is ones_map and len(a) == 1:
            spatial = _rank(a[0])
            if spatial is None:
                spatial = _conv_spatial(gm, list(node.users))
            else:
                spatial -= 2
            if spatial is not None and spatial >= 0:
                _trace_into(gm, node, ones_map_ops, (a[0], spatial))
        elif t is rotary and len(a) == 4:
            _trace_into(gm, node, rotary_ops, a)
        elif t is rotary_interleaved and len(a) == 3:
            _trace_into(gm, node, rotary_interleaved_ops, a)
        elif t is compensated_layer_norm and len(a) in (6, 7):
            _trace_into(gm, node, layer_norm_ops, a + (1e-5,) * (7 - len(a)))
        elif t is compensated_rms_norm and len(a) in (4, 5):
            _trace_into(gm, node, rms_norm_ops, a + (None,) * (5 - len(a)))
        elif t is upcast_rms_norm and len(a) == 3:
            _trace_into(gm, node, upcast_rms_norm_ops, a)
        elif t is full_width_rms_norm and len(a) in (4, 5) and isinstance(a[2], fx.Node) and a[2].op == "get_attr":
            a = a + (None,) * (5 - len(a))
            _trace_into(gm, node, full_width_rms_norm_ops, a + (int(fetch(gm, a[2].target).shape[0]),))
        elif t is expert_linear and len(a) == 3:
            _trace_into(gm, node, expert_linear_ops, a)
        elif t is compensated_group_norm and len(a) in (8, 9):
            a = a + (1e-5,) * (9 - len(a))
            count = a[5]
            if isinstance(count, fx.Node) and count.op == "get_attr":
                groups = int(fetch(gm, count.target).shape[0])
                _trace_into(gm, node, group_norm_ops, a[:5] + (groups,) + a[5:])
        elif t is self_attention and len(a) in (11, 12, 13, 14):
            a = a + (True, 0, 0)[len(a) - 11:]
            rank = _rank(a[0])
            if rank not in (2, 3):
                continue
            stack = _Stack(gm, node, [a[1], a[3], a[5]], [a[2], a[4], a[6]],
                           ("in_proj_weight", "in_proj_bias", "sqr_fx_{}_weight"), ("in_proj_bias", "sqr_fx_q_bias"),
                           originals)
            qkv = _interleave(stack.weights, stack.biases) if stack.ok else a[1:7]
            stack.done(_trace_into(gm, node, self_attention_ops, (a[0], *qkv, *a[7:12], rank, *a[12:])))
        elif t is window_attention and len(a) in (14, 15):
            a = a + (None,) * (15 - len(a))
            window, shift = list(a[10]), list(a[12])
            if len(window) != 2 or len(shift) != 2 or not all(0 <= s < w for s, w in zip(shift, window)):
                continue
            stack = _Stack(gm, node, [a[1], a[3], a[5]], [a[2], a[4], a[6]], ("weight", "bias", "{}_weight"),
                           ("bias", "q_bias"), originals)
            qkv = _interleave(stack.weights, stack.biases) if stack.ok else a[1:7]
            stack.done(_trace_into(gm, node, window_attention_ops,
                                   (a[0], *qkv, a[7], a[8], a[9], window, a[11], shift, a[13], a[14])))
    if recompile:
        gm.recompile()
    return sqr_fx_references(gm)


def _interleave(ws: list, bs: list) -> tuple:
    return tuple(x for pair in zip(ws, bs) for x in pair)


def _conv_spatial(gm: fx.GraphModule, users: list[fx.Node]) -> Optional[int]:
    """Spatial rank of the convs reading a ones map (they fix its rank), None when they do not agree."""
    dims = set()
    for u in users:
        if u.op == "call_function" and u.target in _CONV_DIMS:
            dims.add(_CONV_DIMS[u.target])
        else:
            return None
    return dims.pop() if len(dims) == 1 else None
