"""The workload: which models, masked how, fed which inputs. Identical for every tool.

A model is built from torchvision with random weights (seeded; no downloads), given
trained-looking normalization statistics, then masked. The same ``(model, mask)`` pair
always yields bit-identical weights, so every tool sees the same network.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from sqr_fx.masking import global_magnitude_mask, plant_dead_units, prunable_weights, randomize_norm_stats

__all__ = [
    "MaskSpec", "MASKS", "STANDARD_MASK", "DEFAULT_MASKS", "BENCH_MODELS", "QUICK_MODELS", "SCALING_MODELS",
    "build_model", "trained_looking", "count_params_meta", "masked_model", "make_inputs", "head_and_stem", "classification_models",
    "TRACE_RES", "SECOND_RES",
]

SEED = 0
TRACE_RES = 224  # resolution the tools trace / propagate at
SECOND_RES = 160  # a second resolution, never seen by the tools


@dataclass(frozen=True)
class MaskSpec:
    """Dead units first (``dead`` fraction of rows and of columns per layer), then global
    magnitude pruning to ``sparsity`` over all Linear/Conv/attention weights."""

    name: str
    sparsity: float
    dead: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


MASKS: dict[str, MaskSpec] = {m.name: m for m in [
    MaskSpec("m90", 0.9, 0.0),        # unstructured magnitude only: what dies on its own
    MaskSpec("d25+m50", 0.5, 0.25),
    MaskSpec("d25+m70", 0.7, 0.25),   # the standard mask
    MaskSpec("d25+m90", 0.9, 0.25),
]}
STANDARD_MASK = "d25+m70"
DEFAULT_MASKS = ["d25+m50", "d25+m70", "d25+m90"]  # m90 on request: --masks m90 ...

BENCH_MODELS = [
    "resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "efficientnet_b0",
    "densenet121", "convnext_tiny", "vit_b_16",
    "resnext50_32x4d", "regnet_x_400mf",  # grouped (non-depthwise) convolutions
]
QUICK_MODELS = ["resnet18", "mobilenet_v2"]
# extra graphs for the pass-time-vs-graph-size plot (maxvit_t: ~1,600 nodes)
SCALING_MODELS = ["squeezenet1_1", "mnasnet1_0", "resnet101", "maxvit_t"]

# fixed-size models: they assert on the input resolution
_FIXED_RES = ("vit_", "maxvit_")


def classification_models() -> list[str]:
    """Every classification model torchvision ships (detection/segmentation/video excluded)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def accepts_second_res(name: str) -> bool:
    return not name.startswith(_FIXED_RES)


def build_model(name: str) -> nn.Module:
    """Seeded random-init torchvision model in eval mode, with trained-looking norm statistics,
    heads and layer scales (:func:`trained_looking`)."""
    torch.manual_seed(SEED)
    model = torchvision.models.get_model(name, weights=None, **_build_kwargs(name)).eval()
    model = randomize_norm_stats(model, torch.Generator().manual_seed(SEED + 1))
    return trained_looking(model, torch.Generator().manual_seed(SEED + 4)).eval()


@torch.no_grad()
def trained_looking(model: nn.Module, g: torch.Generator) -> nn.Module:
    """Give init-time degenerate tensors trained-looking values, or errors hide behind them.

    torchvision zero-initialises some classifier heads (ViT: every output is then 0, so any
    tool's error is 0) and starts ConvNeXt's layer scales at 1e-6 (the blocks barely reach the
    output). An all-zero weight (ndim >= 2) gets N(0, 0.05) entries; a layer-scale tensor with
    every entry below 1e-4 gets U(0.1, 1.0). Returns the model (modified in place).
    """
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        elif "layer_scale" in name and p.abs().max() < 1e-4:
            p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
    return model


def count_params_meta(name: str) -> int:
    """Parameter count of a torchvision model without building it (from its weights' metadata)."""
    weights = list(torchvision.models.get_model_weights(name))
    return int(weights[0].meta["num_params"])


def _build_kwargs(name: str) -> dict:
    return {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}


def head_and_stem(model: nn.Module) -> tuple[str, str]:
    """Names of the last prunable weight (classifier head) and the first (the stem reading the image).

    Dead units keep the head's rows (every logit stays input-dependent) and the stem's columns
    (every image channel stays read), so no tool has to change the model's interface.
    """
    names = [w.name for w in prunable_weights(model)]
    return names[-1], names[0]


def masked_model(dense: nn.Module, spec: MaskSpec) -> nn.Module:
    """``dense`` with the mask ``spec`` applied (a new model; ``dense`` is not modified)."""
    head, stem = head_and_stem(dense)
    model = dense
    if spec.dead > 0:
        model = plant_dead_units(model, spec.dead, torch.Generator().manual_seed(SEED + 2),
                                 exclude_rows=[head], exclude_columns=[stem])
    if spec.sparsity > 0:
        model = global_magnitude_mask(model, spec.sparsity)
    return model.eval()


def make_inputs(name: str) -> dict[str, torch.Tensor | None]:
    """Seeded inputs: ``example`` (what the tools trace with, batch 1), ``eval`` (fresh images
    at the traced resolution), ``eval2`` (the second resolution; None for fixed-size models)."""
    g = torch.Generator().manual_seed(SEED + 3)
    r = TRACE_RES
    return {
        "example": torch.randn(1, 3, r, r, generator=g),
        "eval": torch.randn(2, 3, r, r, generator=g),
        "eval2": torch.randn(3, 3, SECOND_RES, SECOND_RES, generator=g) if accepts_second_res(name) else None,
    }
