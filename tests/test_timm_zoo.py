"""timm models (issue 11): planted dead heads, MLP units and channels go, and the result is exact at two sizes.

Each model is built without weights (float64, eval, fewer blocks where timm takes a depth argument), re-drawn
``N(0, 1/fan_in)``, given trained-looking norms and non-zero NF gains, masked at 50 % global magnitude, then
planted with 25 % dead structure:

* attention heads: the output projection's columns of a head are zero (nothing reads the head);
* MLP hidden units: ``fc2``'s column is zero;
* CNN channels: a conv's output row is zero and the BatchNorm right after it maps it to ``-1``, which the
  activation clamps to 0 (a dead ReLU unit); a grouped conv keeps whole groups, so whole groups are planted.

The test asserts that every planted layer lost at least its planted width, and equality with the original at
the traced size and at another batch AND resolution (float64, rtol 1e-9).
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from sqr_fx import minimize
from sqr_fx.masking import global_magnitude_mask, prunable_weights

timm = pytest.importorskip("timm")

RTOL, ATOL = 1e-9, 1e-10

# name -> (create_model kwargs, traced size, second size, layers allowed to keep what was planted there)
MODELS = {
    # fixed-size ViT: symbolic_trace, arguments left at defaults (attn_mask=None) fixed; second size = batch only
    "vit_tiny_patch16_224": (dict(img_size=32, depth=2), 32, 32, ()),
    # dynamic_img_size: torch.export (resampled position embedding), exact at another resolution
    "vit_tiny_patch16_224-dyn": (dict(img_size=32, depth=2, dynamic_img_size=True), 32, 48, ()),
    # EVA's interleaved rotary ``stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)`` (export: computed sizes)
    "eva02_tiny_patch14_224": (dict(img_size=28, depth=2, dynamic_img_size=True), 28, 42, ()),
    # two stages of one block (torch.export's dynamic-shape trace of the window padding costs ~25 s a stage):
    # the convolutional stage and one windowed attention stage with its [H, T, S] attention bias
    "tiny_vit_5m_224": (dict(embed_dims=(64, 128), depths=(1, 1), num_heads=(2, 4), window_sizes=(7, 7)), 64, 96, ()),
    # two stages: locally grouped attention over windows padded past the feature map (7 on 16x16 and 8x8)
    "twins_svt_small": (dict(img_size=64, embed_dims=(64, 128), num_heads=(2, 4), mlp_ratios=(4, 4), depths=(1, 1),
                             wss=(7, 7), sr_ratios=(8, 4)), 64, 96, ()),
    "mobilenetv2_035": (dict(), 64, 80, ()),
    "densenet121": (dict(block_config=(2, 2, 2, 2)), 64, 80, ()),
    "nf_regnet_b0": (dict(), 64, 80, ()),
}
# CNN layers planted with dead output channels (not the ones whose output joins a residual sum)
CNN_ROWS = {"mobilenetv2_035": r"blocks\.\d+\.\d+\.conv_pw$|conv_head$",
            "densenet121": r"denselayer\d+\.conv[12]$|transition\d\.conv$",
            "nf_regnet_b0": r"stages\.\d+\.\d+\.conv2$|final_conv$"}


def _pick(n: int, frac: float, g: torch.Generator) -> list[int]:
    k = min(int(round(frac * n)), n - 1)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


@torch.no_grad()
def planted(name: str, seed: int = 0, frac: float = 0.25) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    """The masked, planted model and ``{layer: (axis, planted width)}`` (axis 1: input columns, 0: rows)."""
    kw = MODELS[name][0]
    torch.manual_seed(seed)
    model = timm.create_model(name.split("-")[0], pretrained=False, num_classes=10, **kw).double().eval()
    g = torch.Generator().manual_seed(seed)
    for w in prunable_weights(model):  # global ranking not decided by each layer's init scheme
        w.tensor.copy_(torch.randn(w.tensor.shape, generator=g, dtype=torch.float64) / math.sqrt(w.tensor[0].numel()))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64) * 0.5)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
            m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64) * 0.5)
    for pname, p in model.named_parameters():  # NF nets start with gain 0 (a dead branch): trained ones do not
        if pname.split(".")[-1] in ("gain", "skipinit_gain", "gamma"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64))
    model = global_magnitude_mask(model, 0.5, exclude=[w.name for w in prunable_weights(model)][-1:])
    plan: dict[str, tuple[int, int]] = {}
    mods = dict(model.named_modules())
    names = list(mods)
    for i, (n, m) in enumerate(mods.items()):
        if isinstance(getattr(m, "proj", None), nn.Linear) and hasattr(m, "num_heads"):
            d = m.proj.in_features // m.num_heads
            heads = _pick(m.num_heads, frac, g)
            for h in heads:
                m.proj.weight[:, h * d:(h + 1) * d] = 0
            plan[f"{n}.proj"] = (1, len(heads) * d)
        if isinstance(getattr(m, "fc2", None), nn.Linear) and not hasattr(m, "num_heads"):
            cols = _pick(m.fc2.in_features, frac, g)
            m.fc2.weight[:, cols] = 0
            plan[f"{n}.fc2"] = (1, len(cols))
        if isinstance(m, nn.Conv2d) and name in CNN_ROWS and re.search(CNN_ROWS[name], n):
            per = m.out_channels // m.groups
            rows = ([r * per + j for r in _pick(m.groups, frac, g) for j in range(per)] if m.groups > 1 and per > 1
                    else _pick(m.out_channels, frac, g))
            m.weight[rows] = 0
            if m.bias is not None:
                m.bias[rows] = 0
            bn = mods[names[i + 1]] if i + 1 < len(names) else None
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):  # 0 after the activation
                bn.weight[rows], bn.bias[rows] = 0.0, -1.0
            plan[n] = (0, len(rows))
    return model, plan


def _x(b: int, s: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _row(rows: dict, layer: str):
    """The report row of ``layer`` (a weight computed in forward is folded under its parameter's name)."""
    flat = layer.replace(".", "_") + "_weight"
    return rows.get(layer) or next((r for k, r in rows.items() if k.endswith(flat)), None)


@pytest.mark.parametrize("name", list(MODELS))
def test_planted_structure_goes_and_result_is_exact(name):
    torch.set_num_threads(1)
    _, s1, s2, kept = MODELS[name]
    model, plan = planted(name)
    assert plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = minimize(model, (_x(2, s1, 1),), verify=False)  # checked below, at two sizes
    rows = {r.name: r for r in small.sqr_report.rows}
    short = {}
    for layer, (axis, width) in plan.items():
        row = _row(rows, layer)
        assert row is not None, layer
        gone = row.shape_before[axis] - (row.shape_after[axis] if row.shape_after else 0)
        if gone < width and not any(re.search(k, layer) for k in kept):
            short[layer] = (gone, width)
    assert not short, f"planted structure kept (removed, planted): {short}"
    assert small.sqr_report.floats_after < small.sqr_report.floats_before
    for x in (_x(2, s1, 2), _x(3, s2, 3)):
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), rtol=RTOL, atol=ATOL)
