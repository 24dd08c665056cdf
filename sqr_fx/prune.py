"""Magnitude pruning that leaves exact zeros, on plain modules and on minimized GraphModules.

``minimize()`` returns GraphModules with modules where the original had them, but some weights are
plain parameters read by functional ops (attention projections, layers whose tensors another op also
reads: ``F.linear(x, fc1.weight, fc1.bias)``), which no module-type search finds. Pruning therefore
selects tensors by parameter, not by module type: a *prunable weight* is a floating-point
parameter with at least two dimensions whose name ends in ``weight`` (``fc1.weight``,
``in_proj_weight``, conv kernels). Biases, norm affines and layer scales (``layer_scale``) are
never pruned. Pass ``weights=`` (parameter names) to choose differently.

``amount`` is the fraction of the *currently non-zero* prunable entries to zero, the convention of
``torch.nn.utils.prune`` for iterative pruning: zeros already present stay and are not counted.
Masks that users made with ``torch.nn.utils.prune`` (``weight_orig`` / ``weight_mask``) are made
permanent first, so their zeros are the starting point.

Pruning mutates the model in place (shapes never change, so optimizers stay valid).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> rep = prune(net, 0.5)
>>> rep.zeros_after, rep.total
(40, 80)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

__all__ = [
    "prune",
    "prunable_parameters",
    "make_prune_permanent",
    "keep_zeros",
    "weight_sparsity",
    "amount_for_sparsity",
    "PruneReport",
    "PrunedTensor",
]

Scope = Literal["global", "layer"]


def make_prune_permanent(model: nn.Module) -> list[str]:
    """Fold ``torch.nn.utils.prune`` reparametrizations into plain parameters with exact zeros.

    Returns the qualified names of the parameters that were folded (``weight_orig * weight_mask``
    becomes ``weight``, the hook and mask buffer go away).
    """
    folded = []
    for mname, module in model.named_modules():
        hooks = [h for h in module._forward_pre_hooks.values()
                 if isinstance(h, torch_prune.BasePruningMethod)]
        # a PruningContainer (pruned twice) carries the tensor name of its members
        for tname in dict.fromkeys(h._tensor_name for h in hooks):
            torch_prune.remove(module, tname)
            folded.append(f"{mname}.{tname}" if mname else tname)
    return folded


def prunable_parameters(model: nn.Module, weights: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """The parameters :func:`prune` acts on, by qualified name, in registration order.

    Default: floating parameters with ``ndim >= 2`` whose last name component ends in ``weight``.
    ``weights`` restricts to an explicit list of names (unknown names raise ``KeyError``).
    """
    params = dict(model.named_parameters())
    if weights is not None:
        names = list(weights)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise KeyError(f"no parameters named {unknown}; available: {list(params)[:8]} ...")
        return {n: params[n] for n in names}
    return {n: p for n, p in params.items()
            if p.is_floating_point() and p.dim() >= 2 and n.rsplit(".", 1)[-1].endswith("weight")}


@dataclass
class PrunedTensor:
    """What pruning did to one tensor. ``threshold``: largest magnitude zeroed (0 if none)."""

    name: str
    numel: int
    zeros_before: int
    zeros_after: int
    threshold: float


@dataclass
class PruneReport:
    """Per-tensor outcome of one :func:`prune` call, in parameter order."""

    amount: float
    scope: str
    tensors: list[PrunedTensor] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros_after(self) -> int:
        return sum(t.zeros_after for t in self.tensors)

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros over the prunable weights after pruning."""
        return self.zeros_after / self.total if self.total else 0.0

    def __str__(self) -> str:
        rows = [f"prune amount={self.amount:g} scope={self.scope}: sparsity {self.sparsity:.4f}"]
        rows += [f"  {t.name:<40} {t.numel:>9}  zeros {t.zeros_before:>9} -> {t.zeros_after:>9}"
                 f"  threshold {t.threshold:.3g}" for t in self.tensors]
        return "\n".join(rows)


def _smallest_nonzero(values: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks marking the ``k`` smallest-magnitude non-zero entries across ``values``.

    Exactly ``k`` entries are marked: ties at the threshold are broken by position (``topk`` on
    the concatenation), never by marking every tied entry.
    """
    flat = torch.cat([v.detach().abs().flatten() for v in values])
    # zeros are already pruned: rank them last so that they are never chosen again
    ranked = torch.where(flat == 0, torch.full_like(flat, float("inf")), flat)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        chosen[torch.topk(ranked, k, largest=False, sorted=False).indices] = True
    out, start = [], 0
    for v in values:
        out.append(chosen[start:start + v.numel()].view_as(v))
        start += v.numel()
    return out


@torch.no_grad()
def prune(model: nn.Module, amount: float, scope: Scope = "global", *,
          weights: Iterable[str] | None = None) -> PruneReport:
    """Zero the smallest-magnitude ``amount`` fraction of the non-zero prunable weights, in place.

    ``scope="global"`` ranks all prunable entries together (one threshold for the network, as
    ``torch.nn.utils.prune.global_unstructured``); ``scope="layer"`` prunes ``amount`` of every
    tensor separately. Exactly ``round(amount * nonzeros)`` entries are zeroed (per tensor for
    ``"layer"``). Existing ``torch.nn.utils.prune`` masks are made permanent first.

    >>> lin = torch.nn.Linear(4, 4)
    >>> prune(lin, 0.25, scope="layer").tensors[0].zeros_after
    4
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    make_prune_permanent(model)
    params = prunable_parameters(model, weights)
    report = PruneReport(amount, scope)
    if not params:
        return report
    names, tensors = list(params), list(params.values())
    before = [int((t == 0).sum()) for t in tensors]
    if scope == "global":
        nonzero = sum(t.numel() - z for t, z in zip(tensors, before))
        masks = _smallest_nonzero(tensors, int(round(amount * nonzero)))
    else:
        masks = [_smallest_nonzero([t], int(round(amount * (t.numel() - z))))[0]
                 for t, z in zip(tensors, before)]
    for name, t, z, m in zip(names, tensors, before, masks):
        threshold = float(t[m].abs().max()) if bool(m.any()) else 0.0
        t.masked_fill_(m, 0.0)
        report.tensors.append(PrunedTensor(name, t.numel(), z, int((t == 0).sum()), threshold))
    return report


def weight_sparsity(model: nn.Module, weights: Iterable[str] | None = None) -> float:
    """Fraction of exact zeros over the prunable weights of ``model``."""
    params = prunable_parameters(model, weights).values()
    total = sum(p.numel() for p in params)
    return sum(int((p == 0).sum()) for p in params) / total if total else 0.0


def amount_for_sparsity(nonzeros: int, target_sparsity: float, total: int) -> float:
    """The ``amount`` that takes ``nonzeros`` non-zero entries to ``target_sparsity`` of ``total``.

    Used for cumulative schedules, where ``total`` is the dense model's prunable count even after
    minimize has shrunk the tensors. Clamped to ``[0, 1]`` (0 when already sparse enough).

    >>> round(amount_for_sparsity(1000, 0.95, 10000), 6)  # keep 500 of 1000
    0.5
    """
    keep = (1.0 - target_sparsity) * total
    return min(max(1.0 - keep / max(nonzeros, 1), 0.0), 1.0)


@contextlib.contextmanager
def keep_zeros(model: nn.Module, weights: Iterable[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Train with the current exact zeros of the prunable weights frozen (masked fine-tuning).

    Gradients are multiplied by the mask as they are computed (a tensor hook, so it also runs
    before ``DistributedDataParallel`` reduces them). With a fresh optimizer a zero entry then
    sees zero gradient, zero momentum and zero Adam moments, and weight decay of 0 is 0, so it
    stays 0 under SGD, Adam and AdamW. On exit the mask is applied once more, which makes the
    guarantee independent of the optimizer. Yields the masks (``True`` = kept).

    >>> lin = torch.nn.Linear(4, 4); _ = prune(lin, 0.5)
    >>> with keep_zeros(lin):
    ...     lin(torch.randn(2, 4)).sum().backward()
    >>> int((lin.weight.grad[lin.weight == 0] != 0).sum())
    0
    """
    params = prunable_parameters(model, weights)
    masks = {n: p.detach() != 0 for n, p in params.items()}
    handles = [p.register_hook(lambda g, m=masks[n]: g * m) for n, p in params.items()
               if not bool(masks[n].all())]
    try:
        yield masks
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, p in params.items():
                p.masked_fill_(~masks[n].to(p.device), 0.0)
