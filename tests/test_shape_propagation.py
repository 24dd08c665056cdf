"""Shape propagation without data: the meta-tensor run that gives rewritten graphs (rounds after the
first) and the reshape rules' other input sizes their shapes must agree with a real run, node for node."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from sqr_fx.attention import padded_sdpa, self_attention
from sqr_fx.trace import _meta_shape, propagate_shapes, propagate_shapes_meta

T = torch.randn
CASES = [
    (operator.add, (T(2, 1, 3), T(4, 1))),
    (operator.mul, (T(3), 2)),
    (operator.sub, (2.5, torch.arange(4))),
    (operator.truediv, (T(2, 3), T(3, dtype=torch.float64))),
    (operator.truediv, (torch.arange(6).view(2, 3), 2)),  # integer true division: a float (own meta kernel)
    (torch.add, (torch.arange(3), 1.5)),
    (torch.mul, (torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool))),
    (torch.sub, (T(()), T(5, 1, dtype=torch.float64))),
    (torch.div, (torch.arange(3), torch.arange(1, 4))),
    (torch.ops.aten.add.Tensor, (T(2, 3), T(1, 3, dtype=torch.float16))),
    (torch.ops.aten.mul.Tensor, (T(4, 1, 2), T(3, 1))),
    (F.scaled_dot_product_attention, (T(1, 4, 5, 8), T(3, 4, 7, 8), T(3, 4, 7, 6))),
    (F.scaled_dot_product_attention, (T(2, 5, 8), T(2, 7, 8), T(2, 7, 6))),
    (F.scaled_dot_product_attention, (T(1, 4, 5, 8), T(1, 4, 7, 8), T(1, 4, 7, 6), T(3, 1, 5, 7))),  # a mask wider than q: refused
    (F.scaled_dot_product_attention, (T(2, 4, 5, 8), T(2, 4, 7, 8), T(2, 4, 7, 6), T(1, 5, 7))),  # mask broadcast
    (F.linear, (T(3, 5), T(4, 5), T(4))),
    (F.linear, (T(5), T(4, 5))),  # unbatched
    (F.linear, (T(2, 3, 5), T(4, 5), T(()))),  # a 0-d bias
    (F.linear, (T(2, 0, 5), T(4, 5))),  # an empty batch
    (torch.ops.aten.linear.default, (T(2, 3, 5), T(4, 5), T(4))),
    (F.linear, (T(3, 6), T(4, 5))),  # widths differ: refused
    (F.scaled_dot_product_attention, (T(2, 4, 5, 8), T(2, 4, 7, 8), T(2, 4, 7, 6), None, 0.0, False, 0.5)),  # scale is keyword-only: refused
    (padded_sdpa, (T(2, 4, 5, 8), T(2, 4, 7, 8), T(2, 4, 7, 6), None, 0.0, False, 0.5, False, 1, 3)),  # sqr_fx's padded form
    (F.linear, (T(3, 5), T(4, 5), T(3))),  # bias of the wrong width: refused
    (F.linear, (T(3, 5, dtype=torch.float64), T(4, 5))),  # dtypes differ: refused
    (F.linear, (T(3, 5), T(4, 5), T(4, dtype=torch.float64))),  # a float64 bias: refused
]


@pytest.mark.parametrize("op, operands", CASES, ids=[f"{getattr(o, '__name__', o)}-{i}" for i, (o, _) in enumerate(CASES)])
def test_meta_fast_paths_agree_with_the_real_op(op, operands):
    fast = _meta_shape(op, tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in operands), {})
    try:
        real = op(*operands)
    except (RuntimeError, TypeError):  # the real op refuses: so must the fast path (None: the op's own meta kernel runs)
        assert fast is None
        return
    if fast is not None:  # (None: the op's own meta kernel runs)
        assert (fast.shape, fast.dtype, fast.device.type) == (real.shape, real.dtype, "meta")


def test_meta_fast_path_of_the_attention_helper():
    E, H = 8, 2
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    bq, bk, bv = mha.in_proj_bias.detach().chunk(3)
    wo = torch.randn(5, E)
    for x in (T(3, 4, E), T(4, E)):
        args = (x, wq, bq, wk, bk, wv, bv, wo, None, H, 0.5, True)
        real = self_attention(*args)
        fast = _meta_shape(self_attention, tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args), {})
        assert (fast.shape, fast.dtype) == (real.shape, real.dtype)


class _Block(nn.Module):
    """LayerNorm, sdpa over heads, a residual add, a GELU MLP."""

    def __init__(self, e: int = 16, h: int = 4):
        super().__init__()
        self.h, self.norm, self.qkv, self.out = h, nn.LayerNorm(e), nn.Linear(e, 3 * e), nn.Linear(e, e)
        self.mlp = nn.Sequential(nn.Linear(e, 32), nn.GELU(), nn.Linear(32, e))

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.h, e // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, e))
        return x + self.mlp(x) * 0.5


class _MadeInForward(nn.Module):
    """A CPU tensor made in forward (meta tensors cannot mix with it: fake tensors run it)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x) + torch.ones(4) * x.shape[1]


def _shapes(gm: fx.GraphModule) -> dict[str, object]:
    """Each node's shapes and dtypes (what the rules read; strides are the kernels' choice, not compared)."""
    def of(tm):
        if isinstance(tm, TensorMetadata):
            return tuple(tm.shape), tm.dtype
        return type(tm)(of(t) for t in tm) if isinstance(tm, (list, tuple)) else tm

    return {n.name: of(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


@pytest.mark.parametrize("make, x", [
    (lambda: torchvision.models.resnet18(num_classes=10), T(2, 3, 64, 64)),
    (_Block, T(2, 5, 16)),
    (_MadeInForward, T(3, 6)),
])
def test_meta_propagation_gives_the_real_runs_shapes(make, x):
    gm = fx.symbolic_trace(make().eval())
    propagate_shapes(gm, (x,))
    real = _shapes(gm)
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    propagate_shapes_meta(gm, (x,))
    assert _shapes(gm) == real


@pytest.mark.parametrize("make", [
    lambda: torch.empty(2, 3, 4, 5, device="meta"),
    lambda: torch.empty(2, 3, 4, 5, device="meta").to(memory_format=torch.channels_last),
    lambda: torch.empty(2, 3, 1, 1, device="meta"),  # contiguous and channels-last at once
    lambda: torch.empty(3, 4, device="meta").t(),  # transposed: not dense in either layout
    lambda: torch.empty(1, 4, device="meta").expand(3, 4),  # overlapping
    lambda: torch.empty(6, 8, device="meta", dtype=torch.float64)[:, ::2],  # strided slice
    lambda: torch.empty((), device="meta"),
])
def test_like_is_empty_like(make):
    """The meta run's output for shape-preserving ops: ``empty_like``'s shape, dtype and strides."""
    from sqr_fx.trace import _like

    x = make()
    got, want = _like(x), torch.empty_like(x)
    assert (got.shape, got.dtype, got.stride(), got.device) == (want.shape, want.dtype, want.stride(), want.device)


def test_meta_copies_are_shared_by_runs_and_follow_a_replaced_tensor():
    """``record_other_shapes`` converts each tensor to meta once for all its runs; a tensor replaced under
    the same name between runs is converted again (the cache holds the tensor it was made from)."""
    from sqr_fx.trace import _run_for_shapes

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(T(3, 4)), nn.Parameter(T(3))

        def forward(self, x):
            return F.linear(x, self.w, self.b).relu()

    gm = fx.symbolic_trace(Lin())
    on_meta, shapes = {}, []

    def record(n, out):
        if n.op == "output":
            shapes.append(tuple(out.shape))

    assert _run_for_shapes(gm, (T(2, 4),), record, on_meta)
    first = on_meta["w"][1]
    assert _run_for_shapes(gm, (T(5, 4),), record, on_meta) and on_meta["w"][1] is first
    gm.w, gm.b = nn.Parameter(T(6, 4)), nn.Parameter(T(6))
    assert _run_for_shapes(gm, (T(5, 4),), record, on_meta)
    assert shapes == [(2, 3), (5, 3), (5, 6)]
