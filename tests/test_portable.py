"""The result is an ordinary module (``sqr_fx/portable/``, docs/design.md "The returned module").

What is checked, on masked torchvision ResNet-18 / MobileNetV3-small (float64, 64 px, the zoo test's
masking), a small planted torchvision ViT, a small planted Swin and a Hugging Face GPT-2 (the
``torch.export`` front end):

* torch only: no node, module or attribute of the result comes from sqr_fx; ``pickle`` round-trips;
  ``torch.save`` + ``torch.load`` in a fresh process where ``import sqr_fx`` fails gives the original's
  outputs; ``torch.jit.script`` works (torchvision models);
* modules: ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm2d`` ... at the original paths, so
  ``quantize_dynamic`` quantizes the result's Linear layers and forward hooks fire;
* training: ``.train()`` makes BatchNorm update its running statistics like the original's (compared on
  the first BatchNorm, whose input no fold touched), dropout and stochastic depth follow the mode,
  ``.eval()`` is exact again; the trainable tensors are the original's (fold biases are buffers, the
  attention projections one ``in_proj_weight`` / ``qkv.weight`` again);
* the sqr_fx helpers written out in torch ops equal the helpers bit for bit, in every dtype and at
  window-attention map sizes that pad, shift or fit in one window;
* a second ``minimize`` of a result is a fixpoint; ``portable=False`` keeps the helpers (what the
  Squeeze-Release cycle re-minimizes).
"""
from __future__ import annotations

import copy
import functools
import itertools
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from sqr_fx import check_equivalence, count_stored_floats, minimize
from sqr_fx import portable as P
from sqr_fx.attention import self_attention
from sqr_fx.layers import compensated_group_norm, compensated_layer_norm, compensated_rms_norm
from sqr_fx.portable import inline_helpers, sqr_fx_references
from sqr_fx.trace import propagate_shapes
from sqr_fx.window_attention import window_attention

from helpers import errors_in_a_fresh_process_without_sqr_fx, masked_torchvision

F64 = torch.float64
RTOL, ATOL = 1e-7, 1e-9


def _x(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _trainable(m: nn.Module) -> int:
    return sum(p.requires_grad for p in m.parameters())


@functools.lru_cache(maxsize=None)
def _tv(name: str):
    m = masked_torchvision(name, seed=0)
    return m, minimize(m, (_x(2, 3, 64, 64, seed=1),))


def _vit() -> nn.Module:
    """A small torchvision ViT with stream channels, a constant value head and dead MLP units planted."""
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                             mlp_dim=128, num_classes=10).double().eval()
    J = [0, 1, 2]
    with torch.no_grad():
        nn.init.normal_(m.heads.head.weight)
        m.conv_proj.weight[J], m.conv_proj.bias[J] = 0, 0
        m.class_token[..., J], m.encoder.pos_embedding[..., J] = 0.0, 0.25
        for layer in m.encoder.layers:
            a = layer.self_attention
            a.in_proj_weight[:, J] = 0
            a.in_proj_weight[2 * 64: 2 * 64 + 16] = 0
            a.out_proj.weight[J], a.out_proj.bias[J] = 0, 0
            layer.mlp[0].weight[:, J] = 0
            layer.mlp[0].weight[:40] = 0
            layer.mlp[3].weight[J], layer.mlp[3].bias[J] = 0, 0
        m.heads.head.weight[:, J] = 0
    return m


def _swin() -> nn.Module:
    from torchvision.models import swin_transformer as tvs

    from test_window_attention import _attns, _swin as small_swin, plant_constant_stream_reads, plant_heads

    m = small_swin(False)
    g = torch.Generator().manual_seed(0)
    for attn in _attns(m):
        plant_heads(attn, g, cosine=False)
    for block in (b for b in m.modules() if isinstance(b, tvs.SwinTransformerBlock)):
        plant_constant_stream_reads(block, g)
    return m


# ---- the helpers in torch ops ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_norm_ops_equal_the_helpers_bit_for_bit(dtype):
    x, w, b = _x(3, 4, 6, seed=1, dtype=dtype), _x(6, seed=2, dtype=dtype), _x(6, seed=3, dtype=dtype)
    mean, m2 = torch.tensor(0.3, dtype=F64), torch.tensor(1.2, dtype=F64)
    for weight, bias in ((w, b), (None, None)):
        ref = compensated_layer_norm(x, weight, bias, 9, mean, m2, 1e-5)
        got = P.layer_norm_ops(x, weight, bias, 9, mean, m2, 1e-5)
        assert got.dtype == ref.dtype == dtype and torch.equal(got, ref)
    for eps in (None, 1e-6):
        ss = torch.tensor(2.0)
        assert torch.equal(P.rms_norm_ops(x, w, 9, ss, eps), compensated_rms_norm(x, w, 9, ss, eps))
    gi, cnt = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 2, 1])
    gm, gm2 = _x(3, seed=4), _x(3, seed=5).abs()
    for shape in [(2, 5, 3, 4), (2, 5), (2, 5, 3, 2, 2)]:
        xg = _x(*shape, seed=6, dtype=dtype)
        for weight, bias in ((_x(5, seed=9, dtype=dtype), _x(5, seed=10, dtype=dtype)), (None, None)):
            ref = compensated_group_norm(xg, weight, bias, gi, 3, cnt, gm, gm2, 1e-5)
            assert torch.equal(P.group_norm_ops(xg, weight, bias, gi, 3, 3, cnt, gm, gm2, 1e-5), ref)


def test_attention_ops_equal_the_helpers_bit_for_bit():
    E, H = 8, 2
    ts = [_x(6, E, seed=1), _x(6, seed=2), _x(6, E, seed=3), _x(6, seed=4), _x(4, E, seed=5), _x(4, seed=6),
          _x(5, 4, seed=7), _x(5, seed=8)]
    for rank, batch_first in itertools.product((2, 3), (True, False)):
        x = _x(3, 7, E, seed=9) if rank == 3 else _x(7, E, seed=9)
        ref = self_attention(x, *ts, H, 0.5, batch_first)
        assert torch.equal(P.self_attention_ops(x, *ts, H, 0.5, batch_first, rank), ref)
    C, nh = 8, 2
    for cosine, shift in itertools.product((False, True), (0, 2)):
        ts = [_x(6, C, seed=1), _x(6, seed=2), _x(6, C, seed=3), _x(6, seed=4), _x(4, C, seed=5), _x(4, seed=6),
              _x(5, 4, seed=7), _x(5, seed=8), _x(1, nh, 16, 16, seed=9)]
        ls, scale = (_x(nh, 1, 1, seed=10), None) if cosine else (None, 0.5)
        # a multiple of the window, padded windows, one window (no shift), one window wide only
        for shape in [(2, 8, 8, C), (3, 6, 9, C), (1, 3, 2, C), (1, 4, 13, C), (2, 5, 4, C)]:
            x = _x(*shape, seed=11)
            ref = window_attention(x, *ts, [4, 4], nh, [shift, shift], scale, ls)
            got = P.window_attention_ops(x, *ts, [4, 4], nh, [shift, shift], scale, ls)
            assert torch.equal(got, ref), (cosine, shift, shape)
    x = _x(2, 3, 5, 7)
    assert torch.equal(P.ones_map_ops(x, 2), torch.ones(1, 1, 5, 7, dtype=F64))


class _Helpers(nn.Module):
    """Calls every sqr_fx helper, as a minimized graph does (they stay one node each in a symbolic trace)."""

    def __init__(self):
        super().__init__()
        E, C = 8, 6
        g = torch.Generator().manual_seed(0)
        r = lambda *s: nn.Parameter(torch.randn(*s, generator=g, dtype=F64))  # noqa: E731
        self.ln = nn.Module()
        self.ln.weight, self.ln.bias = r(E), r(E)
        self.register_buffer("ln_mean", torch.tensor(0.4, dtype=F64))
        self.register_buffer("ln_m2", torch.tensor(2.0, dtype=F64))
        self.register_buffer("rms_sumsq", torch.tensor(3.0, dtype=F64))
        self.attn = nn.Module()
        for p, n in (("q", 6), ("k", 6), ("v", 4)):
            setattr(self.attn, f"sqr_fx_{p}_weight", r(n, E))
            setattr(self.attn, f"sqr_fx_{p}_bias", r(n))
        self.attn.out_proj = nn.Module()
        self.attn.out_proj.weight, self.attn.out_proj.bias = r(C, 4), r(C)
        self.qkv = nn.Module()
        for p, n in (("q", 4), ("k", 4), ("v", 4)):
            setattr(self.qkv, f"{p}_weight", r(n, C))
            setattr(self.qkv, f"{p}_bias", r(n))
        self.proj = nn.Module()
        self.proj.weight = r(C, 4)
        self.register_buffer("proj_folded", torch.randn(C, generator=g, dtype=F64))
        self.rpb = r(1, 2, 16, 16)
        self.conv_w = r(5, C, 3, 3)
        self.register_buffer("kernel", torch.randn(5, 1, 3, 3, generator=g, dtype=F64))
        self.gn = nn.Module()
        self.gn.weight, self.gn.bias = r(5), r(5)
        self.register_buffer("gi", torch.tensor([0, 0, 1, 2, 2]))
        self.register_buffer("cnt", torch.tensor([1, 2, 1]))
        self.register_buffer("gmean", torch.randn(3, generator=g, dtype=F64))
        self.register_buffer("gm2", torch.rand(3, generator=g, dtype=F64))

    def forward(self, x):  # [B, T=16, 8]
        # each helper through its module's global: the name torch.fx.wrap patches, as in the rewrite's graphs
        L, A = sys.modules["sqr_fx.layers"], sys.modules["sqr_fx.attention"]
        W, O = sys.modules["sqr_fx.window_attention"], sys.modules["sqr_fx.rules.weighted"]
        y = L.compensated_layer_norm(x, self.ln.weight, self.ln.bias, 11, self.ln_mean, self.ln_m2, 1e-5)
        y = L.compensated_rms_norm(y, None, 10, self.rms_sumsq, None)
        a = self.attn
        y = A.self_attention(y, a.sqr_fx_q_weight, a.sqr_fx_q_bias, a.sqr_fx_k_weight, a.sqr_fx_k_bias,
                             a.sqr_fx_v_weight, a.sqr_fx_v_bias, a.out_proj.weight, a.out_proj.bias, 2, 0.25, True)
        img = y.reshape(y.shape[0], 4, 4, 6)
        q = self.qkv
        img = W.window_attention(img, q.q_weight, q.q_bias, q.k_weight, q.k_bias, q.v_weight, q.v_bias,
                                 self.proj.weight, self.proj_folded, self.rpb, [4, 4], 2, [2, 2], 0.5)
        img = img.permute(0, 3, 1, 2)
        z = F.conv2d(img, self.conv_w, None, 1, 1) + F.conv2d(O.ones_map(img), self.kernel, None, 1, 1)
        return L.compensated_group_norm(z, self.gn.weight, self.gn.bias, self.gi, 3, self.cnt, self.gmean, self.gm2)


def test_inlined_helpers_pickle_script_and_follow_the_dtype():
    x = _x(2, 16, 8, seed=1)
    gm = fx.symbolic_trace(_Helpers())
    propagate_shapes(gm, (x,))
    before = copy.deepcopy(gm)
    assert len(sqr_fx_references(gm)) == 6
    assert inline_helpers(gm) == []
    names = {n for n, _ in gm.named_parameters()}
    assert {"attn.in_proj_weight", "attn.in_proj_bias", "qkv.weight", "qkv.bias"} <= names
    assert not any("sqr_fx_q" in n or n.startswith("qkv.q_") for n in names)
    assert torch.equal(gm(x), before(x))
    assert torch.equal(pickle.loads(pickle.dumps(gm))(x), before(x))
    assert torch.equal(torch.jit.script(gm)(x), before(x))
    # the statistics dtype follows the module's dtype as the helpers' does (float32 for half)
    assert torch.equal(copy.deepcopy(gm).float()(x.float()), copy.deepcopy(before).float()(x.float()))
    half = copy.deepcopy(gm).to(torch.bfloat16)(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.equal(half, copy.deepcopy(before).to(torch.bfloat16)(x.bfloat16()))


# ---- torchvision CNNs ---------------------------------------------------------------------------------------
def test_resnet18_is_torch_only_with_its_modules():
    m, s = _tv("resnet18")
    assert sqr_fx_references(s) == []
    assert type(s.fc) is nn.Linear and type(s.conv1) is nn.Conv2d and type(s.bn1) is nn.BatchNorm2d
    assert type(s.get_submodule("layer4.1.bn2")) is nn.BatchNorm2d
    assert s.bn1.momentum == m.bn1.momentum and s.bn1.num_features == s.bn1.weight.shape[0] < 64
    # the ones-map fold stays functional next to its module; a fold into a conv without bias is that conv's
    # bias, a buffer (fused into the conv's kernel)
    assert any(n.target is torch.ones for n in s.graph.nodes)
    folded = [n for n, mod in s.named_modules() if isinstance(mod, nn.Conv2d) and "bias" in mod._buffers]
    assert folded and not any(n.endswith("weight_bias") for n, _ in s.named_parameters())
    assert _trainable(s) == _trainable(m) == 62
    x = _x(3, 3, 72, 64, seed=2)
    ref = m(x)
    torch.testing.assert_close(pickle.loads(pickle.dumps(s))(x), ref, rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(s)(x), ref, rtol=RTOL, atol=ATOL)
    back = pickle.loads(pickle.dumps(s))
    assert back.sqr_report.ratio == s.sqr_report.ratio  # a types.SimpleNamespace where sqr_fx is absent


def test_resnet18_quantize_dynamic_and_forward_hook():
    m, s = _tv("resnet18")
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(s).float(), {nn.Linear}, dtype=torch.qint8)
    assert type(q.fc) is torch.ao.nn.quantized.dynamic.Linear
    x = _x(2, 3, 64, 64, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(q(x.float()).double(), m(x), rtol=0.1, atol=0.1)
    seen = []
    handle = s.get_submodule("fc").register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    s(x)
    handle.remove()
    assert seen == [(2, 10)]


def _kept(small: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Positions of ``small``'s entries in ``full`` (distinct random values)."""
    return [int((full == v).nonzero()[0, 0]) for v in small]


def test_resnet18_train_mode_updates_batch_norm_like_the_original():
    """A train-mode forward updates the restored BatchNorm like the original's: exactly so for the first one,
    whose input is the image (deeper ones see folded constants at their eval values, docs/design.md)."""
    m, s = _tv("resnet18")
    mt, st = copy.deepcopy(m).train(), copy.deepcopy(s).train()
    assert st.bn1.training and st.get_submodule("layer3.0.bn2").training
    kept = _kept(s.bn1.running_var, m.bn1.running_var)
    x = _x(4, 3, 64, 64, seed=4)
    mt(x), st(x)
    assert not torch.equal(st.bn1.running_mean, s.bn1.running_mean)
    torch.testing.assert_close(st.bn1.running_mean, mt.bn1.running_mean[kept], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st.bn1.running_var, mt.bn1.running_var[kept], rtol=1e-12, atol=1e-12)
    assert int(st.bn1.num_batches_tracked) == int(mt.bn1.num_batches_tracked) == 1
    back = copy.deepcopy(s).train().eval()  # train() and eval() again: the eval function, exactly
    check_equivalence(m, back, (_x(2, 3, 80, 72, seed=5),), rtol=RTOL, atol=ATOL)
    loss = st(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in st.parameters())


def test_resnet18_result_is_a_fixpoint():
    _, s = _tv("resnet18")
    again = minimize(s, (_x(2, 3, 64, 64, seed=1),))
    assert again.sqr_report.rounds == 0 and count_stored_floats(again) == count_stored_floats(s)
    assert sqr_fx_references(again) == [] and _trainable(again) == _trainable(s)


def test_mobilenet_v3_small_trains_like_the_original():
    m, s = _tv("mobilenet_v3_small")
    assert sqr_fx_references(s) == [] and _trainable(s) == _trainable(m)
    assert type(s.get_submodule("classifier.3")) is nn.Linear and type(s.get_submodule("classifier.2")) is nn.Dropout
    assert all(type(mod) is not nn.Module for _, mod in s.named_modules() if mod._parameters)
    x = _x(2, 3, 64, 64, seed=6)
    st = copy.deepcopy(s).train()
    torch.manual_seed(0)
    assert not torch.equal(st(x), st(x))  # dropout is live in train mode (and BatchNorm updated its statistics)
    assert not torch.equal(st.get_submodule("features.0.1").running_mean,
                           s.get_submodule("features.0.1").running_mean)
    torch.testing.assert_close(copy.deepcopy(s).train().eval()(x), m(x), rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(s)(x), m(x), rtol=RTOL, atol=ATOL)


def test_stochastic_depth_and_dropout_follow_the_mode():
    """torchvision's StochasticDepth is traced through into ``stochastic_depth(..., training=False)``: it is
    the module again. An ``nn.Dropout`` stays a module; ``F.dropout(x, p, self.training)`` is traced with
    the mode baked in and stays off (docs/design.md)."""
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 6), nn.Linear(6, 3)
            self.sd, self.drop = StochasticDepth(0.5, "row"), nn.Dropout(0.5)
            with torch.no_grad():
                self.fc1.weight[:3], self.fc1.bias[:3] = 0, -1.0  # dead units

        def forward(self, x):
            x = x + self.sd(self.fc2(torch.relu(self.fc1(x))))
            return self.head(self.drop(x))

    m = Block().double().eval()
    s = minimize(m, (_x(8, 6),))
    assert s.fc1.weight.shape == (5, 6) and type(s.sd) is StochasticDepth and type(s.drop) is nn.Dropout
    x = _x(64, 6, seed=1)
    torch.testing.assert_close(s(x), m(x), rtol=RTOL, atol=ATOL)
    s.train()
    torch.manual_seed(0)
    a, b = s(x), s(x)
    assert not torch.equal(a, b)
    s.sd.p = 1.0  # every row's residual branch dropped, dropout off: the head sees x alone
    s.drop.p = 0.0
    torch.testing.assert_close(s(x), s.head(x))


def test_fold_into_a_layer_without_bias_is_a_buffer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)
            with torch.no_grad():
                self.a.weight[:2], self.a.bias[:2] = 0, 0.7  # constant units: folded into b

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    m = Net().double().eval()
    s = minimize(m, (_x(5, 4),))
    # the folded constant is b's bias, a buffer: fused into the layer's kernel, and not trainable
    assert type(s.b) is nn.Linear and s.b.weight.shape == (3, 4)
    assert "bias" in s.b._buffers and "bias" not in dict(s.b.named_parameters())
    assert _trainable(s) == _trainable(m) == 3
    assert not any(n.target is torch.add for n in s.graph.nodes)
    check_equivalence(m, s, (_x(7, 4, seed=1),), rtol=1e-12, atol=1e-12)
    sc = torch.jit.script(s)
    torch.testing.assert_close(sc(_x(3, 4, seed=2)), m(_x(3, 4, seed=2)), rtol=1e-12, atol=1e-12)
    again = minimize(s, (_x(5, 4),))  # a buffer bias is read back as the layer's bias
    assert type(again.b) is nn.Linear and "bias" in again.b._buffers
    check_equivalence(m, again, (_x(7, 4, seed=1),), rtol=1e-12, atol=1e-12)


def test_a_result_of_the_export_front_end_trains_too():
    """``ExportedProgram.module()`` refuses ``train()``; the result of minimizing it has modules and does not."""
    from test_frontends import _cnn

    m = _cnn()
    gm = torch.export.export(m, (_x(2, 3, 16, 16),)).module()
    s = minimize(gm, (_x(2, 3, 16, 16),))
    assert type(s.get_submodule("1")) is nn.BatchNorm2d and not s.training
    s.train()
    s(_x(2, 3, 16, 16, seed=1))  # (a static export: its guard wants batch 2)
    assert int(s.get_submodule("1").num_batches_tracked) == 1
    s.eval()
    assert pickle.loads(pickle.dumps(s)) is not None


# ---- transformers --------------------------------------------------------------------------------------------
def test_vit_is_torch_only_with_the_original_trainable_tensors():
    m = _vit()
    x = _x(2, 3, 32, 32)
    s = minimize(m, (x,))
    assert sqr_fx_references(s) == [] and s.sqr_report.ratio > 1.2
    assert _trainable(s) == _trainable(m)
    p = dict(s.named_parameters())
    stem = "encoder.layers.encoder_layer_0.self_attention"
    assert p[f"{stem}.in_proj_weight"].shape == (3 * 48, 61) and p[f"{stem}.in_proj_bias"].shape == (3 * 48,)
    x2 = _x(3, 3, 32, 32, seed=1)
    torch.testing.assert_close(s(x2), m(x2), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.jit.script(s)(x2), m(x2), rtol=RTOL, atol=ATOL)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(s).float(), {nn.Linear}, dtype=torch.qint8)
    linears = [n for n, mod in s.named_modules() if type(mod) is nn.Linear]
    assert len(linears) == len([mod for mod in m.modules() if type(mod) is nn.Linear]) == 5
    assert all(type(q.get_submodule(n)) is torch.ao.nn.quantized.dynamic.Linear for n in linears)
    assert minimize(s, (x,)).sqr_report.rounds == 0


def test_portable_false_keeps_the_helpers_for_a_second_minimize():
    m = _vit()
    x = _x(2, 3, 32, 32)
    s = minimize(m, (x,), portable=False)
    targets = {n.target for n in s.graph.nodes}
    assert compensated_layer_norm in targets and self_attention in targets
    assert any("sqr_fx_q_weight" in n for n, _ in s.named_parameters())
    assert type(s.heads.head) is nn.Linear  # modules and buffers either way
    again = minimize(s, (x,), portable=False)
    assert again.sqr_report.rounds == 0 and count_stored_floats(again) == count_stored_floats(s)
    check_equivalence(m, again, (_x(3, 3, 32, 32, seed=2),), rtol=RTOL, atol=ATOL)
    assert inline_helpers(again) == []  # what the Squeeze-Release cycle does to its deliverable
    check_equivalence(m, again, (_x(3, 3, 32, 32, seed=2),), rtol=RTOL, atol=ATOL)


def test_swin_window_attention_is_torch_only():
    m = _swin()
    s = minimize(m, (_x(2, 3, 32, 32),))
    assert sqr_fx_references(s) == [] and _trainable(s) == _trainable(m)
    assert "features.1.0.attn.qkv.weight" in dict(s.named_parameters())
    sc = torch.jit.script(s)
    for shape in [(2, 3, 32, 32), (3, 3, 40, 24), (1, 3, 12, 20)]:  # the last: one window, no shift
        x = _x(*shape, seed=3)
        torch.testing.assert_close(s(x), m(x), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(sc(x), m(x), rtol=RTOL, atol=ATOL)


# ---- a fresh process without sqr_fx ---------------------------------------------------------------------------


def test_results_load_in_a_fresh_process_without_sqr_fx(tmp_path):
    models = {}
    for name in ("resnet18", "mobilenet_v3_small"):
        m, s = _tv(name)
        models[name] = (m, s, (_x(3, 3, 72, 64, seed=7),))
    vit = _vit()
    models["vit"] = (vit, minimize(vit, (_x(2, 3, 32, 32),)), (_x(3, 3, 32, 32, seed=7),))
    swin = _swin()
    models["swin"] = (swin, minimize(swin, (_x(2, 3, 32, 32),)), (_x(2, 3, 40, 24, seed=7),))
    try:
        import transformers as tf

        from test_transformers import _gpt2, _ids, _plant_gpt2_stream

        gpt2 = _gpt2(tf, tie=True)
        _plant_gpt2_stream(gpt2)
        small = minimize(gpt2, (_ids(2, 12),))
        assert small.sqr_report.frontend == "export"  # (torch.export's input guard made picklable)
        models["gpt2"] = (gpt2, small, (_ids(3, 9, seed=1),))
    except ImportError:
        pass
    for name, (m, s, inputs) in models.items():
        assert sqr_fx_references(s) == [], name
    errors = errors_in_a_fresh_process_without_sqr_fx({k: (m, s, x) for k, (m, s, x) in models.items()}, tmp_path)
    assert all(e < 1e-9 for e in errors.values()), errors


def test_an_aten_group_norm_stays_functional_where_nn_group_norm_would_refuse_the_input():
    """``nn.GroupNorm`` (through ``F.group_norm``) refuses an input with one value per group; the exported
    graph's ``aten.group_norm`` computes it. Found by the fuzzer (case seed 424243273244)."""
    net = nn.Sequential(nn.Conv1d(3, 3, 1), nn.GroupNorm(3, 3), nn.Conv1d(3, 4, 1)).double().eval()
    with torch.no_grad():
        net[2].weight[:, 1] = 0
    ep = torch.export.export(net, (_x(2, 3, 1),), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
    s = minimize(ep, (_x(2, 3, 1),))
    x = _x(1, 3, 1, seed=1)
    torch.testing.assert_close(s(x), ep(x), rtol=RTOL, atol=ATOL)


class _Scaled(nn.Module):
    """A container of its own type with a non-persistent buffer, read through ``get_attr``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)


def test_the_pass_compiles_once_and_returns_a_plain_graph_module():
    """Inside the pass graph modules compile lazily (torch's ``_LazyGraphModule``); ``compiled`` turns the
    result into an ordinary GraphModule over the SAME modules: container types, non-persistent buffers and
    the graph stay, the code is the graph's as it is now, and it scripts and pickles."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    from sqr_fx.trace import compiled, lazy_graph_module

    root = nn.Module()
    root.c = _Scaled()
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(F.linear, (x, g.get_attr("c.lin.weight"), g.get_attr("c.lin.bias")))
    g.output(g.call_function(torch.mul, (y, g.get_attr("c.scale"))))
    lazy = lazy_graph_module(root, g, "Net")
    assert isinstance(lazy, _LazyGraphModule)
    lazy.c = root.c  # (GraphModule's constructor copies containers as plain Modules: the pass installs its own)
    with g.inserting_before(g.output_node()):  # an edit after construction: the code must follow it
        z = g.call_function(torch.relu, (g.output_node().args[0],))
    g.output_node().args = (z,)
    lazy.recompile()
    out = compiled(lazy)
    assert type(out).__name__ == "Net" and not isinstance(out, _LazyGraphModule)
    assert type(out.c) is _Scaled and out.c.lin is root.c.lin and out.graph is g
    assert "scale" not in out.state_dict() and "c.scale" not in out.state_dict()
    assert "relu" in out.code
    inp = torch.randn(2, 4)
    want = torch.relu(F.linear(inp, root.c.lin.weight, root.c.lin.bias) * 2)
    torch.testing.assert_close(out(inp), want)
    torch.testing.assert_close(torch.jit.script(out)(inp), want)
    torch.testing.assert_close(pickle.loads(pickle.dumps(out))(inp), want)

    m = masked_torchvision("resnet18")
    small = minimize(m, (torch.randn(1, 3, 64, 64, dtype=torch.float64),))
    assert not isinstance(small, _LazyGraphModule) and isinstance(small, fx.GraphModule)
    assert type(small).forward is not _LazyGraphModule._lazy_forward


def test_the_report_gives_the_pass_cpu_seconds_by_phase():
    import time

    m = masked_torchvision("resnet18")
    t0 = time.process_time()
    small = minimize(m, (torch.randn(1, 3, 64, 64, dtype=torch.float64),), verify=False)
    total = time.process_time() - t0
    ph = small.sqr_report.phase_seconds
    assert small.sqr_report.rounds >= 1
    assert {"trace", "analysis", "plan", "rewrite", "shapes", "finish"} <= set(ph)
    assert all(v >= 0 for v in ph.values()) and ph["trace"] > 0 and sum(ph.values()) <= total
    assert "CPU seconds by phase: trace" in str(small.sqr_report)
