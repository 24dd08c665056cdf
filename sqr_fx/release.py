"""Release: give the exact zeros left inside compacted tensors back to training as small noise.

After ``prune -> minimize`` every surviving weight tensor is smaller but still holds exact zeros
(entries pruned in rows and columns that stayed alive). :func:`release` re-initialises exactly
those entries, and nothing else, with zero-mean Gaussian noise whose standard deviation is
calibrated per tensor ``t`` (``Z_t``: its exact zeros, ``w_t``: its entries)::

    std_t = scale * ||w_t||_F / sqrt(|Z_t|)       reference="energy" (default)
    std_t = scale * min |w| over w_t != 0         reference="threshold" (last pruning threshold)
    std_t = scale * sqrt(mean w^2 over w_t != 0)  reference="rms"

"energy" makes the released noise carry ``scale**2`` of the tensor's energy:
``E ||noise||^2 = |Z_t| std_t^2 = scale^2 ||w_t||^2``, so the relative weight perturbation of every
tensor is ``scale`` whatever its sparsity. Why this one (docs/cycle.md has the measurements):

* per tensor: layers differ in weight scale by orders of magnitude; one global std would swamp
  the small layers and be invisible in the large ones;
* independent of sparsity: a unit's pre-activation change is a sum over its released inputs; with
  a per-entry reference (threshold, rms) that sum grows with the number of zeros, and at 98.5%
  sparsity ``0.1 * threshold`` already moved LeNet-300-100's logits by 22% (test accuracy
  95.0% -> 86.3%), while at 90% sparsity it moved them by 0.4%. "energy" keeps the change at the
  level ``scale`` sets;
* below the pruning line: at high sparsity ``std_t`` is far below the smallest kept weight (the
  ratio is ``scale * rms/min * sqrt(nonzeros / zeros)``), so entries that training does not grow
  are taken again by the next magnitude prune; release re-opens capacity, it does not decide
  structure by itself.

Release mutates parameters in place (shapes do not change); it returns a :class:`ReleaseReport`.

>>> import torch
>>> lin = torch.nn.Linear(6, 4)
>>> with torch.no_grad(): _ = lin.weight.masked_fill_(lin.weight.abs() < 0.2, 0.0)
>>> rep = release(lin, scale=0.1, generator=torch.Generator().manual_seed(0))
>>> bool((lin.weight != 0).all()), rep.released > 0
(True, True)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from torch import nn

from .prune import prunable_parameters

__all__ = ["release", "ReleaseReport", "ReleasedTensor", "output_change", "reference_scale"]

Reference = Literal["energy", "threshold", "rms"]


@dataclass
class ReleasedTensor:
    """One tensor's release: ``released`` entries drawn from ``N(0, std^2)``, ``std = scale * ref``
    (``ref``: :func:`reference_scale` of the tensor before release)."""

    name: str
    numel: int
    released: int
    ref: float
    std: float


@dataclass
class ReleaseReport:
    """Outcome of :func:`release`. ``output_change``: ``||f_after(x) - f_before(x)|| / ||f_before(x)||``
    on the calibration batch; ``agreement``: fraction of calibration samples whose arg-max output is
    unchanged (None without a calibration batch or for non-classifier outputs)."""

    scale: float
    reference: str
    tensors: list[ReleasedTensor] = field(default_factory=list)
    output_change: float | None = None
    agreement: float | None = None

    @property
    def released(self) -> int:
        return sum(t.released for t in self.tensors)

    def __str__(self) -> str:
        head = f"release scale={self.scale:g} reference={self.reference}: {self.released} entries"
        if self.output_change is not None:
            head += f", output change {self.output_change:.3e}"
        if self.agreement is not None:
            head += f", arg-max agreement {self.agreement:.4f}"
        rows = [f"  {t.name:<40} {t.released:>9}/{t.numel:<9} ref {t.ref:.3g}  std {t.std:.3g}"
                for t in self.tensors if t.released]
        return "\n".join([head] + rows)


def reference_scale(weight: torch.Tensor, reference: Reference = "energy") -> float:
    """``std_t / scale`` for one tensor (0 when it has no non-zero entry or no zero to release)."""
    w = weight.detach().double()
    nz = w[w != 0].abs()
    zeros = w.numel() - nz.numel()
    if nz.numel() == 0:
        return 0.0
    if reference == "energy":
        return float(nz.pow(2).sum().sqrt() / zeros ** 0.5) if zeros else 0.0
    if reference == "threshold":
        return float(nz.min())
    if reference == "rms":
        return float(nz.pow(2).mean().sqrt())
    raise ValueError(f"reference must be 'energy', 'threshold' or 'rms', got {reference!r}")


def _outputs(model: nn.Module, inputs: tuple) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"calibration needs a model with one tensor output, got {type(out).__name__}")
    return out.detach().double()


def output_change(before: torch.Tensor, after: torch.Tensor) -> tuple[float, float | None]:
    """Relative L2 change ``||after - before|| / ||before||`` and, for ``[N, C]`` outputs, the
    fraction of rows whose arg-max is unchanged."""
    rel = float((after - before).norm() / before.norm().clamp_min(1e-300))
    agree = None
    if before.dim() == 2 and before.shape[1] > 1:
        agree = float((after.argmax(1) == before.argmax(1)).double().mean())
    return rel, agree


@torch.no_grad()
def release(model: nn.Module, scale: float = 0.1, *, generator: torch.Generator | None = None,
            reference: Reference = "energy", weights: Iterable[str] | None = None,
            calibration: tuple | None = None) -> ReleaseReport:
    """Turn the exact-zero entries of the prunable weights into noise ``N(0, std_t^2)`` (module doc).

    Only entries that are exactly 0 change; non-zero entries are bit-for-bit untouched, and the
    tensors keep their shapes (call it on a minimized model, so the zeros are the ones *inside*
    the compacted tensors). The tensors are those :func:`sqr_fx.prune.prunable_parameters`
    selects (or ``weights``). Noise is drawn on the CPU from ``generator`` (seed it for
    reproducible runs) and copied to the parameter's device. A tensor without non-zero entries
    has no reference and is left alone. With ``calibration`` (a tuple of model inputs) the
    relative output change and arg-max agreement are measured in eval mode and reported.

    >>> lin = torch.nn.Linear(3, 2, bias=False)
    >>> with torch.no_grad(): _ = lin.weight.copy_(torch.tensor([[1., 0, 2], [0, 0, -4]]))
    >>> rep = release(lin, 0.1, generator=torch.Generator().manual_seed(0))  # ||w|| = sqrt(21), 3 zeros
    >>> round(rep.tensors[0].std, 6), rep.released
    (0.264575, 3)
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    report = ReleaseReport(float(scale), reference)
    before = _outputs(model, calibration) if calibration is not None else None
    for name, p in prunable_parameters(model, weights).items():
        zeros = p == 0
        n = int(zeros.sum())
        ref = reference_scale(p, reference)
        if n == 0 or ref == 0.0:
            report.tensors.append(ReleasedTensor(name, p.numel(), 0, ref, 0.0))
            continue
        std = scale * ref
        noise = torch.randn(n, generator=generator, dtype=torch.float64) * std
        p[zeros] = noise.to(device=p.device, dtype=p.dtype)
        report.tensors.append(ReleasedTensor(name, p.numel(), n, ref, std))
    if before is not None:
        report.output_change, report.agreement = output_change(before, _outputs(model, calibration))
    return report
