"""The per-layer report of a minimize run: what was removed, why, and what it saved."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from types import SimpleNamespace
from typing import Any

__all__ = ["LayerRow", "MinimizeReport"]


@dataclass
class LayerRow:
    """One weighted layer (Linear / Conv), named by its weight's attribute path."""

    name: str
    op: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...] = ()
    out_unused: int = 0
    out_const: int = 0
    in_unused: int = 0
    in_const: int = 0
    params_before: int = 0
    params_after: int = 0
    out_align: int = 0  # output / input channels kept only to align widths (``minimize(..., align=N)``)
    in_align: int = 0


@dataclass
class MinimizeReport:
    """Returned as ``result.sqr_report``; ``print(report)`` shows the per-layer table."""

    frontend: str
    rows: list[LayerRow] = field(default_factory=list)
    rounds: int = 0
    params_before: int = 0
    params_after: int = 0
    floats_before: int = 0
    floats_after: int = 0
    input_features_dropped: int = 0
    frozen_ops: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)  # ops outside their rule's preconditions (why), kept
    tied_tensors: list[str] = field(default_factory=list)
    shared_tensors: list[str] = field(default_factory=list)  # tied, sliced once for all readers
    seconds: float = 0.0
    verified_on: list[str] = field(default_factory=list)  # input variants the self-check compared
    fixed_shapes: list[str] = field(default_factory=list)  # variants the traced program itself refuses
    verify_seconds: float = 0.0  # CPU seconds of the self-check
    #: CPU seconds per phase of the pass: ``trace`` (front end: trace, normalization, and the trace check's run of
    #: the model and of the graph on the example inputs), ``shapes`` (meta-tensor shapes of rewritten graphs),
    #: ``analysis`` (every round's, with its other-size shape runs), ``plan``, ``rewrite``, ``finish``
    phase_seconds: dict[str, float] = field(default_factory=dict)
    set_aside: list[str] = field(default_factory=list)  # rules that failed to rewrite their node: frozen
    align: int = 1  # minimize(..., align=N): every reduced width a multiple of N
    align_floats: int = 0  # stored floats the alignment keeps (one unaligned rewrite of the result smaller)

    @property
    def ratio(self) -> float:
        """Deployable-size ratio (stored floats before / after)."""
        return self.floats_before / max(self.floats_after, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    # A minimized module carries its report (``result.sqr_report``) and must load where sqr_fx is not
    # installed (docs/design.md, "The returned module"): pickled, the report is a ``types.SimpleNamespace``
    # of its fields (rows as dicts). Copies stay reports.
    def __reduce__(self):
        return (SimpleNamespace, (), self.to_dict())

    def __copy__(self) -> "MinimizeReport":
        return replace(self)

    def __deepcopy__(self, memo: dict) -> "MinimizeReport":
        return replace(self, **{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})

    def __str__(self) -> str:
        head = ("layer", "op", "weight before", "weight after", "out unused", "out const", "in unused",
                "in const", "params before", "params after")
        body = [
            (r.name, r.op, "x".join(map(str, r.shape_before)), "x".join(map(str, r.shape_after)) or "-",
             r.out_unused, r.out_const, r.in_unused, r.in_const, r.params_before, r.params_after)
            for r in self.rows
        ]
        if self.align > 1:  # the channels kept back for alignment, per layer
            head += ("out align", "in align")
            body = [b + (r.out_align, r.in_align) for b, r in zip(body, self.rows)]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
        fmt = lambda row: "  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w)  # noqa: E731
                                    for i, (x, w) in enumerate(zip(row, widths)))
        lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
        lines.append(
            f"traced with {self.frontend}; {self.rounds} round(s) to the fixpoint in {self.seconds:.2f} s; "
            f"parameters {self.params_before:,} -> {self.params_after:,}; stored floats "
            f"{self.floats_before:,} -> {self.floats_after:,} ({self.ratio:.2f}x smaller)"
        )
        if self.align > 1:
            cost = (f"{self.align_floats:,} stored floats ({100 * self.align_floats / max(self.floats_after, 1):.1f} % "
                    f"of the result)" if self.align_floats >= 0 else "not measured")
            lines.append(f"widths aligned to multiples of {self.align} (or kept whole): the alignment keeps {cost}")
        if self.input_features_dropped:
            lines.append(f"{self.input_features_dropped} input feature(s) never read: gathered away inside the graph")
        if self.frozen_ops:
            shown = ", ".join(self.frozen_ops[:8]) + (" ..." if len(self.frozen_ops) > 8 else "")
            lines.append(f"ops without a rule (their channels kept): {shown}")
        if self.declined:
            shown = "; ".join(self.declined[:6]) + (" ..." if len(self.declined) > 6 else "")
            lines.append(f"ops outside their rule's preconditions (their channels kept): {shown}")
        if self.phase_seconds:
            lines.append("CPU seconds by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in self.phase_seconds.items()))
        if self.verified_on:
            lines.append(f"self-check passed on: {'; '.join(self.verified_on)} ({self.verify_seconds:.2f} s CPU)")
        if self.fixed_shapes:
            lines.append(f"the traced program is tied to the example's shape; it refuses: {'; '.join(self.fixed_shapes)}")
        if self.set_aside:
            lines.append("rules that could not rewrite their node (frozen instead): " + "; ".join(self.set_aside))
        if self.tied_tensors:
            lines.append(f"tensors read by several ops (tied), kept whole: {', '.join(self.tied_tensors)}")
        if self.shared_tensors:
            lines.append(f"tied tensors sliced once for all their readers: {', '.join(self.shared_tensors)}")
        return "\n".join(lines)
