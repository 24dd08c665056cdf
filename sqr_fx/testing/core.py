"""The fuzzer's plain-data model description and the builder that turns it into an ``nn.Module``.

A :class:`Case` is a header (input layout, sizes, front end, seed) plus a list of :class:`Op`:
each op names a generator (``Op.kind``), a seed for its weights and planting, and the choices the
generator drew (``Op.args``: argument form, widths, kernel, planting mode ...). Everything is plain
Python data, so a failing case prints as a readable recipe and ``build(case)`` rebuilds it exactly.

A generator is a function ``gen(c: Ctx, st: State) -> State``: it reads the current tensor's
:class:`State`, draws its choices with ``c.pick`` (recorded in ``Op.args`` the first time, replayed
afterwards), registers parameters / modules on the model, appends a forward step and returns the
new state. A replayed choice that the current state does not admit raises :class:`Skip` (the op is
left out): so a shrunk op list still builds.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["State", "Op", "Case", "Ctx", "Skip", "FuzzNet", "Built", "GENS", "gen", "build", "load_generators",
           "CL", "CF", "PLANTS", "plant", "param_of", "divisors"]

CL = ("vec", "seq", "hw")  # channels last: [B,] C | [B,] T, C | [B,] H, W, C
CF = ("sig", "img", "vol")  # channels first: [B,] C, L | [B,] C, H, W | [B,] C, D, H, W


class Skip(Exception):
    """The op does not apply to the current state (its recorded choice is invalid here)."""


@dataclass(frozen=True)
class State:
    """The main tensor at the example input: layout, channel count, spatial sizes, batch axis or not.
    ``tok``: integer token ids ``[B,] T`` with vocabulary ``C``."""

    layout: str
    C: int
    sp: tuple = ()
    batched: bool = True

    @property
    def first(self) -> bool:
        return self.layout in CF

    @property
    def rank(self) -> int:
        return len(self.sp) + self.batched + (self.layout != "tok")

    @property
    def ch(self) -> int:
        """Negative channel axis (the same batched or not)."""
        return -(len(self.sp) + 1) if self.first else -1

    @property
    def sp_axes(self) -> list[int]:
        """Negative axes of the spatial dims."""
        n = len(self.sp)
        return list(range(-n, 0)) if self.first else list(range(-n - 1, -1))

    def lit(self, neg: int) -> int:
        return neg + self.rank

    def shape(self, B: int) -> tuple:
        if self.layout == "tok":
            core = tuple(self.sp)
        else:
            core = (self.C,) + tuple(self.sp) if self.first else tuple(self.sp) + (self.C,)
        return ((B,) if self.batched else ()) + core


@dataclass
class Op:
    kind: str
    seed: int
    args: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Op({self.kind!r}, {self.seed}, {self.args!r})"

    def short(self) -> str:
        a = ", ".join(f"{k}={v!r}" for k, v in self.args.items() if k != "form")
        return f"{self.kind}[{self.args.get('form', '')}]({a})"


@dataclass
class Case:
    """One random model: input ``State`` fields, batch sizes, spatial growth for the third shape,
    front end (``fx``: the nn.Module; ``export``: ``torch.export(...).module()``; ``fallback``: an
    nn.Module symbolic_trace cannot trace, so minimize falls back to torch.export), outputs (1 or 2)."""

    seed: int
    layout: str
    C: int
    sp: tuple = ()
    batched: bool = True
    B: int = 2
    alt_B: int = 5
    grow: int = 3
    frontend: str = "fx"
    outputs: int = 1
    ops: list = field(default_factory=list)

    def __repr__(self) -> str:
        head = ", ".join(f"{k}={getattr(self, k)!r}" for k in
                         ("seed", "layout", "C", "sp", "batched", "B", "alt_B", "grow", "frontend", "outputs"))
        ops = "".join(f"\n    {op!r}," for op in self.ops)
        return f"Case({head}, ops=[{ops}\n])"

    def recipe(self) -> str:
        head = f"{self.frontend} {self.layout}{State(self.layout, self.C, self.sp, self.batched).shape(self.B)}"
        return head + (" 2 outputs" if self.outputs == 2 else "") + ": " + " -> ".join(op.short() for op in self.ops)

    def with_ops(self, ops: list) -> "Case":
        return replace(self, ops=[Op(o.kind, o.seed, dict(o.args)) for o in ops])

    def input_state(self) -> State:
        return State(self.layout, self.C, tuple(self.sp), self.batched)

    def inputs(self) -> dict[str, torch.Tensor]:
        """The example input and the other shapes: another batch size, another spatial size."""
        st = self.input_state()
        out = {"example": self._tensor(st.shape(self.B), 1)}
        if st.batched:
            out["batch"] = self._tensor(st.shape(self.alt_B), 2)
        if st.sp:
            grown = replace(st, sp=tuple(s + self.grow + i for i, s in enumerate(st.sp)))
            out["spatial"] = self._tensor(grown.shape(self.B), 3)
        return out

    def example(self) -> torch.Tensor:
        return self._tensor(self.input_state().shape(self.B), 0)

    def _tensor(self, shape, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 10 + k)
        if self.layout == "tok":
            return torch.randint(0, self.C, shape, generator=g)
        return torch.randn(shape, generator=g, dtype=torch.float64)


GENS: dict[str, "Gen"] = {}


@dataclass
class Gen:
    name: str
    fn: Callable[["Ctx", State], State]
    layouts: tuple
    weight: float
    families: tuple  # rule families this generator targets (documentation; coverage is measured)
    enum: tuple  # the choices that decide which targets it emits (enumerated by the coverage test)
    by_layout: bool  # its targets also depend on the layout (conv1d / conv2d ...)


def gen(name: str, layouts: tuple, weight: float = 1.0, families: tuple = (), enum: tuple = ("form",),
        by_layout: bool = False):
    def deco(fn):
        GENS[name] = Gen(name, fn, layouts, weight, families, enum, by_layout)
        return fn
    return deco


class _Env:
    def __init__(self, x):
        self.h, self.stash = x, []


class FuzzNet(nn.Module):
    """Runs the steps on the current tensor ``e.h``; parameters live on ``P``, modules in ``M``."""

    def __init__(self, fallback: bool = False, outputs: int = 1):
        super().__init__()
        self.P = nn.Module()
        self.M = nn.ModuleDict()
        self.steps: list = []
        self.fallback, self.outputs = fallback, outputs

    def forward(self, x):
        if self.fallback:  # Python control flow on the rank: symbolic_trace fails, torch.export traces it
            assert x.dim() > 0, "rank"
        e = _Env(x)
        for step in self.steps:
            step(self, e)
        if self.outputs == 2 and e.stash:
            return e.h, e.stash[0]
        return e.h


def param_of(m: nn.Module, name: Optional[str]):
    return None if name is None else getattr(m.P, name)


class Ctx:
    """What a generator sees: choices (``pick``), random weights, registration, steps."""

    def __init__(self, builder: "Builder", op: Op, index: int):
        self.b, self.op, self.prefix = builder, op, f"o{index}"
        self.pick_rng = np.random.default_rng([op.seed, 1])
        self.prng = np.random.default_rng([op.seed, 2])  # planting
        self.g = torch.Generator().manual_seed(op.seed)  # weights
        self.params: list = []
        self.modules: list = []
        self.ties: list = []  # (kind, name, in, out): weights / modules a later ``tie`` op may read again
        self.steps: list = []
        self.offered: dict[str, list] = {}
        self._n = 0

    @property
    def batched(self) -> bool:
        return self.b.st.batched

    @property
    def stash(self) -> list[State]:
        return self.b.stash

    def pick(self, key: str, choices, weights=None) -> Any:
        choices = list(choices)
        self.offered.setdefault(key, choices)
        if key in self.op.args:
            v = self.op.args[key]
            if v not in choices:
                raise Skip(f"{key}={v!r} not valid here")
            return v
        if not choices:
            raise Skip(f"no valid {key}")
        if weights is not None:
            w = np.asarray(weights, float)
            v = choices[int(self.pick_rng.choice(len(choices), p=w / w.sum()))]
        else:
            v = choices[int(self.pick_rng.integers(len(choices)))]
        self.op.args[key] = v
        return v

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, dtype=torch.float64) * scale

    def rand(self, *shape, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=self.g, dtype=torch.float64)

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}_{hint}{self._n}"

    def param(self, t: Optional[torch.Tensor], hint: str = "w", tie: bool = False) -> Optional[str]:
        """Register ``t``; ``tie``: a 2-D ``[out, in]`` weight later ops may share (``gen_tie``)."""
        if t is None:
            return None
        name = self._name(hint)
        self.params.append((name, nn.Parameter(t.detach().clone()), True))
        if tie:
            self.ties.append(("param", name, t.shape[1], t.shape[0]))
        return name

    def buffer(self, t: torch.Tensor, hint: str = "buf") -> str:
        name = self._name(hint)
        self.params.append((name, t.detach().clone(), False))
        return name

    def module(self, mod: nn.Module, hint: str = "m", tie: Optional[tuple] = None) -> str:
        """Register ``mod``; ``tie=(kind, in, out)``: a module later ops may call again."""
        name = self._name(hint)
        self.modules.append((name, mod.double().eval()))
        if tie:
            self.ties.append((tie[0], name, tie[1], tie[2]))
        return name

    def step(self, fn: Callable) -> None:
        """``fn(m, e)`` on the env (``e.h``, ``e.stash``)."""
        self.steps.append(fn)

    def step_h(self, fn: Callable) -> None:
        """``h = fn(m, h)``."""
        def step(m, e):
            e.h = fn(m, e.h)
        self.steps.append(step)

    def subset(self, n: int, lo: int = 1, hi: Optional[int] = None) -> list[int]:
        """A random non-empty proper subset of range(n) (planting)."""
        hi = max(lo, min(n - 1 if hi is None else hi, n - 1)) if n > 1 else 1
        k = int(self.prng.integers(lo, hi + 1)) if n > 1 else 1
        return sorted(self.prng.choice(n, size=min(k, n), replace=False).tolist())


# planting modes for a weight [out, in_per_group, *k]: r0 = dead rows with zero bias (zero channels),
# rc = dead rows with a non-zero bias (constant channels), cols = unused inputs, rand = unstructured
# zeros, all = the whole weight zero (every output constant)
PLANTS = ("none", "r0", "rc", "cols", "rand", "r0+cols", "rc+cols", "rc+rand", "r0+rc", "all")


@torch.no_grad()
def plant(c: Ctx, W: torch.Tensor, b: Optional[torch.Tensor], mode: str, groups: int = 1) -> None:
    out, in_g = W.shape[0], W.shape[1]
    parts = mode.split("+")
    if "rand" in parts:
        W[torch.as_tensor(c.prng.random(tuple(W.shape)) < 0.4)] = 0.0
    if "all" in parts:
        W.zero_()
    for kind in ("r0", "rc"):
        if kind in parts:
            rows = c.subset(out)
            W[rows] = 0.0
            if b is not None:
                b[rows] = 0.0 if kind == "r0" else torch.as_tensor(1.0 + c.prng.random(len(rows)), dtype=b.dtype)
    if "cols" in parts:
        per = out // groups
        for col in c.subset(in_g * groups):
            g, local = divmod(col, in_g)
            W[g * per:(g + 1) * per, local] = 0.0


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Built:
    model: nn.Module
    applied: list  # the ops that built (Skip-ped ones left out)
    state: State


class Builder:
    """Applies ops one by one; each new step is run eagerly on the example input right away, so an op
    whose shapes do not work out (or that the state tracking got wrong) is skipped, never built."""

    def __init__(self, case: Case):
        self.case = case
        self.net = FuzzNet(fallback=case.frontend == "fallback", outputs=case.outputs).eval()
        self.st = case.input_state()
        self.stash: list[State] = []
        self.ties: list = []
        self.applied: list[Op] = []
        self.last: Optional[Ctx] = None

    def apply(self, op: Op) -> bool:
        """Build ``op`` on the current state; False (nothing registered) when it does not apply."""
        if op.kind not in GENS:
            return False
        g = GENS[op.kind]
        before = dict(op.args)
        c = self.last = Ctx(self, op, len(self.applied))
        try:
            if self.st.layout not in g.layouts:
                raise Skip("layout")
            with warnings.catch_warnings():  # deprecations (weight_norm ...): the forms stay on purpose
                warnings.simplefilter("ignore")
                st = g.fn(c, self.st)
        except Exception as e:  # Skip, or a generator that cannot build here
            if not isinstance(e, Skip) and os.environ.get("SQR_FUZZ_DEBUG"):
                print(f"skipped {op!r} on {self.st}: generator raised {type(e).__name__}: {str(e)[:200]}")
            op.args.clear()
            op.args.update(before)
            return False
        for name, t, is_param in c.params:
            if is_param:
                self.net.P.register_parameter(name, t)
            else:
                self.net.P.register_buffer(name, t)
        for name, mod in c.modules:
            self.net.M[name] = mod
        env = _Env(self.case.example())  # the whole chain again: views and aliases as in the model
        try:
            with torch.enable_grad(), warnings.catch_warnings():  # grad on, as torch.export traces it
                warnings.simplefilter("ignore")
                for step in self.net.steps + c.steps:
                    step(self.net, env)
            if tuple(env.h.shape) != st.shape(self.case.B):
                raise Skip(f"shape {tuple(env.h.shape)}, expected {st.shape(self.case.B)}")
        except Exception as e:  # noqa: BLE001 - the op does not run here: leave it out
            if os.environ.get("SQR_FUZZ_DEBUG"):
                print(f"skipped {op!r} on {self.st}: {type(e).__name__}: {str(e)[:200]}")
            for name, _, _ in c.params:
                delattr(self.net.P, name)
            for name, _ in c.modules:
                del self.net.M[name]
            op.args.clear()
            op.args.update(before)
            return False
        self.net.steps.extend(c.steps)
        self.ties += c.ties
        if getattr(c, "push", None) is not None:
            self.stash.append(c.push)
        self.st = st
        self.applied.append(op)
        return True


def build(case: Case) -> Built:
    """The float64 eval-mode model of ``case`` (deterministic)."""
    load_generators()
    b = Builder(case)
    for op in case.ops:
        b.apply(op)
    return Built(b.net.double().eval(), b.applied, b.st)


def load_generators() -> dict[str, Gen]:
    """Import the generator modules (registration fills :data:`GENS`)."""
    from . import gen_attention, gen_layers, gen_norms, gen_pointwise, gen_shape, gen_spatial  # noqa: F401

    return GENS


def fan_in_scale(n: int) -> float:
    return 1.0 / math.sqrt(max(n, 1))
