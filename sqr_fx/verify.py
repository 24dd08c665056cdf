"""The self-check: a result is returned only after it matched the original on several input shapes.

The rules are proved one by one (docs/rules.md), but a proof covers only the argument forms a rule
admits. ``minimize(..., verify=True)`` (the default) therefore runs the ORIGINAL model and the
result on the example inputs and on inputs derived from them (one more batch row; another
spatial or sequence size where the original accepts one) and raises
:class:`~sqr_fx.EquivalenceError` naming the first differing output instead of returning a wrong
model. A result that refuses a shape the original accepts is a mismatch too, unless the traced
program itself (before any removal) refuses it: then the front end (``torch.export`` specialized a
dim) is the cause, and the report lists the shape under ``fixed_shapes``.
"""
from __future__ import annotations

import contextlib
import io
import time
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .equivalence import _flatten
from .errors import EquivalenceError

__all__ = ["run_cloned", "outputs_match", "derived_inputs", "self_check", "tolerance", "compute_tolerance"]


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def run_cloned(model: Callable, inputs: tuple, quiet: bool = False) -> Any:
    """``model(*inputs)`` on copies of the inputs (a model may write into its inputs), without grad.
    ``quiet``: a probe that may fail (a shape the model refuses): keep a GraphModule's traceback
    print off stderr; the exception still propagates."""
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        return model(*_clone(inputs))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance (to the output's largest magnitude) for a result in ``dtype``: summation
    order and the compensated norms change rounding, never more than this on the models measured."""
    return {torch.float64: 1e-7, torch.float32: 1e-4}.get(dtype, 5e-2)


def compute_tolerance(gm: nn.Module) -> float:
    """The tolerance of the least precise floating dtype a traced graph computes in (0.0 for a graph
    without shapes). A float64 model that normalizes in float32 (Hugging Face's RMSNorms: ``x.float()``,
    Gemma's norm, RoPE tables) is exact only to float32 rounding: a compensated statistic summed in
    another order differs from the original's by float32 ulps, however exact the rewrite."""
    dtypes = {getattr(n.meta.get("tensor_meta"), "dtype", None) for n in getattr(gm, "graph", fx.Graph()).nodes
              if n.op in ("call_function", "call_method", "call_module")}
    floats = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max((tolerance(d) for d in floats), default=0.0)


def outputs_match(ref: Any, cand: Any, rel: Optional[float] = None, floor: float = 0.0) -> Optional[str]:
    """None when ``cand`` equals ``ref`` output by output (shapes, dtypes, NaN/inf positions, values
    within ``rel`` of each output's scale, default: its dtype's tolerance, never below ``floor``); else a
    description of the first difference."""
    r, c = _flatten(ref), _flatten(cand)
    if len(r) != len(c):
        return f"{len(r)} outputs expected, {len(c)} returned"
    for (path, a), (_, b) in zip(r, c):
        if not isinstance(a, torch.Tensor):
            if isinstance(b, torch.Tensor) or a != b:
                return f"{path}: {a!r} != {b!r}"
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return f"{path}: shape {tuple(a.shape)} expected, got {tuple(getattr(b, 'shape', ()))}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"{path}: {int((a != b).sum())} of {a.numel()} entries differ"
            continue
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        finite = torch.isfinite(a64)
        if not torch.equal(finite, torch.isfinite(b64)) or not torch.equal(a64[~finite].nan_to_num(),
                                                                          b64[~finite].nan_to_num()):
            return f"{path}: non-finite entries (inf/NaN) differ"
        if not finite.any():
            continue
        scale = a64[finite].abs().max().item()
        err = (a64[finite] - b64[finite]).abs().max().item()
        tol = max(rel if rel is not None else tolerance(a.dtype), floor) * max(scale, 1e-30)
        if err > tol:
            return f"{path}: max abs error {err:.3g} at output scale {scale:.3g} (tolerance {tol:.3g})"
    return None


def _new_values(x: torch.Tensor, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Fresh values like ``x``'s: same mean/std for floats, values drawn from ``x`` for the rest."""
    if x.is_floating_point():
        xd = x.detach().double()
        std = xd.std().item() if x.numel() > 1 else 1.0
        v = torch.randn(shape, generator=g, dtype=torch.float64) * (std if std > 0 else 1.0) + xd.mean().item()
        return v.to(x.dtype).to(x.device)
    flat = x.reshape(-1)
    return flat[torch.randint(0, max(flat.numel(), 1), shape, generator=g).to(x.device)]


def _resized(inputs: tuple, ref: torch.Tensor, dim: int, size: int, g: torch.Generator) -> tuple:
    """Every tensor input that has ``ref``'s size at ``dim`` gets ``size`` there (fresh values)."""
    def change(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() <= dim or x.shape[dim] != ref.shape[dim]:
            return x
        shape = list(x.shape)
        shape[dim] = size
        if dim == 0 and size > x.shape[0]:  # one more row: the example's rows plus a fresh one
            return torch.cat([x, _new_values(x, tuple([size - x.shape[0]] + shape[1:]), g)], 0)
        return _new_values(x, tuple(shape), g)

    return tuple(change(x) for x in inputs)


def derived_inputs(example_inputs: tuple, seed: int = 0, batch_one: bool = False) -> list[tuple[str, tuple]]:
    """(label, inputs): the example, one more batch row, and another size of each non-batch,
    non-feature axis (spatial axes of 4-D/5-D tensors grow by 32; sequence axes shrink and grow by a
    quarter: a result tied to the traced length, or exact only up to it, is caught either way).
    ``batch_one``: also batch 1 when the example's is larger (``torch.export`` assumes a dynamic size is
    at least 2, and a program may take another branch at 1: the self-check looks there too)."""
    g = torch.Generator().manual_seed(seed)
    out = [("the example inputs", example_inputs)]
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not tensors:
        return out
    ref = tensors[0]
    out.append((f"batch {ref.shape[0] + 1}", _resized(example_inputs, ref, 0, ref.shape[0] + 1, g)))
    if batch_one and ref.shape[0] > 1:
        out.append(("batch 1", _resized(example_inputs, ref, 0, 1, g)))
    if ref.dim() >= 4:
        x = example_inputs
        for d in range(2, ref.dim()):
            x = _resized(x, ref, d, ref.shape[d] + 32, g)
        out.append((f"spatial size {tuple(s + 32 for s in ref.shape[2:])}", x))
    else:
        # [B, T] ids, [C, L] unbatched signals, [B, T, E] / [N, C, L] / [C, H, W]: each non-batch axis in
        # turn (an axis the model cannot vary, a feature axis, is refused by the original and skipped)
        dims = list(range(1, ref.dim()))
        for d in dims:
            n = ref.shape[d]
            for m in ((n - max(1, n // 4)) if n > 1 else None, n + max(1, n // 4)):  # shorter and longer
                if m is not None:
                    out.append((f"size {m} on axis {d}", _resized(example_inputs, ref, d, m, g)))
    return out


def self_check(original: nn.Module, traced: nn.Module, result: nn.Module, example_inputs: tuple,
               rel: Optional[float] = None) -> tuple[list[str], list[str], float]:
    """Compare ``result`` with ``original`` on :func:`derived_inputs`; raise :class:`EquivalenceError`
    on the first mismatch. Returns (labels checked, labels the traced program itself refuses, seconds).
    The tolerance is no tighter than the least precise dtype ``traced`` computes in (:func:`compute_tolerance`)."""
    floor = compute_tolerance(traced)
    t0 = time.process_time()
    checked, fixed = [], []
    for label, inputs in derived_inputs(example_inputs, batch_one=True):
        try:
            expected = run_cloned(original, inputs, quiet=True)
        except Exception:  # noqa: BLE001 - the original refuses this shape: nothing to compare
            continue
        try:
            got = run_cloned(result, inputs, quiet=True)
        except Exception as e:  # noqa: BLE001
            try:
                run_cloned(traced, inputs, quiet=True)
            except Exception:  # noqa: BLE001 - the front end's program was already tied to the example shape
                fixed.append(label)
                continue
            raise EquivalenceError(
                f"self-check failed: the minimized model raises on {label}, where the original runs "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). This is a bug in sqr_fx: "
                "please report it with the model; minimize(..., verify=False) returns the result unchecked."
            ) from e
        problem = outputs_match(expected, got, rel, floor)
        if problem is not None:
            raise EquivalenceError(
                f"self-check failed on {label}: {problem}. The minimized model would compute another "
                "function, so it is not returned. This is a bug in sqr_fx: please report it with the model; "
                "minimize(..., verify=False) returns the result unchecked."
            )
        checked.append(label)
    return checked, fixed, time.process_time() - t0
