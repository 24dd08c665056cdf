"""release(): only the exact zeros inside minimized tensors change, by the promised noise, and the
output change it causes on a calibration batch is measured and small."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sqr_fx
from sqr_fx.prune import prunable_parameters, prune
from sqr_fx.release import output_change, reference_scale, release


def _minimized(seed: int = 0, amount: float = 0.8) -> tuple[nn.Module, torch.Tensor]:
    """A pruned MLP after minimize: smaller tensors that still hold exact zeros inside."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    prune(net, amount, "layer")
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(seed + 1))
    small = sqr_fx.minimize(net, (x,))
    assert small.sqr_report.params_after < small.sqr_report.params_before  # compacted ...
    assert any(bool((p == 0).any()) for p in prunable_parameters(small).values())  # ... with zeros inside
    return small, x


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_release_touches_exactly_the_zeros_inside_minimized_tensors():
    small, x = _minimized()
    before = _state(small)
    shapes = {n: t.shape for n, t in before.items()}
    report = release(small, 0.1, generator=torch.Generator().manual_seed(0), calibration=(x,))
    after = _state(small)
    assert {n: t.shape for n, t in after.items()} == shapes  # nothing grows back
    weights = set(prunable_parameters(small))
    released = 0
    for n, b in before.items():
        a = after[n]
        if n not in weights:  # biases, gather indices: bit for bit unchanged
            assert torch.equal(a, b), n
            continue
        assert torch.equal(a[b != 0], b[b != 0]), n  # survivors unchanged
        assert bool((a[b == 0] != 0).all()), n  # every exact zero released
        released += int((b == 0).sum())
    assert released == report.released > 0
    assert sum(int((p == 0).sum()) for p in prunable_parameters(small).values()) == 0


@pytest.mark.parametrize("reference", ["energy", "threshold", "rms"])
def test_noise_std_is_the_calibrated_one(reference):
    torch.manual_seed(0)
    lin = nn.Linear(300, 200)
    prune(lin, 0.9)
    w0 = lin.weight.detach().clone()
    ref = reference_scale(w0, reference)
    nz = w0[w0 != 0].abs().double()
    expected = {"energy": float(nz.pow(2).sum().sqrt()) / 54000 ** 0.5, "threshold": float(nz.min()),
                "rms": float(nz.pow(2).mean().sqrt())}[reference]
    assert ref == pytest.approx(expected, rel=1e-12)
    report = release(lin, 0.2, generator=torch.Generator().manual_seed(1), reference=reference)
    noise = lin.weight.detach()[w0 == 0].double()
    t = report.tensors[0]
    assert t.std == pytest.approx(0.2 * ref) and t.released == noise.numel() == 54000
    # 54k Gaussian draws: the sample std is within 2% and the mean within 4 standard errors
    assert float(noise.std()) == pytest.approx(t.std, rel=0.02)
    assert abs(float(noise.mean())) < 4 * t.std / noise.numel() ** 0.5
    if reference == "energy":  # the promise: relative weight perturbation == scale
        assert float(noise.norm() / nz.norm()) == pytest.approx(0.2, rel=0.02)
    if reference in ("energy", "threshold"):  # the noise starts below the pruning line
        assert float(noise.abs().max()) < float(nz.min())


def test_energy_calibration_does_not_grow_with_sparsity():
    """A per-entry reference moves the outputs more the more zeros there are; energy does not."""
    x = torch.randn(256, 400, generator=torch.Generator().manual_seed(0))
    change = {}
    for reference in ("energy", "threshold"):
        for amount in (0.5, 0.98):
            torch.manual_seed(0)
            lin = nn.Linear(400, 50, bias=False)
            prune(lin, amount)
            rep = release(lin, 0.1, generator=torch.Generator().manual_seed(2), reference=reference,
                          calibration=(x,))
            change[reference, amount] = rep.output_change
    assert change["energy", 0.98] == pytest.approx(0.1, rel=0.25)
    assert change["energy", 0.5] == pytest.approx(0.1, rel=0.25)
    assert change["threshold", 0.98] > 3 * change["threshold", 0.5]


def test_function_change_is_measured_small_and_linear_in_scale():
    small, x = _minimized()
    state = _state(small)
    changes = {}
    for scale in (0.05, 0.1):
        small.load_state_dict(state)
        with torch.no_grad():
            y0 = small(x).double()
        rep = release(small, scale, generator=torch.Generator().manual_seed(3), calibration=(x,))
        with torch.no_grad():
            y1 = small(x).double()
        assert rep.output_change == pytest.approx(float((y1 - y0).norm() / y0.norm()), rel=1e-9)
        assert rep.agreement == pytest.approx(float((y1.argmax(1) == y0.argmax(1)).double().mean()))
        changes[scale] = rep.output_change
    assert 0 < changes[0.1] < 0.1 and changes[0.05] < changes[0.1]
    assert rep.agreement >= 0.9


def test_output_change_of_a_linear_map_scales_exactly():
    torch.manual_seed(0)
    lin = nn.Linear(50, 7, bias=False)
    prune(lin, 0.8)
    w0 = lin.weight.detach().clone()
    x = torch.randn(32, 50)
    rel = []
    for scale in (0.1, 0.3):
        with torch.no_grad():
            lin.weight.copy_(w0)
        rel.append(release(lin, scale, generator=torch.Generator().manual_seed(0), calibration=(x,),
                           reference="threshold").output_change)
    assert rel[1] / rel[0] == pytest.approx(3.0, rel=1e-5)  # same draws, noise proportional to scale


def test_deterministic_and_guards():
    a, _ = _minimized()
    b, _ = _minimized()
    release(a, 0.1, generator=torch.Generator().manual_seed(7))
    release(b, 0.1, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    dead = nn.Linear(4, 3)
    with torch.no_grad():
        dead.weight.zero_()
    assert release(dead, 0.1).released == 0 and bool((dead.weight == 0).all())  # no reference: untouched
    with pytest.raises(ValueError):
        release(dead, -1.0)
    with pytest.raises(ValueError):
        reference_scale(torch.ones(2, 2), "median")  # type: ignore[arg-type]


def test_output_change_helper():
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    rel, agree = output_change(y, y * 1.5)
    assert rel == pytest.approx(0.5) and agree == 1.0
