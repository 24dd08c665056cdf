"""minimize on a ``torch.export.ExportedProgram``: a program in, a smaller program out.

The program's own module (``ep.module()``: parameters, buffers and constants bound from the graph
signature) goes through the ordinary pass; the result is exported again with the ORIGINAL program's
dynamic dims and their ranges (``ep.range_constraints``), so it keeps the conventions of a program a
user exported by hand: it saves and loads with ``torch.export.save/load``, runs
``run_decompositions`` and goes to ONNX.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.export import Dim, ExportedProgram

from .errors import SqrFxError

__all__ = ["minimize_program", "program_inputs", "dynamic_shapes_of"]


def program_inputs(ep: ExportedProgram, example_inputs: Any = None) -> tuple[tuple, dict]:
    """(args, kwargs) to drive the pass: the given examples, else the ones the program was exported with."""
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            return (), dict(example_inputs)
        return (tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)), {}
    if ep.example_inputs is None:
        raise SqrFxError("this ExportedProgram carries no example inputs (saved without them?): pass "
                         "example_inputs to minimize")
    args, kwargs = ep.example_inputs
    return tuple(args), dict(kwargs)


def _bound(v: Any) -> Optional[int]:
    """A finite integer range bound, None for +-infinity (sympy's ``oo`` / torch's ``int_oo``)."""
    return None if "oo" in str(v) else int(v)


def dynamic_shapes_of(ep: ExportedProgram) -> Optional[dict[str, Any]]:
    """The program's dynamic dims as a ``dynamic_shapes`` spec keyed by input name: one ``Dim`` per
    symbol (shared where the program shares it) with the program's range; None when all are static."""
    ranges = {str(k): v for k, v in ep.range_constraints.items()}
    dims: dict[str, Dim] = {}
    spec: dict[str, Any] = {}
    names = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        val = node.meta.get("val")
        shape = getattr(val, "shape", None)
        if shape is None:
            spec[node.name] = None
            continue
        entry = {}
        for d, s in enumerate(shape):
            if isinstance(s, torch.SymInt) and s.node.expr.is_Symbol:
                name = str(s.node.expr)
                if name not in dims:
                    vr = ranges.get(name)
                    lo, hi = (_bound(vr.lower), _bound(vr.upper)) if vr is not None else (None, None)
                    dims[name] = Dim(name, **({"min": lo} if lo is not None else {}),
                                     **({"max": hi} if hi is not None else {}))
                entry[d] = dims[name]
        spec[node.name] = entry or None
    return spec if dims else None


def minimize_program(ep: ExportedProgram, example_inputs: Any = None, **kwargs: Any) -> ExportedProgram:
    """``minimize`` for an ExportedProgram; returns an ExportedProgram (``.sqr_report`` attached)."""
    from .minimize import minimize

    args, kw = program_inputs(ep, example_inputs)
    if kw:
        raise SqrFxError("keyword example inputs of an ExportedProgram: export it with positional inputs")
    small = minimize(ep.module(), args, **kwargs)
    spec = dynamic_shapes_of(ep)
    shapes = tuple(spec.get(n) for n in ep.graph_signature.user_inputs) if spec else None
    try:
        out = torch.export.export(small, args, dynamic_shapes=shapes)
    except Exception:  # noqa: BLE001 - torch states the same guards differently: let it choose (AUTO)
        auto = tuple({d: Dim.AUTO for d in s} if s else None for s in shapes) if shapes else None
        try:
            out = torch.export.export(small, args, dynamic_shapes=auto)
        except Exception as e:  # noqa: BLE001
            raise SqrFxError(f"the minimized program could not be exported with the original's dynamic dims "
                             f"({shapes}): {type(e).__name__}: {str(e)[:400]}") from e
    before = {k: (str(v.lower), str(v.upper)) for k, v in ep.range_constraints.items()}
    after = {k: (str(v.lower), str(v.upper)) for k, v in out.range_constraints.items()}
    if sorted(before.values()) != sorted(after.values()):
        small.sqr_report.fixed_shapes.append(f"dynamic dim ranges {sorted(before.values())} became "
                                             f"{sorted(after.values())} in the re-exported program")
    out.sqr_report = small.sqr_report
    return out
