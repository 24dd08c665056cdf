"""Generative differential fuzzer for ``sqr_fx.minimize``.

Each case is a random small model (a chain / DAG of ops drawn from the per-family generators in
``gen_*.py``, with residual adds, cats, splits and planted dead / constant / unused units), run
through ``minimize`` and compared with the original (``check_equivalence``, rtol 1e-7, atol 1e-9) at
the example shape, another batch size and another spatial / sequence size (shapes the original
rejects are skipped); the original must be untouched (purity) and a second ``minimize`` of the result
must remove nothing more (fixpoint). Failing cases are shrunk (ops dropped while the failure stays)
and printed as plain-data recipes; ``--save DIR`` writes each as a standalone regression test.

Outcomes per graph: ``ok``; ``clear`` (minimize raised a SqrFxError: a refusal, not a failure);
``guard`` (the export front end's result refuses another shape with ``Guard failed``, the documented
caveat); ``noexport`` (an export-front-end case whose model ``torch.export`` itself cannot export, static
or dynamic: torch's limit, met before sqr_fx is called; not run); failures: ``wrong`` (an output differs,
or the result raises where the original runs), ``raw`` (minimize raised something else), ``impure`` (the original was modified), ``fixpoint`` (a second
minimize removes more, fails, or the first hit ``MAX_ROUNDS``), ``gen`` (the generated model itself does
not run: a fuzzer bug). Rules that crashed or rewrite rounds minimize undid (contained, exact output)
are listed apart.

    python -m sqr_fx.testing.fuzz --n 200 --seed 0 [--save DIR]
    python -m sqr_fx.testing.fuzz --case 48        # one case seed, printed with its outcome
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import io
import re
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import SqrFxError
from ..minimize import minimize
from .checks import compare, error_head, export_module, impure, snapshot
from .core import GENS, Builder, Case, Op, build, load_generators

__all__ = ["generate_case", "run_case", "shrink", "check_case", "fuzz", "Result", "main"]

FAILURES = ("wrong", "raw", "impure", "fixpoint", "gen")
_LAYOUTS = ["vec", "seq", "hw", "sig", "img", "vol", "tok"]
_LAYOUT_P = [0.2, 0.22, 0.1, 0.13, 0.2, 0.05, 0.1]
# torch.export with dynamic shapes takes tens of seconds on Swin's window partition: export-dialect cases
# holding them are exported with static shapes, and fallback cases (minimize's own dynamic export) skip them
SLOW_EXPORT = ("swin", "patch_merging")
_WEIGHTED = ("linear", "conv", "batch_norm", "layer_norm", "group_norm", "rms_norm", "mha", "attention", "swin")

MAX_ROUNDS = 30  # a graph of <= 12 ops reaches its fixpoint in far fewer rounds; hitting this is a failure


#: ``--align N``: every case runs ``minimize(..., align=N)`` (latency-aware widths; None: the default pass)
ALIGN: Optional[int] = None


def _minimize_kwargs(seed: int = 0) -> dict:
    """``verify=False`` when minimize has a self-check: the fuzzer must see wrong answers itself. Half the
    cases (odd seeds) run ``portable=False``, whose result is a fixpoint of minimize; a portable result
    writes sqr_fx's helpers out in torch ops, which a second minimize may shrink further (still exact)."""
    params = inspect.signature(minimize).parameters
    kw: dict = {"max_rounds": MAX_ROUNDS}
    if "verify" in params:
        kw["verify"] = False
    if "portable" in params:
        kw["portable"] = seed % 2 == 0
    if ALIGN is not None:
        kw["align"] = ALIGN
    return kw


def generate_case(seed: int, n_ops: Optional[int] = None, frontend: Optional[str] = None,
                  exclude: tuple = ()) -> Case:
    """A random case, deterministic in ``seed`` (generators named in ``exclude`` are not drawn)."""
    load_generators()

    rng = np.random.default_rng(seed)
    layout = str(rng.choice(_LAYOUTS, p=_LAYOUT_P))
    batched = bool(rng.random() < (0.9 if layout == "hw" else 0.8))  # Swin blocks want a batch axis
    sp = {"vec": (), "seq": (int(rng.integers(3, 7)),), "tok": (int(rng.integers(3, 7)),),
          "hw": tuple(int(v) for v in rng.integers(4, 7, 2)), "sig": (int(rng.integers(6, 11)),),
          "img": tuple(int(v) for v in rng.integers(5, 9, 2)),
          "vol": tuple(int(v) for v in rng.integers(3, 5, 3))}[layout]
    C = int(rng.integers(5, 13)) if layout == "tok" else int(rng.integers(2, 9))
    B = int(rng.integers(2, 4))
    case = Case(seed, layout, C, sp, batched, B, alt_B=int(rng.choice([1, B + 3])), grow=int(rng.integers(2, 4)),
                frontend=frontend or str(rng.choice(["fx", "export", "fallback"], p=[0.7, 0.2, 0.1])),
                outputs=2 if rng.random() < 0.15 else 1)
    b = Builder(case)
    n = n_ops or int(rng.integers(3, 11))
    for _ in range(6 * n + 10):
        if len(b.applied) >= n:
            break
        gens = [g for g in GENS.values() if b.st.layout in g.layouts
                and not (case.frontend == "fallback" and g.name in SLOW_EXPORT) and g.name not in exclude]
        if rng.random() < 0.3:  # weighted layers close together: planted channels meet a reader
            gens = [g for g in gens if g.name in _WEIGHTED] or gens
        w = np.array([g.weight for g in gens], float)
        g = gens[int(rng.choice(len(gens), p=w / w.sum()))]
        b.apply(Op(g.name, int(rng.integers(2**31))))
    if rng.random() < 0.7:  # a weighted head reads the planted channels, so they can go
        for _ in range(3):
            if b.apply(Op("conv" if b.st.first else "linear", int(rng.integers(2**31)))):
                break
    case.ops = b.applied
    return case


@dataclass
class Result:
    case: Case
    status: str  # ok | clear | guard | noexport | wrong | raw | impure | fixpoint | gen
    detail: str = ""
    removed: bool = False
    seconds: float = 0.0
    max_rel_error: float = 0.0
    shrunk: Optional[Case] = None
    frontend: str = ""  # the front end minimize reports (fx / export / GraphModule)
    rule_crashes: list = field(default_factory=list)  # rules that raised inside minimize (contained: frozen)

    @property
    def failed(self) -> bool:
        return self.status in FAILURES

    def signature(self) -> tuple:
        head = self.detail.splitlines()[0] if self.detail else ""
        head = re.sub(r"\b(o\d+_\w+|_?\w+_\d+|\d+(\.\d+)?(e-?\d+)?)\b", "#", head)
        return self.status, head[:120]


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
        except Exception as e:  # noqa: BLE001 - a generator bug, not a minimize bug
            res.status, res.detail = "gen", f"the generated model does not run: {error_head(e)}"
            return _done(res, t0)
        if case.frontend == "export":
            try:
                model = export_module(model, ex, dynamic=not any(op.kind in SLOW_EXPORT for op in built.applied))
            except Exception as e:  # noqa: BLE001 - torch.export's own limit, before sqr_fx is called
                res.status, res.detail = "noexport", f"torch.export cannot export the generated model: {error_head(e)}"
                return _done(res, t0)
        before = snapshot(model)
        kw = _minimize_kwargs(case.seed)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints the tracebacks it re-raises
                small = minimize(model, (ex,), **kw)
        except SqrFxError as e:
            res.status, res.detail = "clear", error_head(e)
            return _done(res, t0)
        except Exception as e:  # noqa: BLE001
            res.status, res.detail = "raw", error_head(e)
            return _done(res, t0)
        rep = small.sqr_report
        res.removed, res.frontend = rep.rounds > 0, rep.frontend
        res.rule_crashes = [f for f in list(rep.frozen_ops) + list(getattr(rep, "declined", [])) if "failed on" in f]
        res.rule_crashes += list(getattr(rep, "set_aside", []))  # rewrite rounds undone by minimize's safety net
        diff, res.max_rel_error = compare(model, small, inputs)
        if diff.startswith("GUARD "):
            res.status, res.detail = "guard", diff[6:]
            return _done(res, t0)
        if diff:
            res.status, res.detail = "wrong", diff
            return _done(res, t0)
        touched = impure(model, before)
        if touched:
            res.status, res.detail = "impure", touched
            return _done(res, t0)
        if rep.rounds >= MAX_ROUNDS:
            res.status = "fixpoint"
            res.detail = (f"no fixpoint: every one of {MAX_ROUNDS} rounds removed something (params "
                          f"{rep.params_before} -> {rep.params_after}, input features dropped "
                          f"{rep.input_features_dropped})")
            return _done(res, t0)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                again = minimize(small, (ex,), **kw)
        except Exception as e:  # noqa: BLE001 - minimize fails on its own output
            res.status, res.detail = "fixpoint", f"second minimize raised {error_head(e)}"
            return _done(res, t0)
        r2 = again.sqr_report
        if r2.params_after < r2.params_before and not kw.get("portable", False):
            res.status = "fixpoint"
            res.detail = f"second minimize removed {r2.params_before - r2.params_after} more parameters"
            return _done(res, t0)
        diff, err = compare(model, again, {"example": inputs["example"]})
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


def crash_signatures(r: Result) -> set:
    """``rule 'NAME': ExcType: message`` of each contained rule crash (node names left out)."""
    out = set()
    for f in r.rule_crashes:
        m = re.search(r"rule '([^']+)' failed on.*?\): (\w+: .*?)\)?$", f)
        g = re.search(r"the rewritten graph failed at [^:]+: (.*?)\)?$", f)
        if m:
            out.add(f"rule '{m.group(1)}': {m.group(2)[:160]}")
        elif g:
            out.add("a rewrite round was undone, the rewritten graph failed: " + re.sub(r"\d+", "#", g.group(1))[:160])
        else:
            out.add(re.sub(r"\d+", "#", f)[:160])
    return out


def shrink(res: Result, budget: int = 60, same=None) -> Case:
    """Drop ops (one at a time, repeatedly), simplify the header and the planting while ``same(result)``
    holds (default: the same failure as ``res``)."""
    same = same or (lambda r: _same(r, res))
    case, evals = res.case.with_ops(res.case.ops), 0

    def still(c: Case) -> Optional[Case]:
        nonlocal evals
        evals += 1
        return c.with_ops(build(c).applied) if same(run_case(c)) else None

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
            case = still(replace(case, **{field_: value})) or case
    for i in range(len(case.ops)):  # planted structure / masks / zero gammas that do not matter: off
        for k, plain in [(k, _PLAIN[k.rstrip("12")]) for k in case.ops[i].args if k.rstrip("12") in _PLAIN]:
            if evals < budget and i < len(case.ops) and case.ops[i].args.get(k, plain) != plain:
                trial = case.with_ops(case.ops)
                trial.ops[i].args[k] = plain
                case = still(trial) or case
    return case


_PLAIN = {"plant": "none", "mask": None, "gamma0": False, "zeros": False}


def fuzz(n: int, seed: int = 0, shrink_per_class: int = 1, log=print, time_limit: Optional[float] = None,
         exclude: tuple = ()):
    """Run ``n`` cases; returns (results, failure classes {signature: [results]}, contained rule crashes
    {signature: [results]}). The first ``shrink_per_class`` results of each class get ``.shrunk``;
    ``exclude``: generators not drawn."""
    t0 = time.perf_counter()
    results, classes, crashes = [], {}, {}
    for i in range(n):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        r = run_case(generate_case(seed * 1_000_003 + i, exclude=exclude))
        results.append(r)
        if r.failed:
            group = classes.setdefault(r.signature(), [])
            group.append(r)
            if len(group) <= shrink_per_class:
                r.shrunk = shrink(r)
            log(f"  [case seed {r.case.seed}] {r.status}: {r.detail.splitlines()[0][:160]}")
        for sig in crash_signatures(r):
            group = crashes.setdefault(sig, [])
            group.append(r)
            if len(group) <= shrink_per_class and not r.failed:
                r.shrunk = shrink(r, same=lambda q, sig=sig: sig in crash_signatures(q))
    return results, classes, crashes


def summary(results: list[Result], seconds: float) -> str:
    count = {s: sum(r.status == s for r in results) for s in ("wrong", "raw", "clear", "guard", "impure", "fixpoint",
                                                             "gen", "noexport")}
    rows = [("graphs run", len(results)), ("graphs where something was removed", sum(r.removed for r in results)),
            ("wrong outputs", count["wrong"]), ("raw (non-SqrFxError) errors", count["raw"]),
            ("clear SqrFxErrors", count["clear"]),
            ("export shape guard refusals (documented)", count["guard"]),
            ("impure (original modified)", count["impure"]),
            ("not a fixpoint", count["fixpoint"]), ("generator errors", count["gen"]),
            ("export cases torch.export itself refused (not run)", count["noexport"]),
            ("time", f"{seconds:.1f} s")]
    by_front = {}
    for r in results:
        by_front.setdefault(r.case.frontend, []).append(r)
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append(f"{'by case front end':<{w}}  " + ", ".join(
        f"{f}: {len(rs)} run / {sum(r.failed for r in rs)} failed" for f, rs in sorted(by_front.items())))
    crashed = sum(bool(r.rule_crashes) for r in results)
    lines.insert(5, f"{'graphs with contained rule crashes':<{w}}  {crashed} (a rule or a rewrite failed inside "
                    "minimize, which froze the op / undid the round)")
    fell = sum(r.case.frontend == "fx" and r.frontend == "export" for r in results)
    lines.append(f"{'fx cases minimize traced via export':<{w}}  {fell} (symbolic_trace failed on them)")
    return "\n".join(lines)


def regression_file(r: Result) -> str:
    case = r.shrunk or r.case
    first = (r.detail.splitlines() or [r.status])[0].replace('"""', "'''")
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
    ap.add_argument("--align", type=int, default=None, help="run every case with minimize(..., align=N)")
    args = ap.parse_args(argv)
    global ALIGN
    ALIGN = args.align
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torch's deprecation / export chatter on thousands of graphs
    if args.case is not None:
        case = generate_case(args.case)
        r = run_case(case)
        print(case, "\n", case.recipe(), "\n", r.status, r.detail)
        return int(r.failed)
    t0 = time.perf_counter()
    results, classes, crashes = fuzz(args.n, args.seed, args.shrink_per_class, time_limit=args.time_limit,
                                     log=lambda line: print(line, flush=True))
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
    if crashes:
        print(f"\ncontained rule crashes ({len(crashes)}; minimize froze the op, the output stayed exact):")
    for k, (sig, rs) in enumerate(sorted(crashes.items(), key=lambda kv: -len(kv[1]))):
        case = next((r.shrunk for r in rs if r.shrunk is not None), rs[0].case)
        print(f"\n[c{k + 1}] x{len(rs)}: {sig}\n    minimal recipe: {case.recipe()}")
        print(f"    rebuild: {case!r}".replace("\n", "\n    "))
    refusals: dict = {}
    for r in results:
        if r.status in ("clear", "guard", "noexport"):
            refusals.setdefault(r.signature(), []).append(r)
    if refusals:
        print(f"\nclear refusals ({sum(map(len, refusals.values()))} graphs; not failures), most frequent first:")
    for sig, rs in sorted(refusals.items(), key=lambda kv: -len(kv[1]))[:8]:
        print(f"  {rs[0].status} x{len(rs)}: {rs[0].detail[:200]}\n      e.g. case seed {rs[0].case.seed}: "
              f"{rs[0].case.recipe()[:200]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
