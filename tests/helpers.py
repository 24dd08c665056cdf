"""Random pruned networks for the property tests (float64), and masked torchvision models.

* :func:`mlp_specs` / :func:`cnn_specs` are hypothesis strategies for a model *spec*;
  :class:`RandomMLP` / :class:`RandomCNN` build the ``nn.Module`` it describes, and
  :func:`build` turns (spec, seed) into a float64 eval-mode model with trained-looking
  BatchNorm statistics and planted structure.
* :func:`plant` zeros whole output units (weight row, and a zero OR a non-zero bias: a
  constant unit that must be folded), whole input columns (unused units) and random
  unstructured entries. When the spec asks for it, it also plants one unit that is
  removable *by construction* (:class:`Site`), so a test may assert a strict shrink.
* :func:`reference_mlp_fixpoint` is an independent plain-tensor fixpoint for MLPs.
* :func:`masked_torchvision` masks a torchvision CNN the way the benchmarks do.

Models stay small (widths <= 16, spatial <= 12 before the alternative size) so that one
hypothesis example runs well under a second on one core.
"""
from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import fx, nn

__all__ = [
    "ACTIVATIONS", "LayerSpec", "MLPSpec", "ConvSpec", "BlockSpec", "CNNSpec", "PlantSpec", "Site", "Planted",
    "RandomMLP", "RandomCNN", "mlp_specs", "cnn_specs", "build", "plant", "reference_mlp_fixpoint",
    "linear_weight_shapes", "masked_torchvision", "ConvUnit", "conv_specs", "conv_out",
]

MAX_WIDTH = 16

# ---- activations: module, functional and method forms ------------------------------------------
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "elu",
               "relu6", "identity")

_MODULE = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda **kw: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardswish": nn.Hardswish,
    "leaky_relu": lambda **kw: nn.LeakyReLU(0.1, **kw), "elu": lambda **kw: nn.ELU(0.7, **kw), "relu6": nn.ReLU6,
    "identity": nn.Identity, "hardsigmoid": nn.Hardsigmoid,
}
_INPLACE = {"relu", "silu", "hardswish", "leaky_relu", "elu", "relu6"}
_FUNCTIONAL = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardswish": F.hardswish,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "elu": lambda x: F.elu(x, alpha=0.7), "relu6": F.relu6,
    "identity": lambda x: x, "hardsigmoid": F.hardsigmoid,
}
_METHOD = {"relu", "sigmoid", "tanh"}
ACT_FORMS = ("module", "inplace", "functional", "method")


class FunctionalAct(nn.Module):
    """Calls the activation as ``F.x(t)`` / ``torch.x(t)`` or ``t.x()``: fx traces through this
    module, so the graph holds a call_function / call_method node, not a call_module."""

    def __init__(self, name: str, form: str):
        super().__init__()
        self.name, self.form = name, form

    def forward(self, x):
        if self.form == "method":
            return getattr(x, self.name)()
        return _FUNCTIONAL[self.name](x)


def make_act(name: str, form: str) -> nn.Module:
    if form == "method" and name not in _METHOD:
        form = "functional"
    if form == "inplace" and name not in _INPLACE:
        form = "module"
    if form in ("module", "inplace"):
        return _MODULE[name](inplace=True) if form == "inplace" else _MODULE[name]()
    return FunctionalAct(name, form)


class FunctionalDropout(nn.Module):
    """``F.dropout(x, p, self.training)``: fx bakes the eval-mode ``training=False`` in."""

    def forward(self, x):
        return F.dropout(x, 0.25, self.training)


def make_dropout(kind: str) -> nn.Module:
    return {"module": lambda: nn.Dropout(0.3), "2d": lambda: nn.Dropout2d(0.2),
            "functional": FunctionalDropout}[kind]()


_acts = st.sampled_from(ACTIVATIONS)
_forms = st.sampled_from(ACT_FORMS)


# ---- planting spec ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlantSpec:
    """Per weight: probability of dead rows / dead columns / unstructured zeros; ``site``: also plant
    one unit that is removable by construction (a :class:`Site`), as a dead ``row`` or ``column``."""

    p_rows: float
    p_cols: float
    p_unstructured: float
    site: Optional[str]  # None | "row" | "column"


plant_specs = st.builds(
    PlantSpec,
    p_rows=st.sampled_from([0.0, 0.3, 0.6]),
    p_cols=st.sampled_from([0.0, 0.3, 0.6]),
    p_unstructured=st.sampled_from([0.0, 0.3, 0.6]),
    site=st.sampled_from(["row", "column", None, "row", "column"]),
)


# ---- MLP ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    width: int
    bias: bool
    act: str
    act_form: str
    norm: str  # "none" | "before" (Linear -> BN -> act) | "after" (Linear -> act -> BN)
    dropout: Optional[str]


@dataclass(frozen=True)
class MLPSpec:
    in_features: int
    out_features: int
    out_bias: bool
    hidden: tuple[LayerSpec, ...]
    plant: PlantSpec


layer_specs = st.builds(
    LayerSpec,
    width=st.integers(1, MAX_WIDTH),
    bias=st.booleans(),
    act=_acts,
    act_form=_forms,
    norm=st.sampled_from(["none", "none", "before", "after"]),
    dropout=st.sampled_from([None, None, "module", "functional"]),
)


def mlp_specs() -> st.SearchStrategy[MLPSpec]:
    return st.builds(
        MLPSpec,
        in_features=st.integers(1, MAX_WIDTH),
        out_features=st.integers(1, 6),
        out_bias=st.booleans(),
        hidden=st.lists(layer_specs, min_size=1, max_size=4).map(tuple),
        plant=plant_specs,
    )


class RandomMLP(nn.Module):
    """Linear -> post -> ... -> Linear, ``post`` = [BN] act [BN] [dropout] per hidden layer."""

    def __init__(self, spec: MLPSpec):
        super().__init__()
        self.spec = spec
        widths = [spec.in_features] + [h.width for h in spec.hidden]
        self.linears = nn.ModuleList(
            [nn.Linear(a, h.width, bias=h.bias) for a, h in zip(widths, spec.hidden)]
            + [nn.Linear(widths[-1], spec.out_features, bias=spec.out_bias)]
        )
        posts = []
        for h in spec.hidden:
            ops: list[nn.Module] = []
            if h.norm == "before":
                ops.append(nn.BatchNorm1d(h.width))
            ops.append(make_act(h.act, h.act_form))
            if h.norm == "after":
                ops.append(nn.BatchNorm1d(h.width))
            if h.dropout:
                ops.append(make_dropout(h.dropout))
            posts.append(nn.Sequential(*ops))
        self.posts = nn.ModuleList(posts)
        self.sites: list[Site] = []  # the reference fixpoint decides what is removable

    def forward(self, x):
        for lin, post in zip(self.linears, self.posts):
            x = post(lin(x))
        return self.linears[-1](x)


# ---- CNN ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvSpec:
    out: int
    k: int
    stride: int
    padding: int
    dilation: int
    groups: int
    bias: bool
    bn: bool
    act: str
    act_form: str


@dataclass(frozen=True)
class BlockSpec:
    """``kind``: plain | residual | se | dense | inception | pool | dropout; ``convs``: its ConvSpecs;
    ``variant``: the op form (pool kind, add/mul spelling, dropout kind ...)."""

    kind: str
    convs: tuple[ConvSpec, ...] = ()
    variant: str = ""


@dataclass(frozen=True)
class CNNSpec:
    in_channels: int
    height: int
    width: int
    stem: ConvSpec
    blocks: tuple[BlockSpec, ...]
    head: str  # gap | mean | amax | adaptive2 | flatten | view | conv
    classes: int
    head_bias: bool
    plant: PlantSpec

    @property
    def resizable(self) -> bool:
        """Runs at another spatial size (no flatten -> Linear over a spatial-size-dependent width)."""
        return self.head not in ("flatten", "view")


def conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_specs(draw, cin: int, hw: tuple[int, int], *, same: bool = False, grouped: bool = True,
               out: Optional[int] = None, k: Optional[int] = None) -> tuple[ConvSpec, tuple[int, int]]:
    """A conv reading ``cin`` channels of size ``hw``; returns it with its output size (>= 1).
    ``same``: stride 1, odd kernel, 'same' zero padding (residual branches)."""
    k = k if k is not None else draw(st.sampled_from([1, 3, 3, 5] if same else [1, 2, 3, 3, 5]))
    d = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
    if same:
        s, p = 1, d * (k - 1) // 2
    else:
        s = draw(st.sampled_from([1, 1, 2]))
        p = draw(st.sampled_from([0, d * (k - 1) // 2, 1]))
    if min(conv_out(n, k, s, p, d) for n in hw) < 1:
        s, p = 1, (d * (k - 1) + 1) // 2
    mode = draw(st.sampled_from(["1", "1", "1", "dw", "g"])) if grouped and out is None else "1"
    divisors = [g for g in (2, 3, 4) if cin % g == 0]
    if mode == "dw" and cin > 1:
        groups, width = cin, cin * draw(st.sampled_from([1, 2] if 2 * cin <= MAX_WIDTH else [1]))
    elif mode == "g" and divisors:
        groups = draw(st.sampled_from(divisors))
        width = groups * draw(st.integers(1, MAX_WIDTH // groups))
    else:
        groups, width = 1, out if out is not None else draw(st.integers(1, MAX_WIDTH))
    spec = ConvSpec(width, k, s, p, d, groups, draw(st.booleans()), draw(st.booleans()), draw(_acts), draw(_forms))
    return spec, tuple(conv_out(n, k, s, p, d) for n in hw)


_POOLS = {  # name -> (module factory, output size, min input size)
    "max2": (lambda: nn.MaxPool2d(2), lambda n: n // 2, 2),
    "max3s2p1": (lambda: nn.MaxPool2d(3, 2, 1), lambda n: (n - 1) // 2 + 1, 2),
    "fmax_ceil": (None, lambda n: -(-n // 2), 2),  # F.max_pool2d(x, 2, ceil_mode=True)
    "avg2": (lambda: nn.AvgPool2d(2), lambda n: n // 2, 2),
    "avgpad": (lambda: nn.AvgPool2d(3, 1, 1), lambda n: n, 1),  # padded avg: constants become static
    "adaptive_avg3": (lambda: nn.AdaptiveAvgPool2d(3), lambda n: 3, 1),
    "adaptive_max2": (lambda: nn.AdaptiveMaxPool2d(2), lambda n: 2, 1),
}


@st.composite
def cnn_specs(draw) -> CNNSpec:
    cin = draw(st.integers(1, 4))
    start = hw = (draw(st.integers(5, 12)), draw(st.integers(5, 12)))
    stem, hw = draw(conv_specs(cin, hw, grouped=False))
    c = stem.out
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["plain", "plain", "plain", "residual", "se", "dense", "inception", "pool",
                                     "dropout"]))
        if kind == "dense" and c >= MAX_WIDTH:
            kind = "plain"
        if kind == "pool":
            name = draw(st.sampled_from(sorted(_POOLS)))
            _, size, least = _POOLS[name]
            if min(hw) < least:
                name, size = "avgpad", _POOLS["avgpad"][1]
            blocks.append(BlockSpec("pool", (), name))
            hw = tuple(size(n) for n in hw)
        elif kind == "dropout":
            blocks.append(BlockSpec("dropout", (), draw(st.sampled_from(["module", "2d", "functional"]))))
        elif kind == "plain":
            conv, hw = draw(conv_specs(c, hw))
            blocks.append(BlockSpec("plain", (conv,)))
            c = conv.out
        elif kind == "residual":
            variant = draw(st.sampled_from(["op", "torch", "iadd", "proj"]))
            if variant == "proj":  # ResNet downsampling block: strided main path + strided 1x1 shortcut
                s = draw(st.sampled_from([1, 2]))
                out = draw(st.integers(1, MAX_WIDTH))
                k = draw(st.sampled_from([1, 3]))
                first = ConvSpec(draw(st.integers(1, MAX_WIDTH)), k, s, k // 2, 1, 1, draw(st.booleans()), True,
                                 draw(_acts), draw(_forms))
                second, _ = draw(conv_specs(first.out, hw, same=True, grouped=False, out=out))
                short = ConvSpec(out, 1, s, 0, 1, 1, False, draw(st.booleans()), "identity", "module")
                blocks.append(BlockSpec("residual", (first, second, short), variant))
                hw = tuple(conv_out(n, 1, s, 0, 1) for n in hw)
                c = out
            else:
                first, _ = draw(conv_specs(c, hw, same=True))
                second, _ = draw(conv_specs(first.out, hw, same=True, grouped=False, out=c))
                blocks.append(BlockSpec("residual", (first, second), variant))
        elif kind == "se":
            squeeze = ConvSpec(draw(st.integers(1, c)), 1, 1, 0, 1, 1, True, False, draw(_acts), draw(_forms))
            excite = ConvSpec(c, 1, 1, 0, 1, 1, True, False, draw(st.sampled_from(["sigmoid", "hardsigmoid"])),
                              draw(st.sampled_from(["module", "functional"])))
            variant = draw(st.sampled_from(["x*s", "s*x", "torch.mul"])) + draw(st.sampled_from(["|pool", "|mean"]))
            blocks.append(BlockSpec("se", (squeeze, excite), variant))
        elif kind == "dense":  # DenseNet: cat([x, f(x)])
            grow, _ = draw(conv_specs(c, hw, same=True, grouped=False, out=draw(st.integers(1, MAX_WIDTH - c))))
            blocks.append(BlockSpec("dense", (grow,)))
            c += grow.out
        else:  # inception: cat([1x1(x), kxk(x), 1x1(maxpool(x))])
            a, b, e = (draw(st.integers(1, 5)) for _ in range(3))
            b1, _ = draw(conv_specs(c, hw, same=True, grouped=False, out=a, k=1))
            b2, _ = draw(conv_specs(c, hw, same=True, grouped=False, out=b, k=draw(st.sampled_from([3, 5]))))
            b3, _ = draw(conv_specs(c, hw, same=True, grouped=False, out=e, k=1))
            blocks.append(BlockSpec("inception", (b1, b2, b3)))
            c = a + b + e
    head = draw(st.sampled_from(["gap", "mean", "amax", "adaptive2", "flatten", "view", "conv"]))
    return CNNSpec(cin, start[0], start[1], stem, tuple(blocks), head, draw(st.integers(1, 6)), draw(st.booleans()),
                   draw(plant_specs))


class ConvUnit(nn.Module):
    """conv -> [BatchNorm] -> activation (none with ``act=False``)."""

    def __init__(self, cin: int, cs: ConvSpec, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cs.out, cs.k, cs.stride, cs.padding, cs.dilation, cs.groups, bias=cs.bias)
        self.bn = nn.BatchNorm2d(cs.out) if cs.bn else None
        self.act = make_act(cs.act, cs.act_form) if act else None

    def forward(self, x):
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x) if self.act is not None else x


class Residual(nn.Module):
    """act(g(f(x)) + shortcut(x)); the add spelled ``+``, ``torch.add`` or ``+=``; ``proj``: strided
    1x1 conv shortcut (ResNet downsampling)."""

    def __init__(self, cin: int, block: BlockSpec):
        super().__init__()
        first, second = block.convs[:2]
        self.f = ConvUnit(cin, first)
        self.g = ConvUnit(first.out, second, act=False)
        self.short = ConvUnit(cin, block.convs[2], act=False) if block.variant == "proj" else None
        self.act = make_act(second.act, second.act_form)
        self.variant = block.variant

    def forward(self, x):
        y = self.g(self.f(x))
        s = self.short(x) if self.short is not None else x
        if self.variant == "torch":
            y = torch.add(y, s)
        elif self.variant == "iadd":
            y += s
        else:
            y = y + s
        return self.act(y)


class SqueezeExcite(nn.Module):
    """x * gate(excite(act(squeeze(avgpool(x))))): per-channel gating by a mul."""

    def __init__(self, cin: int, block: BlockSpec):
        super().__init__()
        squeeze, excite = block.convs
        self.squeeze = ConvUnit(cin, squeeze)
        self.excite = ConvUnit(squeeze.out, excite)  # its activation is the sigmoid / hardsigmoid gate
        self.mul, pool = block.variant.split("|")
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "pool" else None

    def forward(self, x):
        p = self.pool(x) if self.pool is not None else x.mean((2, 3), keepdim=True)
        s = self.excite(self.squeeze(p))
        if self.mul == "s*x":
            return s * x
        if self.mul == "torch.mul":
            return torch.mul(x, s)
        return x * s


class Dense(nn.Module):
    """DenseNet: cat([x, f(x)], dim=1)."""

    def __init__(self, cin: int, block: BlockSpec):
        super().__init__()
        self.f = ConvUnit(cin, block.convs[0])

    def forward(self, x):
        return torch.cat([x, self.f(x)], 1)


class Inception(nn.Module):
    """cat([1x1(x), kxk(x), 1x1(maxpool3x3(x))], dim=1)."""

    def __init__(self, cin: int, block: BlockSpec):
        super().__init__()
        self.b1, self.b2, self.b3 = (ConvUnit(cin, cs) for cs in block.convs)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(F.max_pool2d(x, 3, 1, 1))], dim=1)


class FunctionalMaxPoolCeil(nn.Module):
    def forward(self, x):
        return F.max_pool2d(x, 2, ceil_mode=True)


class Head(nn.Module):
    """gap / mean / amax / adaptive2 / flatten / view -> Linear, or conv: a 1x1 conv output map."""

    def __init__(self, kind: str, c: int, hw: tuple[int, int], classes: int, bias: bool):
        super().__init__()
        self.kind = kind
        self.block = {"adaptive2": 4, "flatten": hw[0] * hw[1], "view": hw[0] * hw[1]}.get(kind, 1)
        if kind == "conv":
            self.conv = nn.Conv2d(c, classes, 1, bias=bias)
        else:
            self.fc = nn.Linear(c * self.block, classes, bias=bias)
        self.pool = {"gap": nn.AdaptiveAvgPool2d(1), "adaptive2": nn.AdaptiveAvgPool2d(2)}.get(kind)
        self.flatten = nn.Flatten() if kind in ("gap", "flatten") else None

    def forward(self, x):
        if self.kind == "conv":
            return self.conv(x)
        if self.pool is not None:
            x = self.pool(x)
        if self.kind == "mean":
            x = x.mean((2, 3))
        elif self.kind == "amax":
            x = torch.amax(x, dim=(2, 3))
        elif self.kind == "view":
            x = x.view(x.size(0), -1)
        elif self.kind == "adaptive2":
            x = torch.flatten(x, 1)
        else:
            x = self.flatten(x)
        return self.fc(x)


@dataclass(frozen=True)
class Site:
    """A unit removable by construction: output channel j of conv ``producer`` (groups=1, 2+ channels)
    reaches exactly one weighted reader, ``consumer`` (a groups=1 conv, or the head Linear where
    channel j is the column block ``[j*block, (j+1)*block)``), through channel-wise ops only: a plain
    chain across blocks, or inside a residual branch (f -> g) or a squeeze-excite (squeeze -> excite). Dead column block j in the
    consumer: unused. Dead row j in the producer: constant, and folded exactly when ``const_ok``
    (no padded average pooling in between, which turns a constant into a border-dependent map)."""

    producer: str
    consumer: str
    block: int
    const_ok: bool


class RandomCNN(nn.Module):
    """stem conv -> blocks -> head, from a :class:`CNNSpec`; ``sites`` lists the :class:`Site` s."""

    def __init__(self, spec: CNNSpec):
        super().__init__()
        self.spec = spec
        hw = (spec.height, spec.width)
        self.stem = ConvUnit(spec.in_channels, spec.stem)
        hw = tuple(conv_out(n, spec.stem.k, spec.stem.stride, spec.stem.padding, spec.stem.dilation) for n in hw)
        c = spec.stem.out
        # a producer needs 2+ channels: minimize never empties a tensor (it keeps one channel)
        producer: Optional[tuple[str, bool]] = ("stem.conv", True) if c >= 2 else None
        sites: list[Site] = []
        blocks: list[nn.Module] = []
        for i, b in enumerate(spec.blocks):
            name = f"blocks.{i}"
            if b.kind == "plain":
                cs = b.convs[0]
                blocks.append(ConvUnit(c, cs))
                if cs.groups == 1 and producer:
                    sites.append(Site(producer[0], f"{name}.conv", 1, producer[1]))
                producer = (f"{name}.conv", True) if cs.groups == 1 and cs.out >= 2 else None
                hw = tuple(conv_out(n, cs.k, cs.stride, cs.padding, cs.dilation) for n in hw)
                c = cs.out
            elif b.kind == "pool":
                make, size, _ = _POOLS[b.variant]
                blocks.append(make() if make is not None else FunctionalMaxPoolCeil())
                hw = tuple(size(n) for n in hw)
                if producer and b.variant == "avgpad":
                    producer = (producer[0], False)
            elif b.kind == "dropout":
                blocks.append(make_dropout(b.variant))
            else:
                producer = None
                if b.kind == "residual":
                    blocks.append(Residual(c, b))
                    if b.convs[0].groups == 1 and b.convs[0].out >= 2:
                        sites.append(Site(f"{name}.f.conv", f"{name}.g.conv", 1, True))
                    if b.variant == "proj":
                        c = b.convs[2].out
                        hw = tuple(conv_out(n, 1, b.convs[2].stride, 0, 1) for n in hw)
                elif b.kind == "se":
                    blocks.append(SqueezeExcite(c, b))
                    if b.convs[0].out >= 2:
                        sites.append(Site(f"{name}.squeeze.conv", f"{name}.excite.conv", 1, True))
                elif b.kind == "dense":
                    blocks.append(Dense(c, b))
                    c += b.convs[0].out
                else:
                    blocks.append(Inception(c, b))
                    c = sum(cs.out for cs in b.convs)
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(spec.head, c, hw, spec.classes, spec.head_bias)
        if producer:
            sites.append(Site(producer[0], "head.conv" if spec.head == "conv" else "head.fc", self.head.block,
                              producer[1]))
        self.sites = sites
        self.feature_hw = hw

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


# ---- planting ----------------------------------------------------------------------------------------
@dataclass
class Planted:
    """What :func:`plant` did; ``removable``: a unit that minimize MUST remove was planted."""

    removable: bool = False
    notes: list[str] = field(default_factory=list)
    site: Optional[Site] = None  # the site of the removable unit, when one was planted


def _dead_bias(bias: Optional[torch.Tensor], row: int, rng: np.random.Generator) -> None:
    """A dead row's bias: zero, a clearly non-zero constant (must be folded), or left as initialized."""
    if bias is None:
        return
    u = rng.random()
    if u < 0.4:
        bias[row] = 0.0
    elif u < 0.8:
        bias[row] = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5))


def _some(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, size=int(rng.integers(1, max(1, n // 2) + 1)), replace=False)


@torch.no_grad()
def plant(model: nn.Module, spec: Any, rng: np.random.Generator) -> Planted:
    """Zero structure into every Linear / Conv2d of ``model`` in place, as ``spec.plant`` asks:
    unstructured zeros, dead output rows (constant units, bias zero or not) and dead input columns
    (unused units; for a grouped conv, the column inside the channel's group). Then, if asked and
    the model has a :class:`Site`, one unit that is removable by construction."""
    ps: PlantSpec = spec.plant
    out = Planted()
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        W, groups = m.weight, getattr(m, "groups", 1)
        n_out, cin_g = W.shape[0], W.shape[1]
        if rng.random() < ps.p_unstructured:
            W[torch.as_tensor(rng.random(tuple(W.shape)) < rng.uniform(0.1, 0.6))] = 0.0
        if rng.random() < ps.p_rows:
            for r in _some(n_out, rng).tolist():
                W[r] = 0.0
                _dead_bias(m.bias, r, rng)
            out.notes.append(f"dead rows in {name}")
        if rng.random() < ps.p_cols:
            per_group = n_out // groups
            for col in _some(cin_g * groups, rng).tolist():
                g, local = divmod(col, cin_g)
                W[g * per_group:(g + 1) * per_group, local] = 0.0
            out.notes.append(f"dead columns in {name}")
    sites = getattr(model, "sites", [])
    if ps.site and sites:
        site = sites[int(rng.integers(len(sites)))]
        prod, cons = model.get_submodule(site.producer), model.get_submodule(site.consumer)
        j = int(rng.integers(prod.weight.shape[0]))
        if ps.site == "row" and site.const_ok:
            prod.weight[j] = 0.0
            _dead_bias(prod.bias, j, rng)
            out.notes.append(f"removable: constant channel {j} of {site.producer} (read by {site.consumer})")
        else:
            cons.weight[:, j * site.block:(j + 1) * site.block] = 0.0
            out.notes.append(f"removable: channel {j} of {site.producer} unread by {site.consumer}")
        out.removable, out.site = True, site
    return out


@torch.no_grad()
def _randomize_norm(model: nn.Module, g: torch.Generator) -> None:
    """Trained-looking BatchNorm: a dead channel after it is a NON-zero constant."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(torch.randn(n, generator=g) * 0.5)


def build(spec: Any, seed: int) -> tuple[nn.Module, Planted]:
    """The float64 eval-mode model of ``spec`` with planted structure; deterministic in ``seed``."""
    torch.manual_seed(seed)
    model = RandomMLP(spec) if isinstance(spec, MLPSpec) else RandomCNN(spec)
    _randomize_norm(model, torch.Generator().manual_seed(seed))
    model = model.double().eval()
    return model, plant(model, spec, np.random.default_rng(seed))


# ---- an independent reference for MLPs ------------------------------------------------------------------
@torch.no_grad()
def reference_mlp_fixpoint(model: RandomMLP) -> list[tuple[int, int]]:
    """Weight shapes of every Linear after removing, to a fixpoint, with plain tensors:

    * a hidden unit whose outgoing column is zero on every kept reader row (unused);
    * a hidden unit whose incoming row is zero on every kept input (constant ``post(bias)``):
      ``post(bias) * column`` is folded into the next layer's bias;
    * an input feature that no kept row of the first layer reads.

    Like minimize, it never empties a tensor: a layer (or the input) that would lose every unit keeps
    one, which is exact (an unused unit is read by nobody, a constant one is simply not folded) and
    keeps torch ops away from zero-width tensors.
    """
    Ws = [lin.weight.double().clone() for lin in model.linears]
    bs = [lin.bias.double().clone() if lin.bias is not None else torch.zeros(lin.out_features, dtype=torch.float64)
          for lin in model.linears]
    # keep[0]: input features; keep[l + 1]: outputs of linear l (the last: graph outputs, always kept)
    keep = [torch.ones(Ws[0].shape[1], dtype=torch.bool)] + [torch.ones(W.shape[0], dtype=torch.bool) for W in Ws]
    changed = True
    while changed:
        changed = False
        for l, post in enumerate(model.posts):
            for h in torch.nonzero(keep[l + 1]).flatten().tolist():
                if not Ws[l + 1][keep[l + 2], h].any():
                    keep[l + 1][h] = False
                    changed = True
                elif not Ws[l][h, keep[l]].any():
                    value = post(bs[l].clone().unsqueeze(0))[0, h]  # the unit's constant output
                    bs[l + 1] += Ws[l + 1][:, h] * value
                    keep[l + 1][h] = False
                    changed = True
        for i in torch.nonzero(keep[0]).flatten().tolist():
            if not Ws[0][keep[1], i].any():
                keep[0][i] = False
                changed = True
    # minimize never leaves a tensor with zero channels (torch ops reject them): it keeps one removable
    # unit, which no kept reader needs, so the other widths are those of the plain fixpoint
    return [(max(int(keep[l + 1].sum()), 1), max(int(keep[l].sum()), 1)) for l in range(len(Ws))]


def linear_weight_shapes(gm: fx.GraphModule) -> list[tuple[int, int]]:
    """Shapes of the weights of the ``F.linear`` calls and ``nn.Linear`` modules of a minimized graph (the
    result holds modules again where the original had them), in graph order."""
    shapes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Linear:
            shapes.append(tuple(gm.get_submodule(node.target).weight.shape))
        elif node.op == "call_function" and node.target is F.linear:
            w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            shapes.append(tuple(functools.reduce(getattr, w.target.split("."), gm).shape))
    return shapes


# ---- torchvision ------------------------------------------------------------------------------------------
def masked_torchvision(name: str, seed: int = 0, sparsity: float = 0.5, dead: float = 0.2) -> nn.Module:
    """A torchvision CNN (``num_classes=10``, float64, eval) as a pruned network looks:

    * every prunable weight re-drawn as ``N(0, 1/fan_in)`` first, so that global magnitude ranking
      is not decided by the init scheme (torchvision's ``N(0, 0.01)`` classifiers would be pruned
      whole and the network output would be an input-independent constant);
    * trained-looking BatchNorm statistics (``sqr_fx.masking.randomize_norm_stats``);
    * global magnitude masking at ``sparsity``;
    * a ``dead`` fraction of whole output units (zero row and bias) and of unread input columns in
      every prunable weight, except the classifier's rows (the logits stay input dependent).

    VGG's classifier is made narrow (25088 -> 64 -> 64 -> 10) to keep construction fast; it is still
    the adaptive-pool -> flatten -> Linear head.
    """
    import torchvision
    from sqr_fx.masking import global_magnitude_mask, plant_dead_units, prunable_weights, randomize_norm_stats

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10)
    if name.startswith("vgg"):
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
                                         nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in prunable_weights(model):
            t = w.tensor
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) / math.sqrt(t[0].numel()))
    head = [w.name for w in prunable_weights(model)][-1]
    model = randomize_norm_stats(model, g)
    model = global_magnitude_mask(model, sparsity)
    return plant_dead_units(model, dead, g, exclude_rows=[head]).eval()


# ---- results load without sqr_fx ----------------------------------------------------------------------------
_LOADER = """
import importlib.abc, json, sys

class NoSqrFx(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "sqr_fx" or name.startswith("sqr_fx."):
            raise ImportError("sqr_fx is not installed here")

sys.meta_path.insert(0, NoSqrFx())
import torch

errors = {}
for name in NAMES:
    module = torch.load(f"{name}.pt", weights_only=False)
    inputs, expected = torch.load(f"{name}.io.pt")
    with torch.no_grad():
        out = module(*inputs)
    out = out["logits"] if isinstance(out, dict) else out
    errors[name] = float((out - expected).abs().max() / expected.abs().max())
assert not [m for m in sys.modules if m.split(".")[0] == "sqr_fx"]
print(json.dumps(errors))
"""


def errors_in_a_fresh_process_without_sqr_fx(models: dict[str, tuple], tmp_path) -> dict[str, float]:
    """``torch.save`` each result of ``models`` (name -> (original, result, inputs)), load them all in ONE
    fresh Python process where ``import sqr_fx`` fails, run them there on ``inputs``; returns each
    result's largest error relative to the original's output scale (outputs or ``.logits``)."""
    for name, (original, result, inputs) in models.items():
        with torch.no_grad():
            out = original(*inputs)
        torch.save(result, tmp_path / f"{name}.pt")
        torch.save((inputs, getattr(out, "logits", out)), tmp_path / f"{name}.io.pt")
    code = f"NAMES = {sorted(models)!r}\n" + textwrap.dedent(_LOADER)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(errors) == sorted(models)
    return errors
