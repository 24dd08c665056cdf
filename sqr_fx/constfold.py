"""Weights computed in forward become plain tensors: constant folding of parameter-only expressions.

``F.conv2d(x, self.w * self.mask)``, timm's weight-standardized ``StdConv2d``, ``F.linear(x, W.t())``,
Gemma's ``(1 + weight) * x``: the weighted op reads a tensor that depends on parameters and buffers
only, never on the inputs. In eval mode such an expression has the same value at every call, so
evaluating it once and reading the result as a ``get_attr`` tensor is exact; the rules then see an
ordinary weight. Folded: call nodes (no modules) whose inputs are all ``get_attr`` tensors or other
folded nodes, that write into nothing and draw no random numbers. A region is folded only when it does
not make the model grow: the folded tensors may not hold more floats than the parameters the region
alone reads (a RoPE table built from a small ``inv_freq`` stays computed). Regions (folded nodes joined
through the tensors they read) are decided one by one: a growing one does not stop the others.

torch.export checks the dtype of a stored tensor before a cast (``_assert_tensor_metadata(weight,
dtype=float64)`` before Gemma's ``weight.float()``). Such a check of a ``get_attr`` tensor reads no value
and holds by construction for the tensor the module stores: it is dropped first, so it does not count as
a reader outside the region (which would keep the parameter stored next to its folded form).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .normalize import is_inplace
from .trace import fetch_attr

__all__ = ["fold_constants"]

_RANDOM = ("rand", "bernoulli", "multinomial", "normal", "dropout", "rrelu", "uniform", "poisson", "exponential",
           "cauchy", "geometric", "empty", "seed")


def _deterministic(node: fx.Node, root: nn.Module) -> bool:
    if node.op not in ("call_function", "call_method") or is_inplace(node, root):
        return False
    name = (node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))).lower()
    return not any(r in name for r in _RANDOM)


def _source(root: fx.Node, values: dict) -> str:
    """A readable name for a folded tensor: the largest stored tensor it is computed from
    (``stages.0.conv1.weight`` -> ``stages_0_conv1_weight``; the report's layer names follow it)."""
    seen, todo, best = set(), [root], None
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            if best is None or values[n].numel() > values[best].numel():
                best = n
        else:
            todo.extend(a for a in n.all_input_nodes if a in values)
    return best.target.replace(".", "_") if best is not None else root.name


def _floats(tensors) -> int:
    """Floating-point values, as ``count_stored_floats`` counts the deployable size (an integer index
    buffer is not counted: a gathered table replacing a table + index may not hold more floats)."""
    return sum(t.numel() for t in tensors if t.is_floating_point())


def fold_constants(gm: fx.GraphModule) -> int:
    """Fold parameter-only expressions into new ``get_attr`` tensors (see module docstring); returns
    how many nodes were replaced."""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default and node.args \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    values: dict[fx.Node, Any] = {}
    param: dict[fx.Node, bool] = {}  # the value derives from a Parameter: stored as one (trainable)
    stored: dict[fx.Node, int] = {}  # get_attr -> identity of the stored tensor (one tensor, several names)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = fetch_attr(gm, node.target)
            if isinstance(t, torch.Tensor):
                values[node], param[node] = t.detach(), isinstance(t, nn.Parameter)
                stored[node] = id(t)
            continue
        if not _deterministic(node, gm) or not node.all_input_nodes:
            continue
        if not all(a in values for a in node.all_input_nodes):
            continue
        args = fx.node.map_arg(node.args, lambda a: values[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a])
        try:
            with torch.no_grad():
                fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
                out = fn(*args[1:], **kwargs) if node.op == "call_method" else fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not evaluable here: it stays computed
            continue
        if isinstance(out, torch.Tensor):
            values[node], param[node] = out, any(param[a] for a in node.all_input_nodes)
    folded = [n for n in values if n.op != "get_attr"]
    if not folded:
        return 0
    # regions: folded nodes joined through the tensors they read (one stored tensor under several names
    # is one tensor); each region is folded on its own, when it does not make the model grow
    parent: dict[Any, Any] = {}

    def find(a):
        while parent.setdefault(a, a) is not a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for n in folded:
        for a in n.all_input_nodes:
            parent[find(a)] = find(n)
    for a, key in stored.items():
        parent[find(a)] = find(("stored", key))
    regions: dict[Any, list[fx.Node]] = {}
    for n in folded:
        regions.setdefault(find(n), []).append(n)
    readers: dict[int, list[fx.Node]] = {}
    for a, key in stored.items():
        readers.setdefault(key, []).append(a)
    roots = []
    for nodes in regions.values():
        region = set(nodes)
        tops = [n for n in nodes if any(u not in values or u.op == "get_attr" for u in n.users)]
        # a stored tensor is freed only when every name it is read under is read inside the region (ties)
        freed = [names[0] for names in readers.values()
                 if all(u in region for a in names for u in a.users) and any(a.users for a in names)]
        if _floats(values[n] for n in tops) <= _floats(values[a] for a in freed):
            roots += tops
    if not roots:
        return 0
    roots.sort(key={n: i for i, n in enumerate(gm.graph.nodes)}.__getitem__)
    for i, n in enumerate(roots):
        name = f"sqr_fx_folded_{i}_{_source(n, values)}"
        while hasattr(gm, name):
            name += "_"
        value = values[n].clone().contiguous()
        if param[n] and value.is_floating_point():
            gm.register_parameter(name, nn.Parameter(value))
        else:
            gm.register_buffer(name, value)
        with gm.graph.inserting_before(n):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(n.meta)
        n.replace_all_uses_with(attr)
    erased = set()
    for n in reversed(list(gm.graph.nodes)):  # the folded region and the parameters only it read
        if n in values and not n.users:
            if n.op == "get_attr":
                erased.add(n.target)
            gm.graph.erase_node(n)
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in erased - live:  # a parameter now read by nobody is not stored either
        *path, leaf = target.split(".")
        owner = gm.get_submodule(".".join(path)) if path else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
    gm.recompile()
    return len(roots)
