"""Dead residual-stream channels of torchvision Swin V1/V2 through ``PatchMerging``'s ``_patch_merging_pad``.

``_patch_merging_pad`` (``sqr_fx/rules/shape.py``) zero-pads H, W to even sizes and concatenates the
four 2x2 sub-grids on the channel axis: channel j appears 4 times with one id, and only an exactly-zero
constant stays constant (a padded position holds 0). A stream channel j of stage s is planted dead: every
writer writes a constant (patch-embedding conv row / merging reduction row, attention ``proj`` rows and
MLP ``fc2`` rows zero), every reader ignores it (LayerNorm gamma_j = 0, attention keys/values ignore the
constant norm output, the merging LayerNorm's gammas or reduction columns of its 4 copies zero), and the
stream holds 0 where it reaches a merging pad. Checked: equal outputs at the traced size (even maps) and
at sizes giving odd maps at the mergings (padding happens), batch sizes 1-3; strictly smaller; a fixpoint;
the input untouched. Guard: a NON-zero constant stream channel reaching the pad stays (folding it, as a
naive rule would, is exact at even maps and wrong at odd ones).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import swin_transformer as tvs

from sqr_fx import check_equivalence, count_stored_floats, minimize
from sqr_fx.rules import registry
from sqr_fx.values import ChanInfo

F64 = torch.float64
# dead stream channels per stage (widths 16, 32, 64)
J = [[1, 5, 9], [0, 7, 20, 31], [3, 40]]
TRACE = (2, 3, 32, 32)  # patch maps 8x8 -> 4x4 -> 2x2: no padding at the trace
ODD = [(3, 3, 36, 44), (1, 3, 28, 20)]  # 9x11 -> 5x6 -> 3x3 and 7x5 -> 4x3 -> 2x2: padded mergings


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _swin(v2: bool) -> nn.Module:
    torch.manual_seed(0)
    kw = dict(block=tvs.SwinTransformerBlockV2, downsample_layer=tvs.PatchMergingV2) if v2 else {}
    m = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1], num_heads=[2, 4, 4],
                                           window_size=[4, 4], num_classes=10, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LayerNorms at init (1, 0) would hide errors in their betas
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.2, generator=g)
    return m.double().eval()


@torch.no_grad()
def plant(m: nn.Module, v2: bool, stem_value: float = 0.0) -> nn.Module:
    """Stream channels J[s] of stage s dead (module docstring). ``stem_value``: the stream's constant in
    stage 0 (the stem LayerNorm's beta_j; the blocks add 0): non-zero for the guard."""
    feats = m.features
    stages, merges = [feats[i] for i in range(1, len(feats), 2)], [feats[i] for i in range(2, len(feats), 2)]
    conv, stem_ln = feats[0][0], feats[0][2]
    conv.weight[J[0]], conv.bias[J[0]] = 0, 0
    stem_ln.weight[J[0]], stem_ln.bias[J[0]] = 0, stem_value
    for s, stage in enumerate(stages):
        j, C = J[s], stage[0].norm1.normalized_shape[0]
        for blk in stage:
            blk.attn.proj.weight[j], blk.attn.proj.bias[j] = 0, 0  # writers: 0
            blk.mlp[3].weight[j], blk.mlp[3].bias[j] = 0, 0
            blk.norm1.weight[j], blk.norm2.weight[j] = 0, 0
            if v2:  # post-norms over the branch outputs write beta_j into the stream: 0
                blk.norm1.bias[j], blk.norm2.bias[j] = 0, 0
            if not v2 or stem_value:  # keys/values read the stream constant (V1: norm1's beta_j): ignore it
                blk.attn.qkv.weight[C:, j] = 0  # (queries may read it: padded queries are cropped)
        if s < len(merges):
            mg, nxt = merges[s], J[s + 1]
            copies = [k * C + i for k in range(4) for i in j]
            if v2:  # pad -> reduction -> norm
                mg.reduction.weight[nxt] = 0
                mg.norm.weight[nxt], mg.norm.bias[nxt] = 0, 0  # the 4 copies: read as constants, folded
            else:  # pad -> norm -> reduction: norm outputs of the copies are beta: copies 0, 1 unread, 2, 3 fold
                mg.norm.weight[copies] = 0
                mg.reduction.weight[:, copies[: 2 * len(j)]] = 0
                mg.reduction.weight[nxt] = 0
    m.norm.weight[J[-1]] = 0
    return m


def _same(m: nn.Module, s: nn.Module, shapes) -> None:
    for i, shape in enumerate(shapes):
        check_equivalence(m, s, (randn(*shape, seed=10 + i),), rtol=1e-9, atol=1e-11)


def _max_err(m: nn.Module, s: nn.Module, shape) -> float:
    x = randn(*shape, seed=7)
    with torch.no_grad():
        return float((m(x) - s(x)).abs().max())


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _width(s: nn.Module, name: str, axis: int = 0) -> int:
    return dict(s.named_parameters())[name].shape[axis]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_dead_stream_channels_go_through_patch_merging(v2):
    m = plant(_swin(v2), v2)
    before, floats = _snapshot(m), count_stored_floats(m)
    x = randn(*TRACE)
    s = minimize(m, (x,))
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "minimize modified its input"
    assert not [n for n in s.sqr_report.frozen_ops if n.startswith("_patch_merging_pad")]
    widths = [16 - len(J[0]), 32 - len(J[1]), 64 - len(J[2])]
    assert _width(s, "features.0.0.weight") == widths[0]
    for k, (stage, merge) in enumerate([(1, 2), (3, 4)]):
        assert _width(s, f"features.{stage}.0.mlp.0.weight", 1) == widths[k]
        assert _width(s, f"features.{merge}.reduction.weight") == widths[k + 1]
        assert _width(s, f"features.{merge}.reduction.weight", 1) == 4 * widths[k]  # all 4 copies go
    assert _width(s, "features.5.0.mlp.0.weight", 1) == widths[2]
    assert _width(s, "norm.weight") == _width(s, "head.weight", 1) == widths[2]
    assert count_stored_floats(s) < floats
    _same(m, s, [TRACE, *ODD])
    again = minimize(s, (x,))
    assert again.sqr_report.rounds == 0, "a second minimize still removed something"
    assert count_stored_floats(again) == count_stored_floats(s)


def _naive_pad(node, A, a):
    """What the rule must NOT do: treat the 4 copies as carrying the input's constants unchanged."""
    src = A.info(a["x"])
    return ChanInfo.concat([src] * 4, src.dim)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_guard_nonzero_constant_is_not_constant_after_the_pad(v2, monkeypatch):
    """Stage-0 stream channels J[0] hold 0.5 (stem beta_j) and every other condition of the planted test
    holds. Padded positions of the merging hold 0, not 0.5: the channels must stay (stage 1 and 2 still
    shrink), exact at odd maps. A naive pad rule folds them: exact at even maps, wrong at odd ones."""
    m = plant(_swin(v2), v2, stem_value=0.5)
    x = randn(*TRACE)
    s = minimize(m, (x,))
    assert _width(s, "features.0.0.weight") == 16
    assert _width(s, "features.2.reduction.weight", 1) == 64
    assert _width(s, "features.2.reduction.weight") == 32 - len(J[1])
    _same(m, s, [TRACE, *ODD])

    pad = tvs._patch_merging_pad
    monkeypatch.setitem(registry.RULES, pad, dataclasses.replace(registry.RULES[pad], analyze=_naive_pad))
    naive = minimize(m, (x,))
    assert _width(naive, "features.0.0.weight") == 16 - len(J[0])
    assert _max_err(m, naive, TRACE) < 1e-10
    assert all(_max_err(m, naive, shape) > 1e-4 for shape in ODD)
