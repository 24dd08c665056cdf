"""``check_equivalence``: the original model is the oracle."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .errors import EquivalenceError

__all__ = ["check_equivalence", "max_relative_error"]


def _flatten(out: Any, path: str = "output") -> list[tuple[str, Any]]:
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if isinstance(out, dict):
        return [kv for k in sorted(out, key=str) for kv in _flatten(out[k], f"{path}[{k!r}]")]
    if isinstance(out, (list, tuple)):
        return [kv for i, v in enumerate(out) for kv in _flatten(v, f"{path}[{i}]")]
    if hasattr(out, "to_tuple"):  # ModelOutput-like
        return _flatten(out.to_tuple(), path)
    return [(path, out)]


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |a|, tiny): relative to the output's scale."""
    a, b = a.detach().double(), b.detach().double()
    scale = a.abs().max().item() if a.numel() else 0.0
    return (a - b).abs().max().item() / max(scale, 1e-30) if a.numel() else 0.0


def check_equivalence(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[Any] | Any,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> dict[str, float]:
    """Run both models on ``inputs`` and raise :class:`EquivalenceError` naming every output that differs.

    Returns ``{output path: max abs error}``. Tolerances follow ``torch.allclose``.

    >>> m = torch.nn.Linear(3, 2).eval()
    >>> check_equivalence(m, m, (torch.randn(4, 3),))
    {'output': 0.0}
    """
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    with torch.no_grad():
        ref, cand = _flatten(reference(*inputs)), _flatten(candidate(*inputs))
    if len(ref) != len(cand):
        raise EquivalenceError(f"reference returns {len(ref)} outputs, candidate {len(cand)}")
    errors, problems = {}, []
    for (path, r), (_, c) in zip(ref, cand):
        if not isinstance(r, torch.Tensor):
            if r != c:
                problems.append(f"{path}: {r!r} != {c!r}")
            continue
        if not isinstance(c, torch.Tensor) or r.shape != c.shape:
            problems.append(f"{path}: shape {tuple(r.shape)} vs {getattr(c, 'shape', type(c))}")
            continue
        err = (r.double() - c.double()).abs()
        errors[path] = err.max().item() if err.numel() else 0.0
        if not torch.allclose(c.double(), r.double(), rtol=rtol, atol=atol, equal_nan=True):
            problems.append(
                f"{path}: max abs error {errors[path]:.3g}, max rel error {max_relative_error(r, c):.3g} "
                f"(rtol={rtol}, atol={atol}, shape {tuple(r.shape)})"
            )
    if problems:
        raise EquivalenceError("models differ:\n  " + "\n  ".join(problems))
    return errors
