"""Channel-wise ops: activations, dropout, BatchNorm (eval) and broadcasting binary ops.

Each maps channel j of its input(s) to channel j of its output, so input and output
channel j are coupled (one group) and a constant stays a constant: ``const(c) ->
const(f(c))``. The value rule is the op itself, evaluated on a float64 probe holding
the constants (``Analysis.evaluate``): meaning and rule cannot drift apart.
"""
from __future__ import annotations

from dataclasses import replace

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..values import ChanInfo
from .registry import method, op_name, rule

aten = torch.ops.aten

_UNARY = [
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu",
    "celu", "softplus", "mish", "hardtanh", "logsigmoid", "tanhshrink", "softsign", "softshrink", "hardshrink",
    "threshold", "dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d",
    "exp", "abs", "neg", "clamp", "clip", "square", "erf", "contiguous", "clone", "detach", "float", "double",
    "half", "bfloat16", "to", "type_as", "relu_", "sigmoid_", "tanh_", "hardtanh_", "leaky_relu_", "elu_",
    "silu_", "hardswish_", "hardsigmoid_", "clamp_", "clamp_min", "clamp_max", "native_dropout", "pow",
    "rsqrt", "sqrt", "log", "sin", "cos", "reciprocal", "sign", "_to_copy",
]
_UNARY_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.LogSigmoid, nn.Tanhshrink, nn.Softsign,
    nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]


def _targets(names: list[str]) -> list[Any]:
    out: list[Any] = []
    for n in names:
        for ns in (F, torch):
            if hasattr(ns, n):
                out.append(getattr(ns, n))
        out.append(method(n))
        op = getattr(aten, n, None)
        if op is not None:
            out += [getattr(op, o) for o in op.overloads()]
    return list(dict.fromkeys(out))


def _first_tensor_arg(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def _probe(info: ChanInfo, ndim: int = 2) -> torch.Tensor:
    """The constants as a tensor of the op's rank, channels on their own axes (Dropout2d wants 4-D)."""
    return torch.as_tensor(info.probe(np.where(info.const, info.value, 0.0), max(ndim, 2)), dtype=torch.float64)


def _mapped_values(node: fx.Node, A, x: fx.Node, src: ChanInfo, refs: tuple = ()) -> ChanInfo:
    """Output info of a channel-wise unary op: same ids, constants mapped through the op. ``refs``: tensor
    arguments read for their dtype only (``x.type_as(y)``, ``x.to(y)``): an empty tensor of that dtype
    stands in for them, so a cast back to the model's dtype (after Gemma's float32 norm) keeps constants."""
    out = replace(src, const=src.const.copy(), value=src.value.copy())
    if src.const.any():
        probes = {r: torch.empty(0, dtype=r.meta["tensor_meta"].dtype) for r in refs
                  if "tensor_meta" in r.meta and hasattr(r.meta["tensor_meta"], "dtype")}
        y = A.evaluate(node, {**probes, x: _probe(src, len(A.shape(x) or ()))})
        if y is None or y.numel() != len(src):
            out.const[:] = False
        else:
            v = src.unprobe(y.double().numpy())
            out.const &= np.isfinite(v)
            out.value = np.where(out.const, v, 0.0)
    return out


@rule("pointwise", *_targets(_UNARY), *_UNARY_MODULES, aten.dropout.default, aten.alias.default, operator.pow,
      heads=True)
def pointwise(node: fx.Node, A, a) -> ChanInfo | None:
    """y_j = f(x_j): couples x_j and y_j; const(c) -> const(f(c))."""
    x = _first_tensor_arg(node)
    src = A.info(x)
    others = [v for v in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(v, fx.Node)]
    refs: list = []
    if op_name(node) in ("type_as", "to"):  # x.type_as(y), x.to(y): y's dtype/device only, none of its values
        refs = [v for v in others if A.shape(v) is not None]
        others = [v for v in others if A.shape(v) is None]
    if any(A.info(v) is not None or A.tensor(v) is None or A.tensor(v).numel() != 1
           for v in others if A.shape(v) is not None):
        # a second tensor operand (pow(x, y), clamp(x, min=P) with a per-channel P): not a one-input
        # channel-wise op, and P would need slicing with x's channels; a one-element tensor is a scalar
        A.decline(node, "a second tensor operand (only scalars and one-element tensors)", src, others)
        return None
    if src is None or A.shape(node) != A.shape(x):
        A.freeze(src)
        return None
    return _mapped_values(node, A, x, src, tuple(refs))


@rule("batch_norm", F.batch_norm, aten.batch_norm.default,
      aten._native_batch_norm_legit_no_training.default,
      names=("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
      per_target={
          aten.batch_norm.default: ("input", "weight", "bias", "running_mean", "running_var", "training"),
          aten._native_batch_norm_legit_no_training.default: ("input", "weight", "bias", "running_mean", "running_var"),
      })
def batch_norm(node: fx.Node, A, a) -> ChanInfo | None:
    """Eval BatchNorm is per channel affine: const(c) -> const(gamma (c - mean)/sqrt(var + eps) + beta).
    Its per-channel tensors are members of the channel group and are sliced with it."""
    x, src = a["input"], A.info(a["input"])
    if a.get("training", False) or src is None or src.dim != 1 or A.shape(node) is None:
        A.freeze(src)
        return None
    params = [a.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    if any(p is not None and A.tensor(p) is None for p in params):
        A.freeze(src)
        return None
    for p in params:
        A.attach(p, 0, src.ids)
    return _mapped_values(node, A, x, src)


def _operands(node: fx.Node) -> list[Any]:
    ops = list(node.args[:2])
    if len(ops) < 2 and "other" in node.kwargs:
        ops.append(node.kwargs["other"])
    return ops


@rule("binary", operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
      operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
      method("add"), method("sub"), method("mul"), method("div"), method("add_"), method("mul_"),
      aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.mul.Scalar,
      aten.add_.Tensor, aten.mul_.Tensor, aten.maximum.default, aten.minimum.default, heads=True)
def binary(node: fx.Node, A, a) -> ChanInfo | None:
    """z_j = f(x_j, y_j) with broadcasting: full-width operands are coupled channel by channel;
    a broadcast operand (size 1 on the channel axis, or a scalar) is one value for every channel.
    A head-split operand is followed against Python numbers (``q * scale``) and against a stored
    per-dim tensor shared by every head (``_per_dim_of_heads``)."""
    ops = _operands(node)
    split = [o for o in ops if isinstance(o, fx.Node) and A.info(o) is not None and A.info(o).split]
    if split:
        tensors = [o for o in ops if isinstance(o, fx.Node)]
        if len(tensors) == 1 and all(isinstance(o, (int, float)) for o in ops if o is not tensors[0]) \
                and A.shape(node) == A.shape(tensors[0]):
            return _mapped_values(node, A, tensors[0], A.info(tensors[0]))
        if len(tensors) == 2 and len(split) == 1 and _per_dim_of_heads(node, A, split[0], *[t for t in tensors
                                                                                             if t is not split[0]]):
            src = A.info(split[0])
            A.keep_whole_heads(src)  # the tensor is not sliced: a kept head keeps every dim
            return replace(src, const=np.zeros(len(src), bool), value=np.zeros(len(src)))
        A.freeze(tensors)
        return None
    out_shape = A.shape(node)
    if out_shape is None:
        A.freeze(ops)
        return None
    nd = len(out_shape)
    axis = None
    for o in ops:
        i, s = A.info(o), A.shape(o)
        if i is not None and s is not None and s[i.dim] == out_shape[i.dim + nd - len(s)]:
            axis, C = i.dim + nd - len(s), s[i.dim]
            break
    if axis is None:
        A.freeze(ops)
        return None
    full: list[tuple[Any, ChanInfo]] = []
    probes: dict[fx.Node, Any] = {}
    const = np.ones(C, bool)
    zero_any = np.zeros(C, bool)
    for o in ops:
        if not isinstance(o, fx.Node):
            continue
        s, i = A.shape(o), A.info(o)
        oax = axis - (nd - len(s)) if s is not None else -1
        if s is None or oax < 0 or (s[oax] == 1 and C != 1):  # broadcast along channels
            A.freeze(i)
            t = A.tensor(o)
            if t is not None and t.numel() >= 1 and bool((t == t.reshape(-1)[0]).all()):
                probes[o] = t.reshape(-1)[0].double()
            else:
                const[:] = False
            continue
        if i is None:
            i = _param_info(o, A, oax)
        if i is None or i.dim != oax:
            A.freeze(ops)
            return None
        full.append((o, i))
        const &= i.const
        zero_any |= i.zero
        probes[o] = torch.as_tensor(np.where(i.const, i.value, 0.0), dtype=torch.float64).reshape(1, -1)
    ids = full[0][1].ids
    for _, i in full[1:]:
        A.union(ids, i.ids)
    value = np.zeros(C)
    if const.any():
        y = A.evaluate(node, probes)
        if y is None or y.numel() != C:
            const[:] = False
        else:
            v = y.reshape(-1).double().numpy()
            const &= np.isfinite(v)
            value = np.where(const, v, 0.0)
    if node.target in (operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul_.Tensor) or (
        node.op == "call_method" and node.target in ("mul", "mul_")
    ):
        const |= zero_any  # 0 * (finite) = 0: a zero operand makes the product channel zero
        value = np.where(zero_any, 0.0, value)
    return ChanInfo(axis, ids, const, value)


def _per_dim_of_heads(node: fx.Node, A, x: fx.Node, w: fx.Node) -> bool:
    """``w`` is a stored tensor (no channel info of its own) that varies at most along ``x``'s per-head
    axis and broadcasts to ``x``'s shape: ``z[h, d] = f(x[h, d], w[d])`` in every head h (Qwen3's q_norm
    weight on ``[B, T, H, D]``). Heads stay independent; the dims keep their layout because ``w`` is kept
    whole (see ``keep_whole_heads``)."""
    src, sx, sw = A.info(x), A.shape(x), A.shape(w)
    if A.info(w) is not None or A.tensor(w) is None or sx is None or sw is None or A.shape(node) != sx \
            or len(sw) > len(sx) or not torch.is_floating_point(A.tensor(w)):
        return False
    lead = len(sx) - len(sw)
    return all(n == 1 or (lead + k == src.dim and n == sx[src.dim]) for k, n in enumerate(sw))


def _param_info(o: fx.Node, A, dim: int) -> ChanInfo | None:
    """A full-width ``get_attr`` operand (layer-scale, per-channel bias) joins the channel group;
    it is sliced with it. Only when this is its one reader, so slicing it cannot hurt another."""
    t = A.tensor(o)
    if t is None or len(o.users) != 1 or not t.is_floating_point():
        return None
    rows = t.movedim(dim, 0).reshape(t.shape[dim], -1).double()
    const = (rows == rows[:, :1]).all(1).numpy()
    info = ChanInfo(dim, A.fresh(t.shape[dim]), const, np.where(const, rows[:, 0].numpy(), 0.0))
    o.meta["sqr_fx.chan"] = info
    return info


try:
    from torchvision.ops import stochastic_depth as _stochastic_depth
    from torchvision.ops import StochasticDepth as _StochasticDepth
except ImportError:  # pragma: no cover - torchvision is a dependency, but keep the core importable
    _stochastic_depth = _StochasticDepth = None


@rule("stochastic_depth", _stochastic_depth, _StochasticDepth)
def stochastic_depth(node: fx.Node, A, a) -> ChanInfo | None:
    """Identity when not training (the only mode minimize admits); random otherwise: frozen."""
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else None)
    if node.op == "call_module":
        training = A.module(node).training
    if training:
        A.freeze(list(node.args))
        return None
    return pointwise(node, A, a)
