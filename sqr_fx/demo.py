"""``make demo`` / ``python -m sqr_fx demo``: minimize two masked networks and show the reports.

Builds a LeNet-300-100 MLP and a ResNet-18 (10 classes), masks them the way pruning
leaves networks (global magnitude zeros plus whole dead units), minimizes them, checks
equivalence at the traced shape and at another batch/resolution, and prints the
per-layer reports and the size ratios. Needs no data and no downloads.
"""
from __future__ import annotations

import time

import torch
import torchvision
from torch import nn

from .equivalence import check_equivalence, max_relative_error
from .masking import global_magnitude_mask, plant_dead_units, randomize_norm_stats
from .minimize import minimize

__all__ = ["lenet_300_100", "main"]


def lenet_300_100() -> nn.Module:
    """The classic 784-300-100-10 fully-connected network."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def _masked(model: nn.Module, sparsity: float, dead: float, head: str, stem: str) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = randomize_norm_stats(model, g)
    model = global_magnitude_mask(model, sparsity)
    return plant_dead_units(model, dead, g, exclude_rows=[head], exclude_columns=[stem]).eval()


def _run(name: str, model: nn.Module, traced: torch.Tensor, other: torch.Tensor) -> None:
    print(f"\n=== {name} ===")
    t0 = time.perf_counter()
    small = minimize(model, (traced,))
    dt = time.perf_counter() - t0
    print(small.sqr_report)
    for x in (traced, other):
        check_equivalence(model, small, (x,), rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            err = max_relative_error(model(x), small(x))
        print(f"equivalent on input {tuple(x.shape)}: max relative error {err:.2e}")
    r = small.sqr_report
    print(f"{name}: {r.floats_before:,} -> {r.floats_after:,} stored floats, {r.ratio:.2f}x smaller, "
          f"minimize took {dt:.2f} s")


def main() -> None:
    torch.manual_seed(0)
    mlp = _masked(lenet_300_100(), sparsity=0.9, dead=0.3, head="5", stem="1")
    _run("LeNet-300-100 (90% magnitude-pruned, 30% dead units)", mlp, torch.randn(8, 1, 28, 28),
         torch.randn(3, 1, 28, 28))
    resnet = _masked(torchvision.models.resnet18(num_classes=10), sparsity=0.6, dead=0.25, head="fc", stem="conv1")
    _run("ResNet-18 (60% magnitude-pruned, 25% dead channels)", resnet, torch.randn(2, 3, 64, 64),
         torch.randn(3, 3, 96, 80))


if __name__ == "__main__":
    main()
