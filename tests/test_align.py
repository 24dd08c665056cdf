"""``minimize(..., align=N)``: every width the pass reduces ends a multiple of N, or as it was.

Keeping a removable channel is exact (an unused one is read by no kept reader, a constant one is then
simply not folded), so the aligned result computes the same function; it keeps every channel the
unaligned result keeps, plus the cheapest removable ones that round each reduced width up. Head-split
tensors align their per-head dims and stay rectangular; ``align=None`` (or 1) is today's pass, bit for bit.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sqr_fx.attention
from helpers import build, cnn_specs, masked_torchvision, mlp_specs
from sqr_fx import SqrFxError, check_equivalence, count_stored_floats, minimize
from test_transformers import ConvNeXtish, Transformer, _tv_vit, assert_same, init_random, randn

RTOL, ATOL = 1e-9, 1e-10


def _x(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every weight matrix / kernel by name."""
    return {k: tuple(v.shape) for k, v in m.named_parameters() if v.dim() >= 2}


def assert_aligned(model: nn.Module, small: nn.Module, n: int, skip: str | None = None) -> int:
    """Both channel dims of every weight (but those whose name has ``skip``): a multiple of ``n`` or the
    original; returns how many shrank."""
    before, shrunk = _shapes(model), 0
    for name, s in _shapes(small).items():
        if name not in before or (skip is not None and skip in name):
            continue
        for d in (0, 1):
            assert s[d] == before[name][d] or s[d] % n == 0, f"{name} dim {d}: {before[name][d]} -> {s[d]}"
            shrunk += s[d] < before[name][d]
    return shrunk


def assert_keeps_more(unaligned: nn.Module, aligned: nn.Module) -> None:
    """The aligned result never removes a channel the unaligned one keeps (per layer: no dim smaller)."""
    a, b = _shapes(unaligned), _shapes(aligned)
    assert a.keys() <= b.keys()
    for name, s in a.items():
        assert all(y >= x for x, y in zip(s, b[name])), f"{name}: unaligned {s}, aligned {b[name]}"


def kernel_shapes(small: nn.Module, *inputs) -> list[list[tuple[int, ...]]]:
    """The q, k, v shapes each sdpa kernel of ``small`` sees on ``inputs`` (after any run-time padding)."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(small).propagate(*inputs)
    return [[tuple(a.meta["tensor_meta"].shape) for a in n.args[:3]] for n in small.graph.nodes
            if "scaled_dot_product_attention" in str(n.target)]


def assert_fixpoint(small, inputs, align):
    again = minimize(small, inputs, align=align)
    assert again.sqr_report.rounds == 0, "a second minimize still removed something"
    assert count_stored_floats(again) == count_stored_floats(small)


# ---- a pruned torchvision ResNet-18 ------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _resnet():
    model = masked_torchvision("resnet18", seed=0)
    x = _x(2, 3, 64, 64, seed=1)
    return model, x, minimize(model, (x,)), minimize(model, (x,), align=8)


def test_resnet18_align8_is_exact_aligned_and_keeps_more():
    model, x, plain, small = _resnet()
    small.graph.lint()
    for xi in (_x(2, 3, 64, 64, seed=2), _x(3, 3, 96, 80, seed=3)):
        check_equivalence(model, small, (xi,), rtol=1e-7, atol=1e-9)
    assert assert_aligned(model, small, 8) > 10
    with pytest.raises(AssertionError):  # the workload has odd widths: alignment has work to do
        assert_aligned(model, plain, 8)
    assert_keeps_more(plain, small)
    rep = small.sqr_report
    assert plain.sqr_report.floats_after < rep.floats_after < rep.floats_before
    assert rep.align == 8 and rep.align_floats > 0
    assert any(r.out_align for r in rep.rows) and any(r.in_align for r in rep.rows)
    assert "aligned to multiples of 8" in str(rep) and "out align" in str(rep)
    assert plain.sqr_report.align == 1 and "align" not in str(plain.sqr_report)
    assert_fixpoint(small, (x,), 8)


# ---- align=None is today's pass ---------------------------------------------------------------------
def _planted_transformer(attention: str = "sdpa") -> Transformer:
    """Two pre-LN blocks, C=24, MLP 40 (13 units dead: 7 constant, 6 unread), 2 heads of 16 dims: query/
    key dims 10 and 11 constant (zero key rows); value dims unread (zero output columns): 13 and 10 in
    block 0, 3 and 3 in block 1."""
    m = Transformer(4, 24, 40, 2, attention=attention, heads=2, dh=16)
    init_random(m, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, b in enumerate(m.blocks):
            b.mlp.fc1.weight[:7] = 0
            b.mlp.fc2.weight[:, 7:13] = 0
            if attention == "sdpa":
                b.attn.k.weight[0:10] = 0
                b.attn.k.weight[16:27] = 0
                b.attn.o.weight[:, 0:(13 if i == 0 else 3)] = 0
                b.attn.o.weight[:, 16:(26 if i == 0 else 19)] = 0
    return m


@pytest.mark.parametrize("align", [None, 1])
def test_no_alignment_is_the_unaligned_pass_bit_for_bit(align):
    m = _planted_transformer("matmul")
    x = randn(2, 5, 4)
    ref, got = minimize(m, (x,)), minimize(m, (x,), align=align)
    assert ref.code == got.code
    a, b = ref.state_dict(), got.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].stride() == b[k].stride() for k in a)
    assert str(ref.sqr_report).split("traced with")[0] == str(got.sqr_report).split("traced with")[0]


@pytest.mark.parametrize("align", [0, -8, 2.5, True, "8"])
def test_align_must_be_a_positive_integer(align):
    with pytest.raises(SqrFxError, match="align"):
        minimize(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), align=align)


# ---- transformer blocks: MLP units, per-head dims, heads rectangular --------------------------------
def test_sdpa_transformer_aligns_per_head_dims_and_stays_rectangular():
    m = _planted_transformer("sdpa")
    x = randn(2, 5, 4)
    plain, small = minimize(m, (x,)), minimize(m, (x,), align=8)
    for xi in (x, randn(3, 7, 4, seed=3)):
        assert_same(m, small, (xi,), rtol=1e-9)
    p, s = _shapes(plain), _shapes(small)
    assert assert_aligned(m, small, 8, skip=".attn.") == 4  # fc1 rows, fc2 columns (the attention: below)
    assert_keeps_more(plain, small)
    # unaligned: rectangular heads of 6 query/key dims (the longer head) and 6 (block 0) or 13 (block 1)
    # value dims; aligned: the same stored widths, and the kernel sees 8 and 8, then 8 and 16 made equal
    # (16: the fused attention kernel needs one head dim for q, k and v), padded at run time
    for i, (vdims, width) in enumerate(((6, 8), (13, 16))):
        blk = f"blocks.{i}"
        assert (p[f"{blk}.attn.q.weight"][0], p[f"{blk}.attn.v.weight"][0]) == (12, 2 * vdims)
        for w in ("q", "k", "v"):
            assert s[f"{blk}.attn.{w}.weight"] == p[f"{blk}.attn.{w}.weight"]
        assert s[f"{blk}.attn.o.weight"] == p[f"{blk}.attn.o.weight"]
        assert (p[f"{blk}.mlp.fc1.weight"][0], s[f"{blk}.mlp.fc1.weight"][0]) == (27, 32)
    # the per-head width the attention kernel sees: every head the same, aligned, number of dims
    kernels = kernel_shapes(small, x)
    assert len(kernels) == 2
    for (q, k, v), width in zip(kernels, (8, 16)):
        assert q[1] == k[1] == v[1] == 2 and q[-1] == k[-1] == v[-1] == width
    assert_fixpoint(small, (x,), 8)


def test_torchvision_vit_self_attention_aligns_per_head_widths():
    m, _ = _tv_vit(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                   num_classes=10)
    with torch.no_grad():
        for i, layer in enumerate(m.encoder.layers):
            w = layer.self_attention.in_proj_weight  # q rows 0..63, k 64..127, v 128..191; head h: 16 h + d
            for h in range(4):
                w[64 + 16 * h: 64 + 16 * h + 10 + h % 2] = 0  # key dims: 6 or 5 live per head
                # value dims: 6 (layer 0) or 13 (layer 1) live per head
                layer.self_attention.out_proj.weight[:, 16 * h: 16 * h + (10 if i == 0 else 3)] = 0
            layer.mlp[0].weight[:37] = 0  # 37 constant MLP units (more than plant_mlp's)
    x = randn(2, 3, 32, 32)
    plain, small = minimize(m, (x,)), minimize(m, (x,), align=8)
    assert_same(m, small, (randn(3, 3, 32, 32, seed=3),), rtol=1e-9)
    p, s = _shapes(plain), _shapes(small)
    # in_proj = 4 heads x (q, k, v). Stored, aligned or not: 6 + 6 + 6 (layer 0) or 13 (layer 1) per head. The
    # kernel sees 8 each, then 8 + 8 + 16 made equal (16, the whole head: one head dim for the fused
    # attention kernel), padded at run time
    for i, (vdims, width) in enumerate(((6, 8), (13, 16))):
        blk = f"encoder.layers.encoder_layer_{i}"
        assert p[f"{blk}.self_attention.in_proj_weight"][0] == 4 * (6 + 6 + vdims)
        assert s[f"{blk}.self_attention.in_proj_weight"] == p[f"{blk}.self_attention.in_proj_weight"]
        assert s[f"{blk}.self_attention.out_proj.weight"] == p[f"{blk}.self_attention.out_proj.weight"]
        units = p[f"{blk}.mlp.0.weight"][0]
        assert units % 8 and s[f"{blk}.mlp.0.weight"][0] == -(-units // 8) * 8
    kernels = kernel_shapes(small, x)
    assert len(kernels) == 2
    for (q, k, v), width in zip(kernels, (8, 16)):
        assert q[1] == k[1] == v[1] == 4 and q[-1] == k[-1] == v[-1] == width
    assert small.sqr_report.align_floats > 0  # (the MLP units)
    # the padded attention is plain torch: it scripts and exports like the rest
    x3 = randn(3, 3, 32, 32, seed=4)
    torch.testing.assert_close(torch.jit.script(small)(x3), m(x3), rtol=1e-9, atol=1e-12)
    x2 = randn(2, 3, 32, 32, seed=5)  # (exported for the example batch size)
    torch.testing.assert_close(torch.export.export(small, (x,)).module()(x2), m(x2), rtol=1e-9, atol=1e-12)
    assert_fixpoint(small, (x,), 8)
    # the helper form (portable=False, as the Squeeze-Release cycle keeps it) minimized again without align:
    # the same attention widths, no longer padded at run time (the MLP units kept for alignment go)
    helper = minimize(m, (x,), align=8, portable=False)
    pads = [n.args[12:] for n in helper.graph.nodes if n.target is sqr_fx.attention.self_attention]
    assert pads == [(2, 2), (10, 3)]  # (kept widths 6 / 6 and 6 / 13; the kernel sees 8 and 16)
    again = minimize(helper, (x,), portable=False)

    def attention_floats(g):
        return sum(t.numel() for k, t in g.state_dict().items() if "self_attention" in k)

    assert attention_floats(again) == attention_floats(helper) > 0
    assert all(len(n.args) <= 12 for n in again.graph.nodes if n.target is sqr_fx.attention.self_attention)
    assert_same(m, again, (randn(3, 3, 32, 32, seed=3),), rtol=1e-9)
    assert_same(m, again, (randn(3, 3, 32, 32, seed=3),), rtol=1e-9)


def test_convnext_block_align8_is_exact_and_aligned():
    m = ConvNeXtish(3, 24, 40, 2)
    init_random(m, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for b in m.blocks:
            b.mlp.fc1.weight[:7] = 0
            b.mlp.fc2.weight[:, 7:13] = 0
    x = randn(2, 3, 8, 8)
    plain, small = minimize(m, (x,)), minimize(m, (x,), align=8)
    for xi in (x, randn(3, 3, 11, 9, seed=3)):
        assert_same(m, small, (xi,), rtol=1e-9)
    assert assert_aligned(m, small, 8) == 4  # fc1 rows and fc2 columns of both blocks: 27 -> 32
    assert_keeps_more(plain, small)
    assert_fixpoint(small, (x,), 8)


# ---- properties over random masks ----------------------------------------------------------------------
aligns = st.sampled_from([2, 3, 4, 8])
seeds = st.integers(0, 2**16)


@settings(max_examples=12)
@given(spec=mlp_specs(), seed=seeds, align=aligns)
def test_mlp_alignment_never_changes_outputs_nor_removes_a_kept_unit(spec, seed, align):
    model, _ = build(spec, seed)
    x = _x(4, spec.in_features, seed=seed)
    plain, small = minimize(model, (x,)), minimize(model, (x,), align=align)
    for i, b in enumerate((4, 7, 1)):
        check_equivalence(model, small, (_x(b, spec.in_features, seed=seed + i + 1),), rtol=RTOL, atol=ATOL)
    assert_aligned(model, small, align)
    assert_keeps_more(plain, small)
    assert plain.sqr_report.floats_after <= small.sqr_report.floats_after <= small.sqr_report.floats_before
    assert_fixpoint(small, (x,), align)


@settings(max_examples=12)
@given(spec=cnn_specs(), seed=seeds, align=aligns)
def test_cnn_alignment_never_changes_outputs_nor_removes_a_kept_channel(spec, seed, align):
    model, _ = build(spec, seed)
    c, h, w = spec.in_channels, spec.height, spec.width
    x = _x(2, c, h, w, seed=seed)
    plain, small = minimize(model, (x,)), minimize(model, (x,), align=align)
    xs = [_x(3, c, h, w, seed=seed + 2)] + ([_x(1, c, h + 3, w + 5, seed=seed + 4)] if spec.resizable else [])
    for xi in xs:
        check_equivalence(model, small, (xi,), rtol=RTOL, atol=ATOL)
    assert_aligned(model, small, align)
    assert_keeps_more(plain, small)
    assert_fixpoint(small, (x,), align)


# ---- plumbing: CLI, pass manager, torch.compile, ExportedProgram -------------------------------------
def _net() -> nn.Module:
    """Linear(6, 24) -> ReLU -> Linear(24, 3) with 13 dead units: 11 kept, 16 aligned to 8."""
    net = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    with torch.no_grad():
        net[0].weight[:13], net[0].bias[:13] = 0, -1.0
    return net


def test_align_reaches_the_cli_the_pass_manager_compile_and_programs(tmp_path):
    import sqr_fx
    from sqr_fx.cli import main as cli
    from torch.fx.passes.infra.pass_manager import PassManager

    net, x = _net(), torch.randn(4, 6)
    torch.save(net, tmp_path / "net.pt")
    args = ["minimize", str(tmp_path / "net.pt"), "-o", str(tmp_path / "net.pt2"), "--module", "--input-shape", "4,6",
            "--quiet"]
    for extra, width in (([], 11), (["--align", "8"], 16)):
        assert cli(args + extra) == 0
        assert torch.export.load(tmp_path / "net.pt2").module().get_parameter("0.weight").shape == (width, 6)
    with pytest.raises(SystemExit):
        cli(args + ["--align", "0"])

    p = sqr_fx.MinimizePass((x,), align=8)
    result = PassManager([p])(torch.fx.symbolic_trace(net))
    assert result.graph_module.get_parameter("0.weight").shape == (16, 6) and p.report.align == 8

    reports = []
    torch._dynamo.reset()
    fast = torch.compile(net, backend=sqr_fx.make_backend(next_backend="eager", callback=reports.append),
                         options={"align": 8})
    check_equivalence(net, fast, (torch.randn(5, 6),), rtol=1e-5, atol=1e-6)
    assert reports[-1].align == 8 and reports[-1].params_after == 16 * 7 + 3 * 16 + 3
    torch._dynamo.reset()

    ep = minimize(torch.export.export(net, (x,)), align=8)
    assert ep.module().get_parameter("0.weight").shape == (16, 6) and ep.sqr_report.align == 8


# ---- Swin: window attention rounds its per-head widths up ---------------------------------------------
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_window_attention_aligns_per_head_widths(v2):
    """The planted Swin of test_window_attention (8 dims per head; per head 6 or 7 query/key and 6 value
    dims live, the last head dead): with align=4 every kept head is 8 wide in q, k and v (6 -> 8, 7 -> 8:
    rounded up, at most the current width), heads still go; exact at padded map sizes; a fixpoint."""
    from test_window_attention import _attns, _calls, _same, _swin, _widths, plant_constant_stream_reads, plant_heads
    import torchvision.models.swin_transformer as tvs

    m = _swin(v2)
    g = torch.Generator().manual_seed(0)
    for attn in _attns(m):
        plant_heads(attn, g, cosine=v2)
    for block in (b for b in m.modules() if isinstance(b, tvs.SwinTransformerBlock)):
        plant_constant_stream_reads(block, g)
    x = randn(2, 3, 32, 32)
    plain, small = minimize(m, (x,), portable=False), minimize(m, (x,), portable=False, align=4)
    for node, p_node, attn in zip(_calls(small), _calls(plain), _attns(m)):
        H, d = attn.num_heads, attn.qkv.in_features // attn.num_heads
        assert _widths(plain, p_node) == (H - 1, d - (1 if v2 else 2), d - 2)
        assert _widths(small, node) == (H - 1, d, d)
    assert count_stored_floats(plain) < count_stored_floats(small) < count_stored_floats(m)
    _same(m, small, [(2, 3, 32, 32), (3, 3, 36, 28), (1, 3, 52, 36)])
    assert_fixpoint(small, (x,), 4)


def test_hf_bert_heads_align_and_stay_equal():
    """Hugging Face BERT (torch.export front end, head-split views into sdpa): 4 heads of 16 dims, per head
    11 live query/key and 10 live value dims, head 1 unread, 13 constant MLP units. align=4: the stored
    widths stay 3 heads of 11 / 10; the attention kernel sees 12 in q, k and v alike (zero dims appended
    at run time); MLP 83 -> 84."""
    from test_transformers import _hf, _ids, params

    tf = _hf()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, use_cache=False)
    m = tf.BertModel(cfg)
    with torch.no_grad():
        for layer in m.encoder.layer:
            for h in range(4):
                layer.attention.self.key.weight[16 * h:16 * h + 5] = 0
                layer.attention.output.dense.weight[:, 16 * h:16 * h + 6] = 0
            layer.attention.output.dense.weight[:, 16:32] = 0
            layer.intermediate.dense.weight[:13] = 0
    m = m.eval().double()
    x = _ids(2, 12)
    plain, small = minimize(m, (x,)), minimize(m, (x,), align=4)
    p, s = params(plain), params(small)
    for i in range(2):
        pre = f"encoder.layer.{i}."
        assert [p[pre + f"attention.self.{w}.weight"].shape[0] for w in ("query", "key", "value")] == [33, 33, 30]
        for w in ("query", "key", "value", "output.dense"):
            name = pre + (f"attention.self.{w}.weight" if w != "output.dense" else "attention.output.dense.weight")
            assert s[name].shape == p[name].shape
        assert (p[pre + "intermediate.dense.weight"].shape[0], s[pre + "intermediate.dense.weight"].shape[0]) == (83, 84)
    kernels = kernel_shapes(small, x)
    assert len(kernels) == 2
    for shapes in kernels:
        assert [sh[1:] for sh in shapes] == [(3, 12, 12)] * 3
    for b, t in [(2, 12), (3, 7), (1, 20)]:
        assert_same(m, small, (_ids(b, t, seed=t),), rtol=1e-9)
    assert_fixpoint(small, (x,), 4)


# ---- run-time padded attention: minimized again -------------------------------------------------------
class _Attn(nn.Module):
    """q/k/v projections split into heads, sdpa, an output projection (float64)."""

    def __init__(self, c: int = 12, h: int = 4, dq: int = 8, dv: int = 8):
        super().__init__()
        self.h = h
        self.q, self.k = (nn.Linear(c, h * dq, dtype=torch.float64) for _ in range(2))
        self.v, self.o = nn.Linear(c, h * dv, dtype=torch.float64), nn.Linear(h * dv, c, dtype=torch.float64)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q, k, v = (lin(x).view(b, t, self.h, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def _planted_attn(**kw) -> nn.Module:
    torch.manual_seed(0)
    m = _Attn(**kw).eval()
    dq = m.q.weight.shape[0] // m.h
    with torch.no_grad():
        for h in range(m.h):
            m.q.weight[h * dq:h * dq + 2], m.q.bias[h * dq:h * dq + 2] = 0, 0  # 2 query/key dims per head
        m.o.weight[:, m.o.weight.shape[1] // m.h:2 * m.o.weight.shape[1] // m.h] = 0  # head 1 unread
    return m


def test_a_portable_aligned_result_minimizes_again():
    """The portable result writes the run-time padding out (``F.pad`` + sdpa + ``narrow``); the front end reads
    it back as ``padded_sdpa``: minimized again it is a fixpoint with the same ``align``, drops the padding
    without, and a head pruned afterwards still goes (a pad on the head axis alone would freeze them)."""
    m, x, x2 = _planted_attn(), _x(2, 5, 12, seed=1), _x(3, 7, 12, seed=2)
    small = minimize(m, (x,), align=8)
    assert "functional.pad(" in small.code and count_stored_floats(small) == count_stored_floats(minimize(m, (x,)))
    assert_fixpoint(small, (x,), 8)
    plain = minimize(small, (x,))
    assert "functional.pad(" not in plain.code and count_stored_floats(plain) == count_stored_floats(small)
    check_equivalence(m, plain, (x2,), rtol=RTOL, atol=ATOL)
    pruned = copy.deepcopy(small)
    with torch.no_grad():
        pruned.o.weight[:, :pruned.o.weight.shape[1] // 3] = 0  # one more head unread
    for align in (None, 8):
        again = minimize(pruned, (x,), align=align)
        assert count_stored_floats(again) < count_stored_floats(pruned)
        check_equivalence(pruned, again, (x2,), rtol=RTOL, atol=ATOL)
    # the same through an ExportedProgram of the portable result (the aten dialect's pad / slice)
    ep = torch.export.export(small, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    back = minimize(ep)
    assert not any("pad" in str(n.target) for n in back.graph.nodes)
    check_equivalence(m, back.module(), (x2,), rtol=RTOL, atol=ATOL)


def test_padded_helper_form_scripts():
    m, x = _planted_attn(), _x(2, 5, 12, seed=1)
    for align in (None, 8):
        small = minimize(m, (x,), align=align, portable=False)
        assert ("padded_sdpa" in small.code) == (align is not None)
        torch.testing.assert_close(torch.jit.script(small)(x), m(x), rtol=RTOL, atol=ATOL)


def test_unequal_query_and_value_heads_stay_aligned_in_storage():
    """q/k heads of 8 dims, v heads of 6: the kernel never saw one head dim, so there is no run-time padding
    and the per-head widths align in storage as before (zero rows)."""
    m, x = _planted_attn(dv=6), _x(2, 5, 12, seed=1)
    small = minimize(m, (x,), align=4)
    assert "functional.pad(" not in small.code
    assert small.q.weight.shape[0] == 3 * 8  # 3 kept heads of 6 live query/key dims -> 8
    check_equivalence(m, small, (_x(3, 7, 12, seed=2),), rtol=RTOL, atol=ATOL)


def test_guard_a_literal_cut_of_a_sequence_axis_is_not_read_as_padded_attention():
    """``sdpa(pad(q), pad(k), pad(v)).narrow(-1, 0, 5)`` where v's last axis is the sequence: the literal 5 is
    another cut at another length, so the front end leaves the ops as they are (read as ``padded_sdpa``, which
    cuts ``size - 2``, the result would differ at other lengths)."""
    import torch.nn.functional as F

    class SeqLast(nn.Module):
        def forward(self, q, k, v):
            o = F.scaled_dot_product_attention(F.pad(q, (0, 2)), F.pad(k, (0, 2)), F.pad(v, (0, 2)), scale=0.5)
            return o.narrow(-1, 0, 5)

    m = SeqLast().eval()
    q, k, v = _x(2, 3, 4, 6, seed=1), _x(2, 3, 5, 6, seed=2), _x(2, 3, 5, 5, seed=3)
    small = minimize(m, (q, k, v), portable=False)
    assert not any(n.target is sqr_fx.attention.padded_sdpa for n in small.graph.nodes)
    v7 = _x(2, 3, 5, 7, seed=4)
    torch.testing.assert_close(small(q, k, v7), m(q, k, v7), rtol=RTOL, atol=ATOL)
