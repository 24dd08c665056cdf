"""The fuzzer's checks: the result against the original at several shapes (``check_equivalence``), the
original left untouched, error summaries, the export-dialect front end."""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch import nn

from ..equivalence import check_equivalence, max_relative_error
from ..errors import EquivalenceError

__all__ = ["RTOL", "ATOL", "CloneInputs", "error_head", "export_module", "snapshot", "impure", "compare"]

RTOL, ATOL = 1e-7, 1e-9


class CloneInputs(nn.Module):
    """Each model gets its own copy of the inputs (an in-place op on the input must not leak)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *xs):
        return self.m(*(x.clone() for x in xs))


def error_head(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb) if "sqr_fx" in f.filename
                  and "testing" not in f.filename), "")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" + (f"  [at {where}]" if where else "")


def export_module(model: nn.Module, x: torch.Tensor, dynamic: bool = True) -> nn.Module:
    dyn = ({d: torch.export.Dim.AUTO for d in range(x.dim())},)
    if not dynamic:
        return torch.export.export(model, (x,)).module()
    try:
        return torch.export.export(model, (x,), dynamic_shapes=dyn).module()
    except Exception:  # noqa: BLE001 - a static export accepts the example shape only
        return torch.export.export(model, (x,)).module()


def snapshot(m: nn.Module) -> dict:
    return {k: (id(v), v.detach().clone()) for k, v in m.state_dict(keep_vars=True).items()}


def impure(m: nn.Module, before: dict) -> str:
    after = m.state_dict(keep_vars=True)
    if after.keys() != before.keys():
        return f"minimize changed the original's state_dict keys: {sorted(set(after) ^ set(before))[:4]}"
    for k, (ident, v) in before.items():
        if id(after[k]) != ident or not torch.equal(after[k].detach(), v):
            return f"minimize modified the original's {k}"
    return ""


def compare(ref: nn.Module, cand: nn.Module, inputs: dict) -> tuple[str, float]:
    """('' or what differs, max relative error) over the shapes the reference accepts; a shape the
    result refuses with torch.export's ``Guard failed`` is reported (prefix GUARD) only when nothing
    else differs."""
    worst, guard = 0.0, ""
    for name, x in inputs.items():
        try:
            with torch.no_grad():
                r = ref(x.clone())
        except Exception:  # noqa: BLE001 - the original rejects this shape: nothing to compare
            continue
        try:
            check_equivalence(CloneInputs(ref), CloneInputs(cand), (x,), rtol=RTOL, atol=ATOL)
        except EquivalenceError as e:
            with torch.no_grad():
                c = cand(x.clone())
            rs, cs = (r if isinstance(r, tuple) else (r,)), (c if isinstance(c, tuple) else (c,))
            errs = [max_relative_error(a, b) for a, b in zip(rs, cs) if a.shape == b.shape]
            worst = max(errs + [0.0])
            return f"{name} shape {tuple(x.shape)}: {str(e).splitlines()[-1].strip()}", worst
        except Exception as e:  # noqa: BLE001 - the result crashes where the original runs
            if "Guard failed" in str(e):  # torch.export's shape guards (docs/design.md, front-end caveat)
                guard = guard or f"GUARD {name} shape {tuple(x.shape)}: the result refused it: {error_head(e)}"
                continue
            return f"{name} shape {tuple(x.shape)}: the result raised {error_head(e)}", float("inf")
    return guard, worst
