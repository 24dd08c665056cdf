"""Generative differential fuzzer for ``sqr_fx.minimize``.

Each case is a random small model (a chain / DAG of ops drawn from the per-family generators in
``gen_*.py``, with residual adds, cats, splits and planted dead / constant / unused units), run
through ``minimize`` and compared with the original (``check_equivalence``, rtol 1e-7, atol 1e-9) at
the example shape, another batch size and another spatial / sequence size (shapes the original
rejects are skipped); the original must be untouched (purity) and a second ``minimize`` of the result
must remove nothing more (fixpoint). Failing cases are shrunk (ops dropped while the failure stays)
and printed as plain-data recipes; ``--save DIR`` writes each as a standalone regression test.

    python -m sqr_fx.testing.fuzz --n 200 --seed 0 [--save DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..equivalence import check_equivalence, max_relative_error
from ..errors import EquivalenceError, SqrFxError
from ..minimize import minimize
from .core import GENS, Builder, Case, Op, build

__all__ = ["generate_case", "run_case", "shrink", "check_case", "fuzz", "Result", "main"]

RTOL, ATOL = 1e-7, 1e-9
FAILURES = ("wrong", "raw", "impure", "fixpoint", "gen")
_LAYOUTS = ["vec", "seq", "hw", "sig", "img", "vol", "tok"]
_LAYOUT_P = [0.2, 0.22, 0.1, 0.13, 0.2, 0.05, 0.1]


def _minimize_kwargs() -> dict:
    """``verify=False`` when minimize has a self-check: the fuzzer must see wrong answers itself."""
    return {"verify": False} if "verify" in inspect.signature(minimize).parameters else {}


def generate_case(seed: int, n_ops: Optional[int] = None, frontend: Optional[str] = None) -> Case:
    """A random case, deterministic in ``seed``."""
    from . import gen_attention, gen_layers, gen_pointwise, gen_shape  # noqa: F401  (registration)

    rng = np.random.default_rng(seed)
    layout = str(rng.choice(_LAYOUTS, p=_LAYOUT_P))
    batched = bool(rng.random() < 0.8) or layout == "hw" and bool(rng.random() < 0.7)
    sp = {"vec": (), "seq": (int(rng.integers(3, 7)),), "tok": (int(rng.integers(3, 7)),),
          "hw": tuple(int(v) for v in rng.integers(4, 7, 2)), "sig": (int(rng.integers(6, 11)),),
          "img": tuple(int(v) for v in rng.integers(5, 9, 2)), "vol": tuple(int(v) for v in rng.integers(3, 5, 3))}[layout]
    C = int(rng.integers(5, 13)) if layout == "tok" else int(rng.integers(2, 9))
    B = int(rng.integers(2, 4))
    case = Case(seed, layout, C, sp, batched, B, alt_B=int(rng.choice([1, B + 3])), grow=int(rng.integers(2, 4)),
                frontend=frontend or str(rng.choice(["fx", "export", "fallback"], p=[0.7, 0.2, 0.1])),
                outputs=2 if rng.random() < 0.15 else 1)
    b = Builder(case)
    n = n_ops or int(rng.integers(2, 9))
    for _ in range(6 * n + 10):
        if len(b.applied) >= n:
            break
        gens = [g for g in GENS.values() if b.st.layout in g.layouts]
        w = np.array([g.weight for g in gens], float)
        g = gens[int(rng.choice(len(gens), p=w / w.sum()))]
        b.apply(Op(g.name, int(rng.integers(2**31))))
    case.ops = b.applied
    return case


@dataclass
class Result:
    case: Case
    status: str  # ok | clear | wrong | raw | impure | fixpoint | gen
    detail: str = ""
    removed: bool = False
    seconds: float = 0.0
    max_rel_error: float = 0.0
    shrunk: Optional[Case] = None

    @property
    def failed(self) -> bool:
        return self.status in FAILURES

    def signature(self) -> tuple:
        head = self.detail.splitlines()[0] if self.detail else ""
        head = re.sub(r"\b(o\d+_\w+|_?\w+_\d+|\d+(\.\d+)?(e-?\d+)?)\b", "#", head)
        return self.status, head[:120]


class _CloneInputs(nn.Module):
    """Each model gets its own copy of the inputs (an in-place op on the input must not leak)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *xs):
        return self.m(*(x.clone() for x in xs))


def _head(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb) if "sqr_fx" in f.filename
                  and "testing" not in f.filename), "")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" + (f"  [at {where}]" if where else "")


def _export(model: nn.Module, x: torch.Tensor) -> nn.Module:
    dyn = ({d: torch.export.Dim.AUTO for d in range(x.dim())},)
    try:
        return torch.export.export(model, (x,), dynamic_shapes=dyn).module()
    except Exception:  # noqa: BLE001 - a static export accepts the example shape only
        return torch.export.export(model, (x,)).module()


def _state(m: nn.Module) -> dict:
    return {k: (id(v), v.detach().clone()) for k, v in m.state_dict(keep_vars=True).items()}


def _impure(m: nn.Module, before: dict) -> str:
    after = m.state_dict(keep_vars=True)
    if after.keys() != before.keys():
        return f"minimize changed the original's state_dict keys: {sorted(set(after) ^ set(before))[:4]}"
    for k, (ident, v) in before.items():
        if id(after[k]) != ident or not torch.equal(after[k].detach(), v):
            return f"minimize modified the original's {k}"
    return ""


def _compare(ref: nn.Module, cand: nn.Module, inputs: dict) -> tuple[str, float]:
    """('' or what differs, max relative error) over the shapes the reference accepts."""
    worst = 0.0
    for name, x in inputs.items():
        try:
            with torch.no_grad():
                r = ref(x.clone())
        except Exception:  # noqa: BLE001 - the original rejects this shape: nothing to compare
            continue
        try:
            check_equivalence(_CloneInputs(ref), _CloneInputs(cand), (x,), rtol=RTOL, atol=ATOL)
        except EquivalenceError as e:
            with torch.no_grad():
                c = cand(x.clone())
            rs, cs = (r if isinstance(r, tuple) else (r,)), (c if isinstance(c, tuple) else (c,))
            errs = [max_relative_error(a, b) for a, b in zip(rs, cs) if a.shape == b.shape]
            worst = max(errs + [0.0])
            return f"{name} shape {tuple(x.shape)}: {str(e).splitlines()[-1].strip()}", worst
        except Exception as e:  # noqa: BLE001 - the result crashes where the original runs
            return f"{name} shape {tuple(x.shape)}: the result raised {_head(e)}", float("inf")
    return "", worst


def run_case(case: Case) -> Result:
    """Build, minimize, compare, check purity and the fixpoint. Never raises."""
    t0 = time.perf_counter()
    res = Result(case, "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            built = build(case)
            model, ex, inputs = built.model, case.example(), case.inputs()
            with torch.no_grad():
                model(ex.clone())
            if case.frontend == "export":
                model = _export(model, ex)
        except Exception as e:  # noqa: BLE001 - a generator bug, not a minimize bug
            res.status, res.detail = "gen", f"the generated model does not run: {_head(e)}"
            return _done(res, t0)
        before = _state(model)
        kw = _minimize_kwargs()
        try:
            small = minimize(model, (ex,), **kw)
        except SqrFxError as e:
            res.status, res.detail = "clear", _head(e)
            return _done(res, t0)
        except Exception as e:  # noqa: BLE001
            res.status, res.detail = "raw", _head(e)
            return _done(res, t0)
        rep = small.sqr_report
        res.removed = rep.rounds > 0
        diff, res.max_rel_error = _compare(model, small, inputs)
        if diff:
            res.status, res.detail = "wrong", diff
            return _done(res, t0)
        impure = _impure(model, before)
        if impure:
            res.status, res.detail = "impure", impure
            return _done(res, t0)
        try:
            again = minimize(small, (ex,), **kw)
        except Exception as e:  # noqa: BLE001 - minimize fails on its own output
            res.status, res.detail = "fixpoint", f"second minimize raised {_head(e)}"
            return _done(res, t0)
        r2 = again.sqr_report
        if r2.params_after < r2.params_before:
            res.status = "fixpoint"
            res.detail = f"second minimize removed {r2.params_before - r2.params_after} more parameters"
            return _done(res, t0)
        diff, err = _compare(model, again, {"example": inputs["example"]})
        if diff:
            res.status, res.detail, res.max_rel_error = "fixpoint", f"second minimize is not exact: {diff}", err
    return _done(res, t0)


def _done(res: Result, t0: float) -> Result:
    res.seconds = time.perf_counter() - t0
    return res


def check_case(case: Case) -> None:
    """Assert ``case`` passes (the body of a saved regression test)."""
    r = run_case(case)
    assert not r.failed, f"{r.status}: {r.detail}\nrecipe: {case.recipe()}"


def _same(r: Result, target: Result) -> bool:
    if r.status != target.status:
        return False
    return r.status == "wrong" or r.detail.split(":")[0] == target.detail.split(":")[0]


def shrink(res: Result, budget: int = 60) -> Case:
    """Drop ops (one at a time, repeatedly) and simplify the header while the same failure remains."""
    case, evals = res.case.with_ops(res.case.ops), 0

    def still(c: Case) -> Optional[Case]:
        nonlocal evals
        evals += 1
        r = run_case(c)
        return c.with_ops(build(c).applied) if _same(r, res) else None

    changed = True
    while changed and evals < budget:
        changed = False
        for i in reversed(range(len(case.ops))):
            if evals >= budget:
                break
            smaller = still(case.with_ops(case.ops[:i] + case.ops[i + 1:]))
            if smaller is not None:
                case, changed = smaller, True
                break
    for field_, value in (("frontend", "fx"), ("outputs", 1)):
        if getattr(case, field_) != value and evals < budget:
            simpler = still(replace(case, **{field_: value}))
            case = simpler or case
    for op in case.ops:  # planted structure that does not matter: none
        for k in [k for k, v in op.args.items() if k.startswith("plant") and v != "none"]:
            if evals >= budget:
                break
            trial = case.with_ops(case.ops)
            trial.ops[case.ops.index(op)].args[k] = "none"
            case = still(trial) or case
    return case


def fuzz(n: int, seed: int = 0, shrink_per_class: int = 1, log=print, time_limit: Optional[float] = None):
    """Run ``n`` cases; returns (results, failure classes {signature: [results]})."""
    t0 = time.perf_counter()
    results, classes = [], {}
    for i in range(n):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        r = run_case(generate_case(seed * 1_000_003 + i))
        results.append(r)
        if r.failed:
            group = classes.setdefault(r.signature(), [])
            group.append(r)
            if len(group) <= shrink_per_class:
                r.shrunk = shrink(r)
            log(f"  [{i}] {r.status}: {r.detail.splitlines()[0][:160]}")
    return results, classes


def summary(results: list[Result], seconds: float) -> str:
    count = {s: sum(r.status == s for r in results) for s in ("wrong", "raw", "clear", "impure", "fixpoint", "gen")}
    rows = [("graphs run", len(results)), ("graphs where something was removed", sum(r.removed for r in results)),
            ("wrong outputs", count["wrong"]), ("raw (non-SqrFxError) errors", count["raw"]),
            ("clear SqrFxErrors", count["clear"]), ("impure (original modified)", count["impure"]),
            ("not a fixpoint", count["fixpoint"]), ("generator errors", count["gen"]),
            ("time", f"{seconds:.1f} s")]
    by_front = {}
    for r in results:
        by_front.setdefault(r.case.frontend, []).append(r)
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append(f"{'by front end':<{w}}  " + ", ".join(
        f"{f}: {len(rs)} run / {sum(r.failed for r in rs)} failed" for f, rs in sorted(by_front.items())))
    return "\n".join(lines)


def regression_file(r: Result) -> str:
    case = r.shrunk or r.case
    first = r.detail.splitlines()[0].replace('"""', "'''")
    return (f'"""sqr_fx fuzzer regression ({r.status}): {first}\n\nRecipe: {case.recipe()}\n"""\n'
            f"from sqr_fx.testing import Case, Op, check_case  # noqa: F401\n\n"
            f"CASE = {case!r}\n\n\ndef test_fuzz_regression():\n    check_case(CASE)\n")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sqr_fx.testing.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="number of random graphs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, default=None, help="write each failure class as a regression test here")
    ap.add_argument("--shrink-per-class", type=int, default=1, help="failures shrunk per class (0: none)")
    ap.add_argument("--case", type=int, default=None, help="run the one case of this case seed and print it")
    ap.add_argument("--time-limit", type=float, default=None, help="stop starting new graphs after this many s")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.case is not None:
        case = generate_case(args.case)
        r = run_case(case)
        print(case, "\n", case.recipe(), "\n", r.status, r.detail)
        return int(r.failed)
    t0 = time.perf_counter()
    results, classes = fuzz(args.n, args.seed, args.shrink_per_class, time_limit=args.time_limit)
    print("\n" + summary(results, time.perf_counter() - t0))
    if classes:
        print(f"\nfailure classes ({len(classes)}):")
    for k, (sig, rs) in enumerate(sorted(classes.items(), key=lambda kv: -len(kv[1]))):
        r = rs[0]
        case = r.shrunk or r.case
        err = f", max rel error {r.max_rel_error:.3g}" if r.status == "wrong" else ""
        print(f"\n[{k + 1}] {r.status} x{len(rs)}{err}: {r.detail.splitlines()[0][:300]}")
        print(f"    minimal recipe: {case.recipe()}")
        print(f"    rebuild: {case!r}".replace("\n", "\n    "))
        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1(repr(sig).encode()).hexdigest()[:8]
            (args.save / f"test_fuzz_{r.status}_{name}.py").write_text(regression_file(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
