"""Masked torchvision CNNs: minimize is exact at two resolutions and strictly smaller.

Each model is masked as :func:`helpers.masked_torchvision` describes (global magnitude ~50%, ~20%
whole dead output units and unread input columns, trained-looking BatchNorm, float64). The
minimized graph is traced at 64x64 and checked there and at 96x80 with another batch size: a
folded constant in a zero-padded conv must stay exact at every resolution. Each result is saved and
run in a fresh process where sqr_fx cannot be imported.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from helpers import errors_in_a_fresh_process_without_sqr_fx, masked_torchvision
from sqr_fx import check_equivalence, count_parameters, count_stored_floats, minimize

RTOL, ATOL = 1e-7, 1e-9

FAST = ["resnet18", "mobilenet_v3_small", "mobilenet_v2", "regnet_x_400mf"]
SLOW = ["efficientnet_b0", "vgg11_bn", "resnet50", "densenet121"]
# dense zero-padded 3x3 convs read dead (constant) channels here: the ones-map correction must appear
PADDED_FOLDS = {"resnet18", "resnet50", "vgg11_bn", "densenet121"}


def _x(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def _minimized(name: str):
    model = masked_torchvision(name, seed=0)
    return model, minimize(model, (_x(2, 3, 64, 64, seed=1),))


def _check(name: str, tmp_path) -> None:
    model, small = _minimized(name)
    small.graph.lint()
    for x in (_x(2, 3, 64, 64, seed=2), _x(3, 3, 96, 80, seed=3)):
        check_equivalence(model, small, (x,), rtol=RTOL, atol=ATOL)
    rep = small.sqr_report
    assert rep.floats_after == count_stored_floats(small) < count_stored_floats(model) == rep.floats_before
    assert count_parameters(small) < count_parameters(model)
    assert rep.rounds >= 1 and any(r.out_unused for r in rep.rows) and any(r.in_const for r in rep.rows)
    if name in PADDED_FOLDS:  # the ones-map correction, written out in torch ops (sqr_fx.portable)
        assert any(n.target is torch.ones for n in small.graph.nodes)
    # an ordinary module: saved, it loads and runs in a fresh process where sqr_fx is not importable
    x = _x(2, 3, 72, 64, seed=4)
    errors = errors_in_a_fresh_process_without_sqr_fx({name: (model, small, (x,))}, tmp_path)
    assert errors[name] < 1e-9, errors


@pytest.mark.parametrize("name", FAST)
def test_masked_torchvision_model_is_exact_and_smaller(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_masked_torchvision_model_is_exact_and_smaller_slow(name, tmp_path):
    _check(name, tmp_path)


def test_minimized_model_exports_and_jit_traces():
    model, small = _minimized("mobilenet_v3_small")
    x = _x(2, 3, 64, 64, seed=4)
    exported = torch.export.export(small, (x,)).module()
    check_equivalence(small, exported, (x,), rtol=1e-12, atol=1e-12)
    check_equivalence(model, exported, (x,), rtol=RTOL, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated upstream, still widely called
        traced = torch.jit.trace(small, (x,))
    check_equivalence(small, traced, (x,), rtol=1e-12, atol=1e-12)
    check_equivalence(model, traced, (_x(2, 3, 64, 64, seed=5),), rtol=RTOL, atol=ATOL)
