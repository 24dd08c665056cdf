"""Apply a removal plan: build a NEW graph and a new root module, never touching the input.

The rewrite walks the old graph in order with an old-node -> new-node map (``env``).
A node whose rule has a ``rewrite`` emits its replacement (sliced weights, folded
constants, rewritten sizes); every other node is copied as is, which is exact because
its rule only admitted it when its function does not depend on the removed channels'
count. The new module never shares storage with the user's model: the old module's own
parameters and buffers are already private (the front end traced a private copy; a later round
reads an earlier round's result), so an unchanged one is carried over as is and a sliced one is
a new tensor; only a tensor the traced code captured from outside (a global constant) is cloned.
"""
from __future__ import annotations

import copy
from itertools import chain
from typing import Any, Optional

import numpy as np
import torch
from torch import fx, nn

from .analysis import Plan
from .normalize import OUT_OF_PLACE_OPERATORS
from .rules import lookup
from .rules.registry import _functional_overload
from .trace import fetch_attr, lazy_graph_module
from .values import META_KEY, ChanInfo

__all__ = ["Rewriter", "rewrite", "RuleFailure"]


class RuleFailure(Exception):
    """A rule's rewrite raised: ``node`` names the node; minimize redoes the round with it frozen."""

    def __init__(self, node: str, message: str):
        super().__init__(message)
        self.node = node

_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "sqr_fx.varying_axis1")


class Rewriter:
    """Helpers the rules' ``rewrite`` functions use to emit the new graph."""

    def __init__(self, gm: fx.GraphModule, plan: Plan):
        self.old, self.plan = gm, plan
        self.graph = fx.Graph()
        self.graph._codegen = copy.deepcopy(gm.graph._codegen)  # export's pytree in/out handling
        self.env: dict[fx.Node, Any] = {}
        self.raw_inputs: dict[fx.Node, fx.Node] = {}  # graph input -> its new placeholder (before any gather)
        self.attrs: dict[str, tuple[torch.Tensor, bool]] = {}
        self.modules: dict[str, nn.Module] = {}
        self._n = 0
        self._aliases: dict[int, str] = {}
        self._sliced: dict[int, list[str]] = {}  # id(original tensor) -> names emitted for it
        self._foreign: Optional[set[int]] = None  # storages the old module reads but does not own
        self._bound: dict[fx.Node, tuple[Any, str]] = {}  # get_attr made by attr() -> (its value, the node rewritten)
        self._current = ""

    # ---- reading the old graph ---------------------------------------------------------------
    @staticmethod
    def info(a: Any) -> Optional[ChanInfo]:
        return a.meta.get(META_KEY) if isinstance(a, fx.Node) else None

    def tensor(self, a: Any) -> Optional[torch.Tensor]:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            t = fetch_attr(self.old, a.target)
            return t.detach() if isinstance(t, torch.Tensor) else t
        return None

    def keep(self, info: Optional[ChanInfo], n: Optional[int] = None) -> np.ndarray:
        """Kept positions of ``info`` (all of ``n`` when untracked)."""
        if info is None:
            return np.ones(n if n is not None else 0, bool)
        return self.plan.keep(info)

    # ---- emitting the new graph --------------------------------------------------------------
    def arg(self, a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: self.env[n])

    def copy(self, node: fx.Node, env: Optional[dict[fx.Node, Any]] = None) -> fx.Node:
        """``node`` unchanged, its arguments mapped to the new graph (through ``env`` first)."""
        if node.op == "call_module" and node.target not in self.modules:  # private already, like tensors
            self.modules[node.target] = self.old.get_submodule(node.target)
        return self.graph.node_copy(node, lambda n: (env or {}).get(n, self.env[n]))

    def emit_like(self, node: fx.Node, args, new: dict[str, Any]) -> fx.Node:
        """Re-emit ``node``'s call with some arguments replaced (others mapped to the new graph)."""
        a, kw = args.rebuild({k: v for k, v in new.items()})
        a = tuple(v if k in new else self.arg(v) for k, v in zip(args.names, a)) + tuple(
            self.arg(v) for v in a[len(args.names):]
        )
        kw = {k: (v if k in new else self.arg(v)) for k, v in kw.items()}
        return self.graph.create_node(node.op, node.target, a, kw, name=node.name)

    def attr(self, target: str, value: Any) -> fx.Node:
        """A ``get_attr`` on a clone of ``value`` (a Parameter when the original target was one)."""
        orig = None
        try:
            orig = fetch_attr(self.old, target)
        except AttributeError:
            pass
        is_param = isinstance(orig, nn.Parameter) or (orig is None and isinstance(value, torch.Tensor)
                                                      and target.endswith(("weight", "bias")))
        if isinstance(value, torch.Tensor):
            value = value.detach()
            value = (value.clone() if self._captured(value) else value).contiguous()
            if isinstance(orig, torch.Tensor):  # a tied tensor sliced alike for every name stays ONE tensor
                names = self._sliced.setdefault(id(orig), [])
                for other in names:
                    if other != target and _same_value(self.attrs[other][0], value):
                        self.attrs[target] = self.attrs[other]
                        return self.graph.get_attr(target)
                if target not in names:
                    names.append(target)
        self.attrs[target] = (value, is_param)
        node = self.graph.get_attr(target)
        self._bound[node] = (value, self._current)
        return node

    def _captured(self, t: torch.Tensor) -> bool:
        """``t`` shares storage with a tensor the old graph reads that is no parameter or buffer of the
        old module (a constant the traced code captured from outside): cloned, never shared."""
        if self._foreign is None:
            def ptr(x: Any) -> Optional[int]:
                return x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) and x.numel() else None

            owned = {ptr(x) for x in chain(self.old.parameters(), self.old.buffers())}
            read = {ptr(fetch_attr(self.old, n.target)) for n in self.old.graph.nodes if n.op == "get_attr"}
            self._foreign = read - owned - {None}
        return bool(t.numel()) and t.untyped_storage().data_ptr() in self._foreign

    def alias(self, node: fx.Node) -> fx.Node:
        """An unchanged ``get_attr``: a tensor read under several names (tied) stays ONE tensor."""
        raw = fetch_attr(self.old, node.target)
        first = self._aliases.setdefault(id(raw), node.target)
        if first != node.target:
            self.attrs[node.target] = self.attrs[first]
            return self.graph.get_attr(node.target)
        return self.attr(node.target, raw.detach() if isinstance(raw, torch.Tensor) else raw)

    def buffer(self, hint: str, value: torch.Tensor) -> fx.Node:
        """A new constant tensor (folded kernel, gather index) stored as a buffer."""
        while True:  # never reuse a name the old module (an earlier round's buffer) already holds
            self._n += 1
            name = f"sqr_fx_{hint}_{self._n}".replace(".", "_")
            if name not in self.attrs and not hasattr(self.old, name):
                break
        self.attrs[name] = (value.detach().clone().to(self._device()), False)
        return self.graph.get_attr(name)

    def _device(self) -> torch.device:
        """Where the model's tensors live: new buffers (gather indices, kernels) go there too."""
        t = next(iter(self.old.parameters()), None)
        if t is None:
            t = next(iter(self.old.buffers()), None)
        return t.device if t is not None else torch.device("cpu")

    def index_select(self, x: fx.Node, dim: int, idx: np.ndarray, hint: str) -> fx.Node:
        index = self.buffer(hint, torch.as_tensor(np.asarray(idx), dtype=torch.long))
        return self.graph.call_function(torch.index_select, (x, dim, index))

    # ---- driving --------------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for node in self.old.graph.nodes:
            self._current = node.name
            found = lookup(node, self.old)
            r = found[0] if found else None
            if r is not None and r.rewrite is not None:
                try:
                    new = r.rewrite(node, self, found[1])
                except Exception as e:  # noqa: BLE001 - named, and the node is frozen by the caller
                    raise RuleFailure(node.name, f"rule {r.family!r} failed to rewrite node {node.format_node()}: "
                                                 f"{type(e).__name__}: {e}") from e
            else:
                new = self.copy(node)
            if isinstance(new, fx.Node):
                new.meta = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
            self.env[node] = new
        root = nn.Module()
        own: set[int] = {id(root)}  # modules made here; a carried one is copied before anything is put in it
        for name, mod in self.modules.items():
            _install(root, name, mod, buffer=False, own=own)
        made: dict[int, Any] = {}
        for name, (value, is_param) in self.attrs.items():
            if id(value) not in made:  # aliases (tied tensors) share one object
                made[id(value)] = nn.Parameter(value, requires_grad=value.is_floating_point()) if (
                    is_param and isinstance(value, torch.Tensor)) else value
            _install(root, name, made[id(value)], buffer=not is_param, own=own)
        for n in self.graph.nodes:
            _view_as_reshape(n)
            _out_of_place(n)
        self.graph.owning_module = root  # the purity checks look modules up
        emitted = [n.target for n in self.graph.nodes if n.op in ("get_attr", "call_module")]
        self.graph.eliminate_dead_code(is_impure_node=_impure)
        self._check_names()
        # the new module takes only what the live graph reads, and compiles once, when it is first run
        gm = lazy_graph_module(root, self.graph, class_name=type(self.old).__name__)
        _order_like(gm, emitted)
        return gm.train(self.old.training)

    def _check_names(self) -> None:
        """Every live ``get_attr`` reads the tensor its rule gave it: a name two rules bound to different tensors
        (the later write supersedes the earlier only where the earlier reader is dead) is a rule's failure, not
        a silently shared tensor. Raises :class:`RuleFailure` naming the node whose tensor was lost."""
        for n in self.graph.nodes:
            bound = self._bound.get(n) if n.op == "get_attr" else None
            if bound is None:
                continue
            held = self.attrs[n.target][0]
            if held is not bound[0] and not _same_value(held, bound[0]):
                raise RuleFailure(bound[1], f"the rewrite of node {bound[1]} named a new tensor {n.target!r}, "
                                            "which another rewrite gave another tensor")


def _same_value(a: Any, b: Any) -> bool:
    """Two tensors of one shape and dtype, equal in every element."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
        and a.dtype == b.dtype and torch.equal(a, b)


def _view_as_reshape(n: fx.Node) -> None:
    """A ``view`` of the rewritten graph becomes ``reshape``: the same values wherever the view is valid (the
    graph is functional: nothing writes through the alias), and still valid where a rewritten producer now
    returns other strides (torch picks another attention kernel for the new head widths, and export's
    ``view`` after it assumed the old kernel's layout). A dtype view (a bit cast) stays."""
    if n.op == "call_function" and n.target is torch.ops.aten.view.default:
        n.target = torch.ops.aten.reshape.default
    elif n.op == "call_method" and n.target == "view" and not n.kwargs \
            and not any(isinstance(a, torch.dtype) for a in n.args[1:]):
        n.target = "reshape"


def _out_of_place(n: fx.Node) -> None:
    """An in-place op of the rewritten graph whose only tensor argument is the one it writes into becomes
    its out-of-place form (``h.detach_()`` -> ``h.detach()``, ``h += 1`` -> ``h + 1``, ``F.relu(h,
    inplace=True)`` -> ``inplace=False``, ``aten.relu_`` -> ``aten.relu``). The front end made the write data
    flow (``normalize.resolve_inplace``: every later reader reads the op's output, ``h`` owns its storage, no
    earlier reader made a view of it), so nothing reads ``h`` after the op: the two forms compute the same
    values, of the same dtype (a Python scalar never promotes a tensor; a promotion an in-place op refuses,
    the original refused). A rewritten producer may now return a view or an expanded constant, on which the
    in-place form fails (``detach_`` of a view: fuzz run 12). With another tensor argument (its dtype may
    promote) the op stays in place."""
    if n.op not in ("call_method", "call_function") or any(
            isinstance(a, fx.Node) for a in list(n.args[1:]) + list(n.kwargs.values())):
        return
    if n.op == "call_method":
        name = n.target
        if name.endswith("_") and not name.startswith("_") and name != "resize_" \
                and callable(getattr(torch.Tensor, name[:-1], None)):  # (``requires_grad_``: a property)
            n.target = name[:-1]
    elif n.target in OUT_OF_PLACE_OPERATORS:  # (``@=`` reads a second tensor: never here)
        n.target = OUT_OF_PLACE_OPERATORS[n.target]
    elif isinstance(n.target, torch._ops.OpOverload):
        f = _functional_overload(n.target)
        if f is not None:
            n.target = f
    elif n.kwargs.get("inplace") is True:
        n.kwargs = {**n.kwargs, "inplace": False}


def _order_like(gm: fx.GraphModule, targets: list[str]) -> None:
    """Register ``gm``'s submodules, parameters and buffers in the order ``targets`` first name them (the
    emitted graph before dead-code elimination), so ``state_dict()`` lists them as the graph did."""
    rank: dict[str, int] = {}
    for t in targets:
        atoms = t.split(".")
        for i in range(1, len(atoms) + 1):
            rank.setdefault(".".join(atoms[:i]), len(rank))
    for name, mod in list(gm.named_modules()):
        prefix = f"{name}." if name else ""
        for table in (mod._modules, mod._parameters, mod._buffers):
            items = sorted(table.items(), key=lambda kv: rank.get(prefix + kv[0], len(rank)))
            table.clear()
            table.update(items)


try:
    from torch.fx._symbolic_trace import _assert_is_none
except ImportError:  # pragma: no cover - older torch
    _assert_is_none = None


def _impure(node: fx.Node) -> bool:
    """Never delete a node that writes into a tensor (an in-place op whose result nobody reads
    still mutates its input), nor anything torch itself calls impure, nor a guard of an argument the
    trace fixed (``_assert_is_none``: without it another value would be silently ignored)."""
    from .normalize import is_inplace

    return node.is_impure() or node.target is _assert_is_none or is_inplace(node, node.graph.owning_module)


def _install(root: nn.Module, qualname: str, obj: Any, buffer: bool, own: set[int]) -> None:
    """Put ``obj`` at ``qualname`` under ``root``. A module on the way that ``root`` does not own (one
    carried over from the old graph for a ``call_module``) is replaced by a shallow copy first, so
    installing a tensor never writes into the old module (minimize may go back to the old graph)."""
    *path, leaf = qualname.split(".")
    mod = root
    for p in path:
        child = getattr(mod, p, None)
        if not isinstance(child, nn.Module) or id(child) not in own:
            if isinstance(child, nn.Module):  # carried over: a shallow copy with its own tables
                child = copy.copy(child)
                child._parameters, child._buffers, child._modules = (
                    dict(child._parameters), dict(child._buffers), dict(child._modules))
            else:
                child = nn.Module()
            mod.add_module(p, child)
            own.add(id(child))
        mod = child
    if isinstance(obj, nn.Module):
        mod.add_module(leaf, obj)
    elif isinstance(obj, nn.Parameter):
        mod.register_parameter(leaf, obj)
    elif buffer and isinstance(obj, torch.Tensor):
        mod.register_buffer(leaf, obj)
    else:
        setattr(mod, leaf, obj)


def rewrite(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """A new GraphModule computing ``gm``'s function without the channels ``plan`` removes."""
    return Rewriter(gm, plan).run()
