"""The one rules table: op target -> rule, keyed by op meaning across both front ends.

A rule is registered right after it is defined (``@rule(family, targets...)``). One
family (``linear``, ``conv``, ``pointwise`` ...) shares one rule whether the graph
came from ``symbolic_trace`` (``F.relu``, ``nn.ReLU``, method ``"relu"``) or from
``torch.export`` (``aten.relu.default``). ``lookup`` never guesses: an op with no
entry gets ``None`` and the analysis freezes every channel it touches.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

__all__ = ["OpRule", "Args", "RULES", "rule", "method", "lookup", "op_name", "has_hooks", "UNNORMALIZED", "OPAQUE"]


def has_hooks(mod: nn.Module) -> bool:
    """Forward hooks or pre-hooks (with or without kwargs) registered on ``mod`` itself, or for every
    module (:func:`global_hooks`)."""
    return bool(mod._forward_hooks or mod._forward_pre_hooks
                or getattr(mod, "_forward_hooks_with_kwargs", None)
                or getattr(mod, "_forward_pre_hooks_with_kwargs", None)) or global_hooks()


def global_hooks() -> bool:
    """Forward hooks or pre-hooks registered for EVERY module (``nn.modules.module.register_module_forward_hook``
    and ``..._pre_hook``): each module call computes more than its type says, so no module is functionalized,
    given its type's rule, or made back from a functional call (the hook would run twice)."""
    from torch.nn.modules import module as _m

    return bool(getattr(_m, "_global_forward_hooks", None) or getattr(_m, "_global_forward_pre_hooks", None))


@dataclass(frozen=True)
class Method:
    """Key of a ``call_method`` target (``x.relu()`` -> ``Method("relu")``)."""

    name: str


def method(name: str) -> Method:
    return Method(name)


def op_name(node: fx.Node) -> str:
    """``mul`` for operator.mul, torch.mul, aten.mul.Tensor and ``x.mul(...)`` alike."""
    return str(getattr(node.target, "__name__", node.target)).split(".")[0]


@dataclass
class OpRule:
    """``analyze(node, A, args)`` returns the output ChanInfo (or None: untracked) and records
    couplings/reads/freezes on ``A``; ``rewrite(node, R, args)`` emits the new node, or is None
    when copying the node unchanged is exact whatever was removed around it."""

    family: str
    analyze: Callable[..., Any]
    rewrite: Optional[Callable[..., Any]] = None
    names: dict[Any, tuple[str, ...]] = field(default_factory=dict)
    heads: bool = False  # understands head-split infos (ChanInfo.split); others see them frozen


class Args:
    """A node's arguments by name (positional names per target), for reading and rebuilding."""

    def __init__(self, node: fx.Node, names: tuple[str, ...]):
        self.node, self.names = node, names
        self.values: dict[str, Any] = dict(zip(names, node.args))
        self.values.update(node.kwargs)
        self.extra_args = tuple(node.args[len(names):])

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def rebuild(self, mapped: dict[str, Any]) -> tuple[tuple, dict]:
        """Original call layout with some arguments replaced (``mapped`` holds already-new values)."""
        args = [mapped.get(n, v) for n, v in zip(self.names, self.node.args)] + list(self.extra_args)
        kwargs = {k: mapped.get(k, v) for k, v in self.node.kwargs.items()}
        for k, v in mapped.items():
            if k not in self.names[: len(self.node.args)] and k not in kwargs:
                kwargs[k] = v
        return tuple(args), kwargs


RULES: dict[Any, OpRule] = {}


def rule(family: str, *targets: Any, names: tuple[str, ...] = ("input",), rewrite=None, per_target=None,
         heads: bool = False):
    """Register ``fn`` as the analysis rule of ``targets``; ``per_target`` overrides argument names;
    ``heads=True``: the rule handles head-split channel infos (every other rule has them frozen)."""

    def deco(fn):
        r = OpRule(family, fn, rewrite, heads=heads)
        for t in targets:
            if t is None:
                continue
            r.names[t] = (per_target or {}).get(t, names)
            RULES[t] = r
        return fn

    return deco


#: ``node.meta`` keys: a call whose arguments bind to no single schema layout (``normalize.py``), and a
#: node the pass has set aside (its rule raised): either way it gets no rule and is frozen
UNNORMALIZED = "sqr_fx.unnormalized"
OPAQUE = "sqr_fx.opaque"


def lookup(node: fx.Node, root: nn.Module) -> Optional[tuple[OpRule, Args]]:
    """The rule for ``node`` with its arguments by name, or None when the op has no rule.

    A call whose arguments could not be normalized, a node set aside after its rule failed, and a
    module with forward hooks (it computes more than its type says) have no rule."""
    if node.meta.get(UNNORMALIZED) or node.meta.get(OPAQUE):
        return None
    if node.op == "call_function":
        key: Any = node.target
    elif node.op == "call_method":
        key = Method(node.target)
    elif node.op == "call_module":
        mod = root.get_submodule(node.target)
        if has_hooks(mod):
            return None
        key = type(mod)
    else:
        key = node.op  # placeholder / get_attr / output
    r = RULES.get(key)
    if r is None and isinstance(key, torch._ops.OpOverload):
        # a library's custom op (transformers::grouped_mm_fallback) exists only once that library is
        # imported: its rule is keyed by the qualified name "ns::op.overload"
        named = f"{key.name()}.{key._overloadname}"
        key = named if named in RULES else _functional_overload(key)  # aten.clip_ -> aten.clip: in-place ops are data flow
        r = RULES.get(key) if key is not None else None
    if r is None:
        return None
    return r, Args(node, r.names[key])


@functools.lru_cache(maxsize=None)  # (asked on every lookup of the node: the search runs once per op)
def _functional_overload(op: "torch._ops.OpOverload") -> Optional["torch._ops.OpOverload"]:
    """``aten.foo_.X`` -> the ``aten.foo`` overload with the same argument names and types. ``resolve_inplace`` has
    re-pointed every later reader to the in-place op's output, so it is the functional op on a fresh tensor."""
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_") or not op._schema.is_mutable:
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    if packet is None:
        return None
    # the overload with the same arguments, names AND types: overload names do not pair up (``pow_.Scalar`` is
    # ``pow_(Tensor self, Scalar exponent)``, ``pow.Scalar`` is ``pow(Scalar self, Tensor exponent)``; the
    # functional form is ``pow.Tensor_Scalar``)
    want = [(a.name, str(a.type)) for a in op._schema.arguments]
    for overload in [op._overloadname] + [o for o in packet.overloads() if o != op._overloadname]:
        func = getattr(packet, overload, None)
        if func is not None and [(a.name, str(a.type)) for a in func._schema.arguments] == want:
            return func
    return None
