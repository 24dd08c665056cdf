"""minimize inside pipelines: ExportedProgram in/out, the torch.compile backend, the pass-manager pass,
the CLI on saved programs, keyword examples. Each entry point: exact at two shapes and smaller."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.fx.passes.infra.pass_manager import PassManager

import sqr_fx
from sqr_fx import MinimizePass, SqrFxError, check_equivalence, minimize
from sqr_fx.cli import main as cli

from helpers import masked_torchvision

RTOL, ATOL = 1e-7, 1e-9


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@functools.lru_cache(maxsize=1)
def _resnet18_program():
    m = masked_torchvision("resnet18", seed=0)
    ep = torch.export.export(m, (_x(2, 3, 64, 64),), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
    return m, ep


def test_exported_program_in_exported_program_out(tmp_path):
    m, ep = _resnet18_program()
    small = minimize(ep)  # example inputs: the program's own
    assert isinstance(small, torch.export.ExportedProgram)
    assert small.sqr_report.ratio > 1.3 and not small.sqr_report.fixed_shapes
    assert small.sqr_report.rounds <= 3  # export's guard reads the input: the input gather is made once
    assert minimize(small.module(), (_x(2, 3, 64, 64),)).sqr_report.rounds == 0  # a fixpoint
    assert sorted(map(str, small.range_constraints.values())) == sorted(map(str, ep.range_constraints.values()))
    for shape in [(3, 3, 64, 64), (1, 3, 96, 80)]:
        check_equivalence(m, small.module(), (_x(*shape, seed=1),), rtol=RTOL, atol=ATOL)
    torch.export.save(small, tmp_path / "small.pt2")
    back = torch.export.load(tmp_path / "small.pt2")
    check_equivalence(m, back.module(), (_x(2, 3, 72, 72, seed=2),), rtol=RTOL, atol=ATOL)
    core = small.run_decompositions()
    check_equivalence(m, core.module(), (_x(2, 3, 64, 64, seed=3),), rtol=RTOL, atol=ATOL)


def test_cli_minimizes_a_saved_program(tmp_path, capsys):
    m, ep = _resnet18_program()
    torch.export.save(ep, tmp_path / "in.pt2")
    assert cli(["minimize", str(tmp_path / "in.pt2"), "-o", str(tmp_path / "out.pt2"), "--quiet"]) == 0
    assert "x smaller" in capsys.readouterr().out
    small = torch.export.load(tmp_path / "out.pt2")
    check_equivalence(m, small.module(), (_x(3, 3, 80, 64, seed=4),), rtol=RTOL, atol=ATOL)
    assert cli(["minimize", str(tmp_path / "missing.pt2"), "-o", str(tmp_path / "x.pt2")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_minimizes_a_saved_module(tmp_path, capsys):
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[0].weight[:4], net[0].bias[:4] = 0, -1.0
    torch.save(net, tmp_path / "net.pt")
    args = ["minimize", str(tmp_path / "net.pt"), "-o", str(tmp_path / "net.pt2"), "--module"]
    assert cli(args) == 1 and "--input-shape" in capsys.readouterr().err
    assert cli(args + ["--input-shape", "4,6"]) == 0
    small = torch.export.load(tmp_path / "net.pt2").module()
    assert small.get_parameter("0.weight").shape == (4, 6)
    check_equivalence(net, small, (torch.randn(9, 6),))


@pytest.mark.parametrize("next_backend", ["eager", "aot_eager"])
def test_compile_backend_is_exact_at_two_shapes(next_backend):
    m = masked_torchvision("resnet18", seed=0)
    reports = []
    torch._dynamo.reset()
    fast = torch.compile(m, backend=sqr_fx.make_backend(next_backend=next_backend, callback=reports.append))
    for shape in [(2, 3, 64, 64), (3, 3, 80, 72)]:
        check_equivalence(m, fast, (_x(*shape, seed=5),), rtol=RTOL, atol=ATOL)
    assert reports and all(r.ratio > 1.3 for r in reports)
    assert sqr_fx.last_report() is reports[-1]
    torch._dynamo.reset()


def test_compile_backend_by_name_with_inductor():
    """``backend="sqr_fx"`` (registered through the package's entry point), then inductor."""
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[0].weight[:10], net[0].bias[:10] = 0, -1.0
    torch._dynamo.reset()
    fast = torch.compile(net, backend="sqr_fx")
    for b in (4, 7):
        check_equivalence(net, fast, (torch.randn(b, 6),), rtol=1e-4, atol=1e-5)
    assert sqr_fx.last_report().params_after < sqr_fx.last_report().params_before
    torch._dynamo.reset()


def test_minimize_pass_in_a_pass_manager():
    m = masked_torchvision("resnet18", seed=0)
    gm = torch.fx.symbolic_trace(m)
    p = MinimizePass((_x(2, 3, 64, 64),))
    result = PassManager([p])(gm)
    assert result.modified and p.report.ratio > 1.3
    assert result.graph_module is not gm
    check_equivalence(m, result.graph_module, (_x(3, 3, 72, 64, seed=6),), rtol=RTOL, atol=ATOL)


def test_keyword_example_inputs():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)
            with torch.no_grad():
                self.a.weight[:3], self.a.bias[:3] = 0, -1.0

        def forward(self, *, image, scale):
            return self.b(torch.relu(self.a(image))) * scale

    m = Kw().double().eval()
    small = minimize(m, {"image": _x(3, 4), "scale": _x(3, 1)})
    assert small.get_parameter("model.a.weight").shape == (3, 4)
    x, s = _x(5, 4, seed=1), _x(5, 1, seed=2)
    torch.testing.assert_close(small(image=x, scale=s), m(image=x, scale=s))


def test_missing_example_inputs_and_meta_weights_are_clear_errors():
    net = nn.Linear(3, 2).eval()
    with pytest.raises(SqrFxError, match="example_inputs are needed"):
        minimize(net)
    with torch.device("meta"):
        meta = nn.Linear(3, 2).eval()
    with pytest.raises(SqrFxError, match="meta device"):
        minimize(meta, (torch.randn(2, 3),))


def test_hf_gpt2_program():
    tf = pytest.importorskip("transformers")
    from test_transformers import _gpt2, _ids

    m = _gpt2(tf, tie=False)
    ep = torch.export.export(m, (_ids(2, 12),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    small = minimize(ep)
    assert small.sqr_report.ratio > 1.2
    for b, t in [(2, 12), (3, 7)]:
        ids = _ids(b, t, seed=t)
        torch.testing.assert_close(small.module()(ids).logits, m(ids).logits, rtol=1e-9, atol=1e-9)


def test_hf_gpt2_through_the_cli_the_pass_manager_and_the_compile_backend(tmp_path, capsys):
    """GPT-2 (Hugging Face, planted dead MLP units): the saved program through the CLI (re-saved, re-loaded),
    its module through ``MinimizePass``, the model through ``torch.compile(backend=sqr_fx)``; each smaller and
    exact at two (batch, length) shapes."""
    tf = pytest.importorskip("transformers")
    from test_transformers import _gpt2, _ids

    m = _gpt2(tf, tie=False)
    ep = torch.export.export(m, (_ids(2, 12),), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},))
    torch.export.save(ep, tmp_path / "gpt2.pt2")
    assert cli(["minimize", str(tmp_path / "gpt2.pt2"), "-o", str(tmp_path / "small.pt2"), "--quiet"]) == 0
    assert "x smaller" in capsys.readouterr().out
    by_cli = torch.export.load(tmp_path / "small.pt2").module()
    p = MinimizePass((_ids(2, 12),))
    by_pass = PassManager([p])(ep.module()).graph_module
    assert p.report.ratio > 1.2
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=sqr_fx.make_backend(next_backend="eager", callback=reports.append))

    def logits(out):
        return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]

    for b, t in [(2, 12), (3, 7)]:
        ids = _ids(b, t, seed=t)
        want = m(ids).logits
        for result in (by_cli, by_pass, compiled):
            torch.testing.assert_close(logits(result(ids)), want, rtol=1e-9, atol=1e-9)
    assert reports and all(r.ratio > 1.2 for r in reports)
    torch._dynamo.reset()


@pytest.mark.slow
def test_convnext_tiny_through_every_entry_point(tmp_path, capsys):
    """ConvNeXt-T with planted dead stream channels (LayerNorms, residual stream): the ExportedProgram
    entry point (saved, loaded, minimized by the CLI too), the compile backend and the pass manager.
    Each exact at two shapes and smaller."""
    from test_transformers import planted_convnext_tiny

    m, _ = planted_convnext_tiny()
    m = m.eval()
    shapes = [(2, 3, 64, 64), (3, 3, 96, 80)]
    ep = torch.export.export(m, (_x(*shapes[0]),), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
    small = minimize(ep)
    assert isinstance(small, torch.export.ExportedProgram) and small.sqr_report.ratio > 1.1
    torch.export.save(ep, tmp_path / "in.pt2")
    assert cli(["minimize", str(tmp_path / "in.pt2"), "-o", str(tmp_path / "out.pt2"), "--quiet"]) == 0
    assert "x smaller" in capsys.readouterr().out
    by_cli = torch.export.load(tmp_path / "out.pt2")
    p = MinimizePass((_x(*shapes[0]),))
    by_pass = PassManager([p])(torch.fx.symbolic_trace(m)).graph_module
    assert p.report.ratio > 1.1
    reports = []
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=sqr_fx.make_backend(next_backend="eager", callback=reports.append))
    for i, shape in enumerate(shapes):
        x = _x(*shape, seed=10 + i)
        for result in (small.module(), by_cli.module(), by_pass, compiled):
            check_equivalence(m, result, (x,), rtol=1e-8, atol=1e-9)
    assert reports and all(r.ratio > 1.1 for r in reports)
    torch._dynamo.reset()


def test_cli_writes_onnx_that_onnxruntime_runs(tmp_path, capsys):
    """The ONNX entry point: a saved program minimized by the CLI with ``--onnx``; onnxruntime runs the
    ONNX file at the traced shape and at another batch and size (dynamic dims kept), matching the original."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = masked_torchvision("resnet18", seed=0).float()
    x = torch.randn(2, 3, 64, 64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
    torch.export.save(ep, tmp_path / "in.pt2")
    args = ["minimize", str(tmp_path / "in.pt2"), "-o", str(tmp_path / "out.pt2"), "--onnx", str(tmp_path / "out.onnx")]
    assert cli(args + ["--quiet"]) == 0
    assert "x smaller" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))
    session = ort.InferenceSession(str(tmp_path / "out.onnx"))
    name = session.get_inputs()[0].name
    for shape in [(2, 3, 64, 64), (3, 3, 80, 72)]:
        xi = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        (got,) = session.run(None, {name: xi.numpy()})
        with torch.no_grad():
            want = m(xi)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    n_in = sum(t.numel() for t in ep.state_dict.values())
    n_out = sum(int(torch.tensor(list(i.dims)).prod()) for i in onnx.load(str(tmp_path / "out.onnx")).graph.initializer)
    assert n_out < n_in


def test_minimize_leaves_the_garbage_collector_as_it_found_it():
    """minimize hides older objects from the collector while it runs (``gc.freeze``) and gives them back;
    a process that froze objects itself (a pre-fork server) or turned the collector off keeps its state."""
    import gc

    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    x = _x(5, 4).float()
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    minimize(m, (x,))
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        minimize(m, (x,))
        # frozen objects that die meanwhile leave the permanent generation, so the count may drop; it
        # never grows (minimize froze nothing) and is not emptied (minimize did not unfreeze).
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        minimize(m, (x,))
        assert not gc.isenabled()
    finally:
        gc.enable()
