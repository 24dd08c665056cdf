"""Channel-wise ops in every argument form: activations (module / functional / torch / method /
keyword / in-place / in-place statement), eval dropouts, casts, broadcasting binary ops (``a + b``,
``torch.add(input=a, other=b)``, ``a.add_(b)``, ``h += b``, ``operator.iadd`` ...) against scalars,
per-channel parameters, broadcast parameters and graph tensors (residual branches), long-range skips
(``save`` / ``merge``) and torchvision's stochastic depth.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from .core import CF, CL, PLANTS, Ctx, Skip, State, gen, param_of
from .gen_layers import dense, dense_form

P = param_of
ANY = CL + CF

# name: (extra positional args, the same as keywords, nn module (class, args) or None)
UNARY = {
    "relu": ((), {}, (nn.ReLU, ())), "relu6": ((), {}, (nn.ReLU6, ())), "gelu": ((), {"approximate": "tanh"},
                                                                             (nn.GELU, ("tanh",))),
    "silu": ((), {}, (nn.SiLU, ())), "sigmoid": ((), {}, (nn.Sigmoid, ())), "tanh": ((), {}, (nn.Tanh, ())),
    "hardswish": ((), {}, (nn.Hardswish, ())), "hardsigmoid": ((), {}, (nn.Hardsigmoid, ())),
    "leaky_relu": ((0.2,), {"negative_slope": 0.2}, (nn.LeakyReLU, (0.2,))),
    "elu": ((0.7,), {"alpha": 0.7}, (nn.ELU, (0.7,))), "selu": ((), {}, (nn.SELU, ())),
    "celu": ((0.6,), {"alpha": 0.6}, (nn.CELU, (0.6,))), "softplus": ((2.0,), {"beta": 2.0}, (nn.Softplus, (2.0,))),
    "mish": ((), {}, (nn.Mish, ())), "hardtanh": ((-0.5, 0.7), {"min_val": -0.5, "max_val": 0.7},
                                                  (nn.Hardtanh, (-0.5, 0.7))),
    "logsigmoid": ((), {}, (nn.LogSigmoid, ())), "tanhshrink": ((), {}, (nn.Tanhshrink, ())),
    "softsign": ((), {}, (nn.Softsign, ())), "softshrink": ((0.3,), {"lambd": 0.3}, (nn.Softshrink, (0.3,))),
    "hardshrink": ((0.3,), {"lambd": 0.3}, (nn.Hardshrink, (0.3,))),
    "threshold": ((0.1, -0.3), {"threshold": 0.1, "value": -0.3}, (nn.Threshold, (0.1, -0.3))),
    "identity": ((), {}, (nn.Identity, ())),
    "exp": ((), {}, None), "abs": ((), {}, None), "neg": ((), {}, None), "square": ((), {}, None),
    "erf": ((), {}, None), "sin": ((), {}, None), "cos": ((), {}, None), "sign": ((), {}, None),
    "clamp": ((-0.5, 0.8), {"min": -0.5, "max": 0.8}, None), "clip": ((-0.6, 0.4), {"min": -0.6, "max": 0.4}, None),
    "clamp_min": ((0.1,), {"min": 0.1}, None), "clamp_max": ((0.2,), {"max": 0.2}, None),
    "pow": ((2,), {"exponent": 2}, None),
    "rsqrt": ((), {}, None), "sqrt": ((), {}, None), "log": ((), {}, None), "reciprocal": ((), {}, None),
    "contiguous": ((), {}, None), "clone": ((), {}, None), "detach": ((), {}, None),
}
POSITIVE = {"rsqrt", "sqrt", "log", "reciprocal"}  # applied to h.abs() + 0.5


def _inplace_kw(fn) -> bool:
    try:
        return "inplace" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def unary_forms(name: str) -> list[str]:
    """Every way torch lets you write ``name`` on a tensor (this torch version)."""
    pos, kw, mod = UNARY[name]
    forms = []
    if mod is not None:
        forms.append("nn")
        if "inplace" in inspect.signature(mod[0].__init__).parameters:
            forms.append("nn_inplace")
    if name == "identity":
        return forms
    fF, fT = getattr(F, name, None), getattr(torch, name, None)
    if fF is not None:
        forms += ["F", "F_kw"] + (["F_inplace"] if _inplace_kw(fF) else [])
    if fT is not None and fT is not fF:
        forms += ["torch", "torch_kw"]
    if hasattr(torch.Tensor, name):
        forms += ["method"] + (["method_kw"] if kw else [])
    if hasattr(torch.Tensor, name + "_"):
        forms += ["method_", "stmt_"]
    for ns, tag in ((torch, "torch_"), (F, "F_")):
        if hasattr(ns, name + "_") and (tag == "torch_" or getattr(F, name + "_") is not getattr(torch, name + "_", 0)):
            forms.append(tag)
    if name == "pow":
        forms.append("op")
    return forms


def unary_fn(name: str, form: str, c: Ctx):
    """``fn(m, h) -> h`` for one activation form (registers the module for the nn forms)."""
    pos, kw, mod = UNARY[name]
    if form.startswith("nn"):
        key = c.module(mod[0](*mod[1], **({"inplace": True} if form == "nn_inplace" else {})), name)
        return lambda m, h: m.M[key](h)
    fF, fT = getattr(F, name, None), getattr(torch, name, None)
    table = {
        "F": lambda m, h: fF(h, *pos),
        "F_kw": lambda m, h: fF(input=h, **kw),
        "F_inplace": lambda m, h: fF(h, *pos, inplace=True),
        "torch": lambda m, h: fT(h, *pos),
        "torch_kw": lambda m, h: fT(input=h, **kw),
        "method": lambda m, h: getattr(h, name)(*pos),
        "method_kw": lambda m, h: getattr(h, name)(**kw),
        "method_": lambda m, h: getattr(h, name + "_")(*pos),
        "torch_": lambda m, h: getattr(torch, name + "_")(h, *pos),
        "F_": lambda m, h: getattr(F, name + "_")(h, *pos),
        "op": lambda m, h: h ** pos[0],
    }
    if form == "stmt_":
        def stmt(m, h):
            getattr(h, name + "_")(*pos)  # the result is dropped: h itself was changed
            return h
        return stmt
    return table[form]


@gen("unary", ANY, weight=4, families=("pointwise",), enum=("name", "form"))
def unary(c: Ctx, st: State) -> State:
    name = c.pick("name", list(UNARY))
    form = c.pick("form", unary_forms(name))
    fn = unary_fn(name, form, c)
    if name in POSITIVE:
        c.step_h(lambda m, h: fn(m, h.abs() + 0.5))
    else:
        c.step_h(fn)
    return st


# ---- dropout (eval) and casts -------------------------------------------------------------------------
DROPOUTS = {  # name: (module, layouts it accepts: ranks where torch treats the channel axis as features)
    "dropout": (nn.Dropout, ANY), "alpha_dropout": (nn.AlphaDropout, ANY),
    "feature_alpha_dropout": (nn.FeatureAlphaDropout, CF), "dropout1d": (nn.Dropout1d, ("sig",)),
    "dropout2d": (nn.Dropout2d, ("img",)), "dropout3d": (nn.Dropout3d, ("vol",)),
}


@gen("dropout", ANY, weight=1, families=("pointwise",), enum=("name", "form"))
def dropout(c: Ctx, st: State) -> State:
    # dropout2d / dropout3d read an unbatched input as a batched one of lower rank (torch warns): batched only
    name = c.pick("name", [n for n, (_, ls) in DROPOUTS.items() if st.layout in ls
                           and (st.batched or n not in ("dropout2d", "dropout3d"))])
    has_torch = hasattr(torch, name)
    form = c.pick("form", ["nn", "nn_inplace", "F_false", "F_kw", "F_self", "F_inplace"]
                  + (["torch", "torch_kw"] if has_torch else []) + (["native"] if name == "dropout" else []))
    fF, fT = getattr(F, name), getattr(torch, name, None)
    if form.startswith("nn"):
        key = c.module(DROPOUTS[name][0](0.3, inplace=form == "nn_inplace"), name)
        c.step_h(lambda m, h: m.M[key](h))
    else:
        c.step_h({
            "F_false": lambda m, h: fF(h, 0.3, False),
            "F_kw": lambda m, h: fF(h, p=0.3, training=False),
            "F_self": lambda m, h: fF(h, 0.3, m.training),  # fx bakes the eval-mode False in
            "F_inplace": lambda m, h: fF(h, 0.3, False, True),
            "torch": lambda m, h: fT(h, 0.3, False),
            "torch_kw": lambda m, h: fT(h, p=0.3, train=False),
            "native": lambda m, h: torch.native_dropout(h, 0.3, False)[0],
        }[form])
    return st


CASTS = {
    "to_dtype": lambda m, h: h.to(torch.float64),
    "to_kw": lambda m, h: h.to(dtype=torch.float64),
    "to_device": lambda m, h: h.to("cpu"),
    "to_other": lambda m, h: h.to(h),
    "double": lambda m, h: h.double(),
    "type_as": lambda m, h: h.type_as(h),
}


@gen("cast", ANY, weight=0.4, families=("pointwise",))
def cast(c: Ctx, st: State) -> State:
    """dtype-preserving casts (float64 -> float64): lossy casts are not comparable at 1e-7."""
    c.step_h(CASTS[c.pick("form", list(CASTS))])
    return st


# ---- broadcasting binary ops ----------------------------------------------------------------------------
BIN = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
IOPS = {"add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "div": operator.itruediv}


def in_place_op(fn, a, b):
    """``operator.iadd(a, b)`` as one graph node (what torch.compile's graphs hold for ``a += b``):
    symbolic_trace records ``a += b`` as ``operator.add``, so the node is created explicitly."""
    if isinstance(a, fx.Proxy):
        return a.tracer.create_proxy("call_function", fn, (a, b), {})
    return fn(a, b)


def binary_forms(op: str) -> list[str]:
    if op in ("maximum", "minimum"):
        return ["torch", "torch_kw", "method"]
    forms = ["py", "torch", "torch_kw", "method", "method_kw", "unbound", "method_", "stmt_", "iop", "pyaug"]
    return forms + (["torch_alpha"] if op in ("add", "sub") else [])


def combine(op: str, form: str, swap: bool = False):
    """``fn(a, b)`` for one op in one form; ``swap``: the other operand comes first (out-of-place only)."""
    if swap:
        inner = combine(op, form)
        return lambda a, b: inner(b, a)
    t = getattr(torch, op)
    if form == "py":
        return BIN[op]
    if form == "torch":
        return t
    if form == "torch_kw":
        return lambda a, b: t(input=a, other=b)
    if form == "torch_alpha":
        return lambda a, b: t(a, b, alpha=0.5)
    if form == "method":
        return lambda a, b: getattr(a, op)(b)
    if form == "method_kw":
        return lambda a, b: getattr(a, op)(other=b)
    if form == "unbound":  # torch.Tensor.add(a, b)
        return lambda a, b: getattr(torch.Tensor, op)(a, b)
    if form == "method_":
        return lambda a, b: getattr(a, op + "_")(b)
    if form == "stmt_":
        def stmt(a, b):
            getattr(a, op + "_")(b)
            return a
        return stmt
    if form == "iop":
        return lambda a, b: in_place_op(IOPS[op], a, b)
    if form == "pyaug":
        def aug(a, b):
            if op == "add":
                a += b
            elif op == "sub":
                a -= b
            elif op == "mul":
                a *= b
            else:
                a /= b
            return a
        return aug
    raise ValueError(form)


def operand(c: Ctx, st: State, kind: str, positive: bool):
    """``fn(m, h) -> b``: the other operand."""
    C, nsp = st.C, len(st.sp)
    shape = (C,) + (1,) * nsp if st.first else (C,)
    if kind == "scalar":
        v = c.pick("value", [0.5, 2, 1.5, -0.75] if not positive else [0.5, 2, 1.5])
        return lambda m, h: v
    if kind in ("param_full", "param_bcast", "param_const"):
        if kind == "param_full":
            t = c.rand(*shape, lo=0.5, hi=1.5)
            if not positive and c.pick("zeros", [False, True]):
                t.view(-1)[c.subset(C)] = 0.0
        elif kind == "param_bcast":
            t = c.rand(*((1,) * len(shape)), lo=0.5, hi=1.5)
        else:
            t = torch.full(shape, 0.8, dtype=torch.float64)
        p = c.param(t, "s")
        return lambda m, h: P(m, p)
    if kind == "self_act":
        return (lambda m, h: torch.sigmoid(h) + 0.5) if positive else (lambda m, h: torch.tanh(h))
    f = dense(c, st, C, dense_form(c, st), c.pick("plant", PLANTS))  # branch: a residual / gating branch
    return (lambda m, h: torch.sigmoid(f(m, h)) + 0.5) if positive else f


@gen("binary", ANY, weight=4, families=("binary",), enum=("op", "form"))
def binary(c: Ctx, st: State) -> State:
    op = c.pick("op", ["add", "add", "sub", "mul", "mul", "div", "maximum", "minimum"])
    form = c.pick("form", binary_forms(op))
    rhs = c.pick("rhs", ["scalar", "param_full", "param_bcast", "param_const", "self_act", "branch", "branch"])
    if op in ("maximum", "minimum") and rhs == "scalar":
        raise Skip("maximum needs a tensor")
    in_place = form in ("method_", "stmt_", "iop", "pyaug")
    swap = (not in_place and op != "div" and form != "torch_alpha") and c.pick("swap", [False, True])
    if swap and rhs == "scalar" and form != "py":
        raise Skip("torch.add(2, h) is not a tensor op")
    b = operand(c, st, rhs, positive=op == "div")
    f = combine(op, form, swap)
    c.step_h(lambda m, h: f(h, b(m, h)))
    return st


# ---- long-range skips --------------------------------------------------------------------------------------
@gen("save", ANY + ("tok",), weight=1.5, families=(), enum=("clone",))
def save(c: Ctx, st: State) -> State:
    """Keep the current tensor for a later ``merge`` (``clone``: a copy, else the same tensor, which later
    in-place ops change too); the first saved tensor is the second output of a 2-output case."""
    if c.pick("clone", [False, True]):
        c.step(lambda m, e: e.stash.append(e.h.clone()))
    else:
        c.step(lambda m, e: e.stash.append(e.h))
    c.push = st
    return st


@gen("merge", ANY, weight=6, families=("binary", "cat"), enum=("how", "form"))
def merge(c: Ctx, st: State) -> State:
    same = [i for i, s in enumerate(c.stash) if s == st]
    catable = [i for i, s in enumerate(c.stash) if replace(s, C=st.C) == st and s.C + st.C <= 24]
    how = c.pick("how", ["add", "mul", "cat"])
    pool = catable if how == "cat" else same
    back = c.pick("back", list(range(1, len(pool) + 1)))
    i = pool[-back]
    if how == "cat":
        form = c.pick("form", ["cat", "cat_kw", "concat", "cat_tuple"])
        d = c.pick("dim", [st.ch, st.lit(st.ch)])
        fn = {"cat": lambda a, b: torch.cat([a, b], d), "cat_kw": lambda a, b: torch.cat(tensors=[a, b], dim=d),
              "concat": lambda a, b: torch.concat([a, b], dim=d), "cat_tuple": lambda a, b: torch.cat((b, a), d)}[form]
        c.step(lambda m, e: setattr(e, "h", fn(e.h, e.stash[i])))
        return replace(st, C=st.C + c.stash[i].C)
    f = combine(how, c.pick("form", binary_forms(how)))
    c.step(lambda m, e: setattr(e, "h", f(e.h, e.stash[i])))
    return st


# ---- stochastic depth ----------------------------------------------------------------------------------
@gen("stochastic_depth", ANY, weight=1, families=("stochastic_depth",))
def stochastic_depth(c: Ctx, st: State) -> State:
    from torchvision.ops import StochasticDepth
    from torchvision.ops import stochastic_depth as sd

    if not st.batched:
        raise Skip("row mode needs a batch axis")
    form = c.pick("form", ["nn", "F", "F_kw", "F_self"])
    f = dense(c, st, st.C, dense_form(c, st), c.pick("plant", PLANTS))
    if form == "nn":
        key = c.module(StochasticDepth(0.2, "row"), "sd")
        c.step_h(lambda m, h: h + m.M[key](f(m, h)))
    else:
        g = {"F": lambda m, x: sd(x, 0.2, "row", False),
             "F_kw": lambda m, x: sd(x, p=0.2, mode="batch", training=False),
             "F_self": lambda m, x: sd(x, 0.2, "row", m.training)}[form]
        c.step_h(lambda m, h: h + g(m, f(m, h)))
    return st


# ---- in-place writes into part of a tensor -------------------------------------------------------------
@gen("setitem", ANY, weight=1, families=("slice", "pointwise"))
def setitem(c: Ctx, st: State) -> State:
    """Channels overwritten in place: ``h[:, a:b] = 0`` (zero channels by assignment), a constant, a
    parameter; ``index_fill_``, ``masked_fill_``, ``narrow(...).zero_()``."""
    if st.C < 2:
        raise Skip("one channel")
    form = c.pick("form", ["setitem_zero", "setitem_const", "setitem_param", "index_fill_", "masked_fill_",
                           "narrow_zero_"])
    a = c.pick("start", range(0, st.C - 1))
    k = c.pick("k", range(1, st.C - a))
    lead = (slice(None),) * st.lit(st.ch)
    idx = lead + (slice(a, a + k),)
    d = st.ch
    if form == "setitem_param":
        p = c.param(c.randn(*((k,) + (1,) * len(st.sp) if st.first else (k,))), "fill")
    elif form == "index_fill_":
        t = c.buffer(torch.arange(a, a + k), "idx")
    elif form == "masked_fill_":
        shape = (st.C,) + (1,) * len(st.sp) if st.first else (st.C,)
        t = c.buffer(((torch.arange(st.C) >= a) & (torch.arange(st.C) < a + k)).reshape(shape), "mask")

    def fn(m, h):
        if form == "setitem_zero":
            h[idx] = 0.0
        elif form == "setitem_const":
            h[idx] = 0.7
        elif form == "setitem_param":
            h[idx] = P(m, p)
        elif form == "index_fill_":
            h.index_fill_(d, P(m, t), -0.5)
        elif form == "masked_fill_":
            h.masked_fill_(P(m, t), 0.0)
        else:
            h.narrow(d, a, k).zero_()
        return h
    c.step_h(fn)
    return st
