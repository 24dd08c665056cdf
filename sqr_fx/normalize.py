"""The functional front end: one call form per node, in-place ops resolved, hooks respected.

Rules must never see two spellings of one call, nor a graph whose data flow differs from what
torch runs. Three steps on a freshly traced ``GraphModule``, before any analysis:

* :func:`normalize_args` binds every call that has a rule to its op's schema (``inspect``
  signature, the TorchScript schema of a torch builtin, an ``OpOverload``'s schema) and rewrites it
  in ONE canonical layout: every positional-or-keyword parameter positional, in schema order;
  keyword-only ones as keywords. ``torch.add(input=a, other=b)`` becomes ``torch.add(a, b)`` and
  ``x.transpose(dim0=1, dim1=2)`` becomes ``x.transpose(1, 2)``, so a rule's argument names
  (``Args``) always match. A call that binds to no schema, or to several with different layouts,
  is marked :data:`UNNORMALIZED`: ``rules.lookup`` gives it no rule, so it is frozen, and
  ``strict=True`` names it.
* :func:`resolve_inplace` makes in-place ops functional for the analysis: ``h.relu_()`` returns
  ``h``'s storage, so every LATER reader of ``h`` is re-pointed to the in-place node (it reads
  the mutated value, as torch does). That is exact only when ``h`` owns its storage (no other
  tensor of the graph aliases it): ``h`` must come from an op that allocates its output, and no
  earlier reader may have made a view of it. An op that may return its input itself (``Identity``,
  eval dropout, ``contiguous``: timm's ``BatchNormAct2d`` is ``bn -> drop -> act(inplace)``) owns that
  storage too when it is the input's ONLY reader: nothing else can see the write. Anything else (a view, a graph input, a parameter,
  an unknown op) raises :class:`NotFunctional`, and the front end falls back to ``torch.export``,
  whose graphs are functional by construction.
* :func:`has_hooks`: a module with forward hooks or pre-hooks computes more than its type says,
  so it is neither functionalized nor given its type's rule (it stays a frozen ``call_module``).
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.fx.operator_schemas import get_signature_for_torch_op

from .rules.registry import UNNORMALIZED, has_hooks

__all__ = ["normalize_args", "resolve_inplace", "linear_from_matmul", "has_hooks", "is_inplace", "NotFunctional",
           "UNNORMALIZED"]



class NotFunctional(Exception):
    """An in-place op whose mutation the symbolic trace cannot express as data flow (names the node)."""


# ---- argument normalization -------------------------------------------------------------------
def _python_signature(fn: Any) -> Optional[inspect.Signature]:
    from torch._jit_internal import boolean_dispatched

    if fn in boolean_dispatched:  # F.max_pool2d(..., return_indices=False) dispatches to _max_pool2d
        fn = boolean_dispatched[fn]["if_false"]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return None
    return sig


def signatures(node: fx.Node, root: nn.Module) -> list[inspect.Signature]:
    """Candidate schemas of ``node``'s call (first parameter of a method call is the tensor)."""
    if node.op == "call_module":
        sig = _python_signature(root.get_submodule(node.target).forward)
        return [sig] if sig is not None else []
    if node.op == "call_method":
        fn = getattr(torch, node.target, None)
        return list(_function_signatures(fn, method=True)) if fn is not None else []
    if node.op != "call_function":
        return []
    try:
        return list(_function_signatures(node.target))
    except TypeError:  # an unhashable callable: not cached
        return list(_function_signatures.__wrapped__(node.target))


@functools.lru_cache(maxsize=4096)
def _function_signatures(fn: Any, method: bool = False) -> tuple[inspect.Signature, ...]:
    """The schemas of a function (torch's overloads, else its Python signature), computed once per function:
    ``inspect.signature`` on every call was 10 % of the in-place check on a 512-layer chain."""
    try:
        sigs = get_signature_for_torch_op(fn)
    except Exception:  # noqa: BLE001 - not a torch builtin
        sigs = None
    if sigs or method:
        return tuple(sigs or ())
    sig = _python_signature(fn)
    return (sig,) if sig is not None else ()


def _tensor_like(v: Any) -> bool:
    return isinstance(v, (fx.Node, torch.Tensor))


def _plausible(sig: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    """Reject a schema whose Tensor parameters receive Python numbers or vice versa (overloads)."""
    for name, v in bound.arguments.items():
        ann = sig.parameters[name].annotation
        if ann is torch.Tensor and not _tensor_like(v):
            return False
        if ann in (int, float, bool) and isinstance(v, torch.Tensor):
            return False
    return bound.arguments.get("out") is None  # an out= call writes into a tensor: never admitted


def canonical(node: fx.Node, root: nn.Module) -> Optional[tuple[tuple, dict]]:
    """``node``'s (args, kwargs) in the canonical layout, or None when no single layout exists."""
    layouts = []
    for sig in signatures(node, root):
        try:
            bound = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        if not _plausible(sig, bound):
            continue
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        pending: list[Any] = []  # defaults of skipped positional parameters, emitted if a later one is given
        for name, p in sig.parameters.items():
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                if name in bound.arguments:
                    args += pending + [bound.arguments[name]]
                    pending = []
                elif p.default is not p.empty:
                    pending.append(p.default)
                else:
                    break
            elif p.kind == p.KEYWORD_ONLY and name in bound.arguments:
                kwargs[name] = bound.arguments[name]
        layouts.append((tuple(args), kwargs))
    if not layouts:
        return None
    first = layouts[0]
    same = all(len(a) == len(first[0]) and all(x is y or x == y for x, y in zip(a, first[0]))
               and k.keys() == first[1].keys() for a, k in layouts[1:])
    return first if same else None


def normalize_args(gm: fx.GraphModule, recompile: bool = True) -> None:
    """Rewrite every call with keyword arguments to the canonical layout (see module docstring).

    Positional-only calls are already canonical. Only calls that have a rule matter to the
    analysis; the others are frozen whatever their layout. ``recompile=False``: the graph only (a
    caller that recompiles after its next edit)."""
    from .rules import RULES, lookup

    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or not node.kwargs:
            continue
        if lookup(node, gm) is None and not (node.op == "call_function" and node.target in RULES):
            continue
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            continue  # export's aten calls: positional except keyword-only arguments already
        found = canonical(node, gm)
        if found is None:
            node.meta[UNNORMALIZED] = True
        else:
            node.args, node.kwargs = found
    if recompile:
        gm.recompile()


# ---- in-place ops -----------------------------------------------------------------------------
#: Python's augmented assignments and their out-of-place operators
OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                          operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                          operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
                          operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
                          operator.irshift: operator.rshift, operator.imatmul: operator.matmul}
_INPLACE_OPERATORS = set(OUT_OF_PLACE_OPERATORS)


def is_inplace(node: fx.Node, root: nn.Module) -> bool:
    """The op writes into its first argument (``x.relu_()``, ``F.relu(x, inplace=True)``, ``x += 1``
    as ``operator.iadd``, ``nn.ReLU(inplace=True)``)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        if isinstance(mod, nn.modules.dropout._DropoutNd) and not mod.training:
            return False  # eval dropout returns its input untouched, inplace or not
        return bool(getattr(mod, "inplace", False))
    if node.op != "call_function":
        return False
    if "dropout" in str(getattr(node.target, "__name__", "")) and not _arg(node, "training", 2, True):
        return False
    if node.target in _INPLACE_OPERATORS:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    sigs = signatures(node, root)
    if len(sigs) == 1 and "inplace" in sigs[0].parameters:
        names = list(sigs[0].parameters)
        i = names.index("inplace")
        return len(node.args) > i and node.args[i] is True
    return False


def _arg(node: fx.Node, name: str, pos: int, default: Any) -> Any:
    return node.kwargs.get(name, node.args[pos] if len(node.args) > pos else default)


def _allocates(node: fx.Node, root: nn.Module) -> bool:
    """The node's output is a new tensor that aliases no other tensor of the graph."""
    from .rules import lookup

    if node.op not in ("call_function", "call_method", "call_module"):
        return False  # a graph input or a parameter: its storage outlives the call
    found = lookup(node, root)
    if found is None:
        return False
    family = found[0].family
    if family in _FRESH_FAMILIES:
        return True
    if family == "pointwise":
        name = type(root.get_submodule(node.target)).__name__.lower() if node.op == "call_module" \
            else str(getattr(node.target, "__name__", node.target))
        return not any(a in name for a in _MAYBE_ALIAS)
    return False


# Families whose op always returns a freshly allocated tensor.
_FRESH_FAMILIES = {"linear", "conv", "addmm", "batch_norm", "layer_norm", "rms_norm", "group_norm", "binary",
                   "cat", "pool", "reduce", "attention", "sdpa", "embedding", "matmul", "softmax"}
# Channel-wise ops that may return their input itself (``x.float()`` on a float tensor, eval dropout,
# ``contiguous``, ``to``, ``Identity``): never a fresh storage.
_MAYBE_ALIAS = ("dropout", "identity", "contiguous", "detach", "float", "double", "half", "bfloat16", "to",
                "type_as", "alias", "stochastic")


def _sole_alias(node: fx.Node, root: nn.Module, fresh: set[fx.Node]) -> bool:
    """``node`` is a channel-wise op that returns its first argument or a copy of it (``_MAYBE_ALIAS``),
    that argument owns its storage and ``node`` is its only reader: either way ``node``'s storage is
    reachable through ``node`` alone, as a fresh tensor's is."""
    from .rules import lookup

    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or x not in fresh or len(x.users) != 1:
        return False
    found = lookup(node, root)
    return found is not None and found[0].family == "pointwise"


def resolve_inplace(gm: fx.GraphModule) -> None:
    """Re-point every reader after an in-place op to its output (raises :class:`NotFunctional` when
    the mutated tensor may alias another one; see the module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fresh: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if not is_inplace(node, gm):
            if _allocates(node, gm) or _sole_alias(node, gm, fresh):
                fresh.add(node)
            continue
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node):
            raise NotFunctional(f"in-place node {node.format_node()} mutates no tensor argument")
        if x not in fresh:
            raise NotFunctional(
                f"in-place node {node.format_node()} mutates {x.name}, which may alias another tensor "
                "(a view, a graph input, a parameter or the output of an op without a rule)")
        early = [u for u in x.users if u is not node and order[u] < order[node]]
        if any(not _allocates(u, gm) and u.op != "output" for u in early):
            raise NotFunctional(
                f"in-place node {node.format_node()} mutates {x.name}, read before it by an op that may "
                "return a view of it")
        for u in list(x.users):
            if u is not node and order[u] > order[node]:
                u.replace_input_with(x, node)
        fresh.add(node)  # the in-place output is x's storage, fresh as x was
    gm.recompile()


# ---- x @ W.T is a linear layer ------------------------------------------------------------------
_aten = torch.ops.aten
_MATMULS = {operator.matmul, torch.matmul, _aten.matmul.default}


def _transposed_param(node: Any, root: nn.Module) -> Optional[fx.Node]:
    """The 2-D ``get_attr`` W when ``node`` is W transposed (``W.T``, ``W.t()``, ``W.transpose(0, 1)``,
    ``W.permute(1, 0)`` and their aten forms) and nothing else reads that transpose."""
    if not isinstance(node, fx.Node) or len(node.users) != 1 or not node.args:
        return None
    w = node.args[0]
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    from .trace import fetch_attr

    t = fetch_attr(root, w.target)
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    rest = [a for a in node.args[1:]]
    if node.target is getattr:
        ok = rest in (["T"], ["mT"])
    elif name.split(".")[0] in ("t", "numpy_T"):
        ok = not rest
    elif name.split(".")[0] in ("transpose", "swapaxes", "swapdims"):
        ok = len(rest) == 2 and {int(r) % 2 for r in rest} == {0, 1}
    elif name.split(".")[0] == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        ok = [int(d) % 2 for d in dims] == [1, 0]
    else:
        ok = False
    return w if ok and not node.kwargs else None


def linear_from_matmul(gm: fx.GraphModule) -> None:
    """``x @ W.T`` (``torch.matmul(x, W.t())``, Falcon's linear) with a parameter W is
    ``F.linear(x, W)`` (``matmul`` of any-rank x with a 2-D matrix multiplies the last axis): rewritten
    so the linear rule reads it. Exact: the same products, the same storage."""
    changed = False
    for node in list(gm.graph.nodes):
        is_mm = (node.op == "call_function" and node.target in _MATMULS) or (
            node.op == "call_method" and node.target == "matmul")
        if not is_mm or len(node.args) != 2 or node.kwargs:
            continue
        w = _transposed_param(node.args[1], gm)
        if w is None:
            continue
        tnode = node.args[1]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.nn.functional.linear, (node.args[0], w))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(tnode)
        changed = True
    if changed:
        gm.recompile()
