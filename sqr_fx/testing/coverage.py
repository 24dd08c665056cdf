"""Which rules-table keys the generators actually produce, measured on traced graphs.

:func:`variants` enumerates, per generator, every combination of the choices that decide its
targets (``Gen.enum``: argument form, op name, variant ...; other choices stay random), each on the
first input state (:data:`STATES`) where it builds. :func:`produced_keys` symbolically traces each
variant (``torch.fx.symbolic_trace``: the graph as the generator wrote it) and collects the ``RULES``
keys of its nodes as :func:`sqr_fx.rules.lookup` would see them; variants holding ``call_module``
nodes also go through minimize's front end (``sqr_fx.trace.to_graph``), which turns modules such as
``nn.MultiheadAttention`` into rule functions. :func:`export_keys` does the same for graphs exported
with ``torch.export`` (aten targets).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Iterator

import torch
from torch import fx

from ..rules import RULES
from ..rules.registry import Method
from .core import GENS, Builder, Case, Op, State, build, load_generators

__all__ = ["STATES", "variants", "all_variants", "graph_keys", "produced_keys", "export_keys", "is_aten"]

# input states tried in order (batched first; size-1 spatial dims for squeeze)
STATES = [State(layout, C, sp, b) for b in (True, False) for layout, C, sp in (
    ("vec", 6, ()), ("seq", 6, (4,)), ("hw", 4, (4, 4)), ("sig", 6, (8,)), ("img", 6, (6, 6)), ("vol", 4, (4, 4, 4)),
    ("tok", 9, (4,)), ("sig", 4, (1,)), ("img", 4, (1, 1)))]


def _case(st: State, ops: list, frontend: str = "fx") -> Case:
    return Case(0, st.layout, st.C, tuple(st.sp), st.batched, B=2, frontend=frontend, ops=ops)


# generators that need an earlier op: merge reads a tensor saved before
PREFIX = {"merge": [Op("save", 1, {"clone": False})],
          "tie": [Op("linear", 1, {"form": "F", "out": 6, "bias": True, "plant": "none"}),  # channels last
                  Op("conv", 1, {"form": "nn", "groups": 1, "out": 6, "k": 1, "stride": 1, "dil": 1, "pad": 0,
                                 "bias": True, "plant": "none", "pm": "zeros", "tuple": False, "mask": None})]}


def variants(name: str, seed: int = 12345) -> Iterator[Case]:
    """One single-op case per combination of ``GENS[name].enum`` choices (per layout when the
    generator's targets depend on it), on the first state in :data:`STATES` where it builds."""
    g = load_generators()[name]
    seen = set()
    for st in STATES:
        if st.layout not in g.layouts:
            continue
        stack: list[dict] = [{}]
        while stack:
            fixed = stack.pop()
            b = Builder(_case(st, []))
            prefix = [Op(p.kind, p.seed, dict(p.args)) for p in PREFIX.get(name, [])]
            prefix = [p for p in prefix if b.apply(p)]
            op = Op(name, seed, dict(fixed))
            ok = b.apply(op)
            offered = b.last.offered if b.last is not None else {}
            nxt = next((k for k in g.enum if k in offered and k not in fixed), None)
            if nxt is not None:
                stack += [{**fixed, nxt: v} for v in dict.fromkeys(offered[nxt])]
                continue
            key = (st.layout if g.by_layout else None,) + tuple(repr(op.args.get(k)) for k in g.enum)
            if ok and key not in seen:
                seen.add(key)
                yield _case(st, prefix + [op])


@functools.lru_cache(maxsize=1)
def all_variants() -> tuple:
    """Every generator's variants (cached: the cases are not modified by building them)."""
    load_generators()

    return tuple(case for name in GENS for case in variants(name))


def is_aten(key: Any) -> bool:
    return isinstance(key, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def graph_keys(gm: fx.GraphModule) -> set:
    """The RULES keys of ``gm``'s nodes (those with an entry), as ``lookup`` computes them."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            key = node.target
        elif node.op == "call_method":
            key = Method(node.target)
        elif node.op == "call_module":
            key = type(gm.get_submodule(node.target))
        else:
            key = node.op
        try:
            if key in RULES:
                out.add(key)
        except TypeError:  # an unhashable target
            pass
    return out


def produced_keys(cases) -> tuple[set, list]:
    """RULES keys of the symbolic traces of ``cases`` (and of minimize's front end for those holding
    modules); the cases symbolic_trace cannot trace, with the error."""
    from ..trace import to_graph

    keys, untraceable = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            model = build(case).model
            try:
                gm = fx.symbolic_trace(model)
            except Exception as e:  # noqa: BLE001
                untraceable.append((case, f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            keys |= graph_keys(gm)
            if any(n.op == "call_module" for n in gm.graph.nodes):
                try:
                    keys |= graph_keys(to_graph(model, (case.example(),))[0])
                except Exception:  # noqa: BLE001 - the front end's business; the trace above counts
                    pass
    return keys, untraceable


def export_keys(cases) -> tuple[set, list]:
    """RULES keys of ``torch.export.export(model).module()`` graphs of ``cases`` (aten dialect)."""
    keys, failed = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            try:
                gm = torch.export.export(build(case).model, (case.example(),)).module()
            except Exception as e:  # noqa: BLE001
                failed.append((case, f"{type(e).__name__}: {str(e)[:200]}"))
                continue
            keys |= graph_keys(gm)
    return keys, failed
