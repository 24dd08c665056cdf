"""``minimize``: analysis -> plan -> rewrite, repeated to a fixpoint.

Each round traces shapes, runs the channel analysis (values forward, coupling groups,
liveness backward), and rewrites the graph without the removed groups. Removing a
group can empty a producer row (its output becomes constant) or leave a producer's
outputs unread, so rounds repeat until a plan removes nothing.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import gc
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

from .analysis import Analysis, Plan
from .errors import SqrFxError, UnsupportedDtypeError
from .portable import finish
from .report import LayerRow, MinimizeReport
from .rewrite import RuleFailure, rewrite
from .rules import lookup
from .rules.registry import OPAQUE
from .rules.shape import is_input_gather
from .size import count_parameters, count_stored_floats
from .trace import OtherSizes, ShapeFailure, fetch_attr, keyword_adapter, privatize, propagate_shapes_meta, to_graph
from .values import META_KEY
from .verify import self_check

__all__ = ["minimize"]

_WEIGHTED = ("linear", "conv", "addmm")


def _check_inputs(example_inputs: Sequence[Any]) -> tuple:
    if example_inputs is None:
        raise SqrFxError("example_inputs are needed (a tuple of tensors, or a dict of keyword inputs)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor) and (x.is_complex() or x.is_quantized):
            raise UnsupportedDtypeError(f"example input {i} has dtype {x.dtype}")
    return example_inputs


def _weighted_nodes(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        found = lookup(node, gm)
        w = found[1].get("weight") if found and found[0].family in _WEIGHTED else None
        if isinstance(w, fx.Node) and w.op == "get_attr":  # (a weight computed in forward has no row)
            yield node, found[1]


def _layer_params(gm: fx.GraphModule, a) -> tuple[tuple[int, ...], int]:
    w = fetch_attr(gm, a["weight"].target)
    b = a.get("bias")
    nb = fetch_attr(gm, b.target).numel() if isinstance(b, fx.Node) and b.op == "get_attr" else 0
    return tuple(w.shape), w.numel() + nb


def _record(gm: fx.GraphModule, plan: Plan, rows: dict[str, LayerRow]) -> int:
    """Add this round's removals to the per-layer rows; return input features dropped."""
    def split(info):
        if info is None:
            return 0, 0
        gone = plan.removed_at(info)
        unused = plan.unused[plan.root_of[info.ids]]
        return int((gone & unused).sum()), int((gone & ~unused).sum())

    for node, a in _weighted_nodes(gm):
        row = rows.get(a["weight"].target)
        if row is None:
            continue
        ou, oc = split(node.meta.get(META_KEY))
        iu, ic = split(a["input"].meta.get(META_KEY))
        row.out_unused += ou
        row.out_const += oc
        row.in_unused += iu
        row.in_const += ic
    dropped = 0
    for node in gm.graph.nodes:
        is_input = node.op == "placeholder" or (node.args and is_input_gather(node.args[0]))
        if is_input and node.meta.get(META_KEY) is not None:
            dropped += int(plan.removed_at(node.meta[META_KEY]).sum())
    return dropped


class _Phases:
    """``with phase("name"):`` adds the block's CPU seconds (``time.process_time``) to ``seconds["name"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.process_time() - t0


def _older_objects_frozen(fn: Callable) -> Callable:
    """Run ``fn`` with the objects that exist before the call out of the garbage collector's sight
    (``gc.freeze``; ``gc.unfreeze`` after). A pass allocates many small objects (graph nodes, infos),
    which triggers full collections that traverse the whole process, the model's modules included: on a
    512-block chain that was ~25 % of the pass. Garbage the pass itself makes is still collected. Skipped
    when the collector is off or the process froze objects itself (a pre-fork server): its state is
    left as it was."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not gc.isenabled() or gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return wrapper


@_older_objects_frozen
def minimize(
    model: nn.Module | torch.export.ExportedProgram,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    *,
    strict: bool = False,
    drop_inputs: bool = True,
    max_rounds: int = 100,
    verbose: bool = False,
    verify: bool = True,
    portable: bool = True,
    align: int | None = None,
    gqa_heads: str = "gather",
) -> fx.GraphModule:
    """Return a new, smaller GraphModule computing the same function as ``model``.

    Channels/features that no kept reader reads (unused) or that hold the same value
    for every input (constant) are removed; constants are folded exactly into their
    readers; this repeats until nothing more can go. ``model`` is never modified.

    Args:
        model: an ``nn.Module`` in eval mode (traced with ``torch.fx.symbolic_trace``,
            falling back to ``torch.export``), a ``torch.fx.GraphModule``, or a
            ``torch.export.ExportedProgram`` (then an ExportedProgram is returned, exported again
            with the original's dynamic dims; ``example_inputs`` default to the program's own). Masks may be
            zeros in the weights, ``torch.nn.utils.prune`` or ``parametrize`` masks.
        example_inputs: a tuple of example inputs, or a dict of keyword inputs (the result then
            takes them by the same names); drives shape propagation and the self-check.
        strict: raise :class:`~sqr_fx.UnsupportedOpError` naming the first op with no rule
            (and :class:`~sqr_fx.TiedWeightsError` for a tensor read by several ops), instead of
            keeping (freezing) the channels they touch.
        drop_inputs: gather away input features no layer reads (graph inputs keep their shape).
        verbose: print the per-layer report.
        verify: the self-check (``sqr_fx.verify``): before returning, run the original and the result
            on the example inputs, one more batch row, and another spatial / sequence size where the
            original accepts one; raise :class:`~sqr_fx.EquivalenceError` naming the first differing
            output instead of returning a wrong model. Its CPU time is ``report.verify_seconds``.
        portable: the result calls torch only (sqr_fx's helpers written out in torch ops), so it saves,
            loads and jit-scripts without sqr_fx. ``False`` keeps the helper calls (compensated norms,
            attention forms) that a second ``minimize`` shrinks again (the Squeeze-Release cycle). Either
            way the result has modules again where the original had Linear/Conv/BatchNorm/LayerNorm/
            GroupNorm/Embedding modules, follows ``.train()``/``.eval()``, and keeps folded constants in
            buffers (``sqr_fx.portable``, docs/design.md "The returned module").
        align: latency-aware widths. With ``align=N`` (e.g. 8 or 16) every width the pass reduces (conv
            channels, Linear features, MLP units, per-head query/key/value dims) ends a multiple of N, or
            as it was: the cheapest removable channels (fewest stored floats) are kept back. Kernels pad
            odd widths (oneDNN convs work in blocks of 16 channels), so an aligned result is often faster
            for a little more size; keeping a removable channel is exact (a constant one is then not
            folded). ``report.align_floats`` is the size it costs, the rows' ``out_align``/``in_align``
            the channels it kept. None or 1: no alignment.
        gqa_heads: grouped-query attention (kv heads repeated for r q heads each, Hugging Face's
            ``repeat_kv`` or sdpa's ``enable_gqa``). ``"gather"`` (default): q heads go one by one; the
            kept q heads read their kv heads through one ``index_select`` of the kept copies on the head
            axis wherever they are no longer r per kept kv head. ``"groups"``: q heads go only in whole kv
            groups, so the uniform repeat stays (no gather; smaller savings). docs/benchmarks.md measures both.

    Returns:
        A ``torch.fx.GraphModule`` with plain dense parameters; ``result.sqr_report`` holds
        the :class:`~sqr_fx.MinimizeReport`.

    >>> import torch, sqr_fx
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).eval()
    >>> with torch.no_grad(): m[0].weight[1] = 0; m[0].bias[1] = -1.0   # unit 1 is dead: relu(-1) = 0
    >>> small = sqr_fx.minimize(m, (torch.randn(5, 4),))
    >>> small.sqr_report.params_after < small.sqr_report.params_before
    True
    >>> _ = sqr_fx.check_equivalence(m, small, (torch.randn(7, 4),))
    """
    if isinstance(model, torch.export.ExportedProgram):  # a program in, a program out (program.py)
        from .program import minimize_program

        return minimize_program(model, example_inputs, strict=strict, drop_inputs=drop_inputs,
                                max_rounds=max_rounds, verbose=verbose, verify=verify, align=align,
                                gqa_heads=gqa_heads)
    t0 = time.perf_counter()
    if align is not None and (isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align < 1):
        raise SqrFxError(f"align must be a positive integer (or None), got {align!r}")
    align = int(align or 1)
    if gqa_heads not in ("gather", "groups"):
        raise SqrFxError(f"gqa_heads must be 'gather' or 'groups', got {gqa_heads!r}")
    versions = [(n, p._version) for n, p in model.named_parameters()] if isinstance(model, nn.Module) else []
    if isinstance(example_inputs, dict):  # keyword inputs, as torch.export takes them
        model, example_inputs = keyword_adapter(model, example_inputs)
    example_inputs = _check_inputs(example_inputs)
    phase = _Phases()
    with phase("trace"):
        gm, frontend = to_graph(model, example_inputs, strict=strict)
    rows: dict[str, LayerRow] = {}
    for node, a in _weighted_nodes(gm):
        shape, n = _layer_params(gm, a)
        fam = lookup(node, gm)[0].family
        rows[a["weight"].target] = LayerRow(a["weight"].target.rsplit(".", 1)[0], fam, shape, params_before=n)
    report = MinimizeReport(frontend, params_before=count_parameters(model), floats_before=count_stored_floats(model),
                            align=align, phase_seconds=phase.seconds)
    frozen: list[str] = []
    traced = gm
    set_aside: set[str] = set()  # nodes whose rule failed: frozen in every later analysis
    previous: fx.GraphModule | None = None
    snapshot = (rows, report.input_features_dropped)  # the report before the last round (set by each round)
    other_sizes = OtherSizes(example_inputs)  # the reshape rules' other input sizes, drawn once
    shaped = gm  # the graph whose node shapes are current: to_graph's run on the example inputs
    for _ in range(max_rounds):
        try:
            if gm is not shaped:  # a rewritten graph: shapes from meta tensors, no real forward
                with phase("shapes"):
                    propagate_shapes_meta(gm, example_inputs)
                shaped = gm
        except ShapeFailure as e:
            if previous is None:
                raise  # the traced model itself: the inputs do not fit
            # the last rewrite broke the graph at e.node (a bug in one rule): undo that round and keep
            # the nodes around the failure as they are from now on
            culprits = _near(gm, e.node) & {n.name for n in previous.graph.nodes}
            if strict or not culprits or culprits <= set_aside:
                raise SqrFxError(f"internal error: a rewrite round produced a graph that fails at node "
                                 f"{e.node} on the example inputs ({e.detail}); please report this model") from e
            set_aside |= culprits
            report.set_aside.append(f"{', '.join(sorted(culprits))} (the rewritten graph failed at {e.node}: {e.detail})")
            gm, previous = previous, None
            rows, report.input_features_dropped = snapshot
            report.rounds -= 1
            continue
        for node in gm.graph.nodes:
            if node.name in set_aside:
                node.meta[OPAQUE] = True
        with phase("analysis"):
            analysis = Analysis(gm, strict=strict, drop_inputs=drop_inputs, example_inputs=other_sizes,
                                align=align, gqa_heads=gqa_heads).run()
        with phase("plan"):
            plan = analysis.plan()
        frozen = plan.frozen_nodes
        report.declined = plan.declined
        report.tied_tensors = sorted(analysis.tied)
        report.shared_tensors = sorted(analysis.shared)
        if not plan.any:
            if align > 1:
                report.align_floats = _alignment_cost(gm, plan, rows)
            break
        try:
            with phase("rewrite"):
                new = rewrite(gm, plan)
        except RuleFailure as e:  # the rule could not emit its node: redo this round with it frozen
            if strict or e.node in set_aside:
                raise SqrFxError(str(e)) from e.__cause__
            set_aside.add(e.node)
            report.set_aside.append(str(e))
            continue
        snapshot = (copy.deepcopy(rows), report.input_features_dropped)  # restored if this round is undone
        report.input_features_dropped += _record(gm, plan, rows)
        gm, previous = new, gm
        report.rounds += 1
    _strip_meta(gm)
    for node, a in _weighted_nodes(gm):
        row = rows.get(a["weight"].target)
        if row is not None:
            row.shape_after, row.params_after = _layer_params(gm, a)
    report.rows = list(rows.values())
    privatize(gm, model)  # the front end shared the input's parameters; the result owns its tensors
    changed = [n for (n, v), p in zip(versions, model.parameters()) if p._version != v]
    if changed:  # (the front end runs the model's forward on a copy that shares its parameters)
        raise SqrFxError(f"the model's forward writes into its parameters in place ({', '.join(changed[:3])}): "
                         "its function changes with every call, so no smaller model computes it")
    with phase("finish"):
        gm = finish(gm, model, portable=portable)  # modules, train/eval, fold buffers, torch-only graph (portable/)
    report.params_after, report.floats_after = count_parameters(gm), count_stored_floats(gm)
    report.frozen_ops = frozen
    if verify:
        report.verified_on, report.fixed_shapes, report.verify_seconds = self_check(
            model, traced, gm, example_inputs)
    report.seconds = time.perf_counter() - t0
    gm.sqr_report = report
    if verbose:
        print(report)
    return gm


def _alignment_cost(gm: fx.GraphModule, plan: Plan, rows: dict[str, LayerRow]) -> int:
    """At the fixpoint of an aligned run: the channels each layer keeps only for alignment (into
    ``rows``), and the stored floats they cost: the size of ``gm`` against ONE unaligned rewrite of it
    (what the last plan would remove without the alignment; -1 when that rewrite fails)."""
    aligned = plan.aligned
    for node, a in _weighted_nodes(gm):
        row = rows.get(a["weight"].target)
        if row is None:
            continue
        for info, attr in ((node.meta.get(META_KEY), "out_align"), (a["input"].meta.get(META_KEY), "in_align")):
            if info is not None:
                setattr(row, attr, int(aligned[plan.root_of[info.ids]].sum()))
    removed = plan.unaligned if plan.unaligned is not None else plan.removed
    bare = Plan(plan.root_of, removed, plan.unused, local_changes=plan.local_changes)  # align 1
    try:
        return count_stored_floats(gm) - count_stored_floats(rewrite(gm, bare))
    except Exception:  # noqa: BLE001 - an estimate only: the aligned result itself is unaffected
        return -1


def _near(gm: fx.GraphModule, name: str | None, depth: int = 2) -> set[str]:
    """``name`` and the nodes it reads, ``depth`` steps up: the candidates for a failed rewrite."""
    found = [n for n in gm.graph.nodes if n.name == name]
    out: set[str] = set()
    frontier = found
    for _ in range(depth + 1):
        out |= {n.name for n in frontier}
        frontier = [a for n in frontier for a in n.all_input_nodes if a.op not in ("placeholder", "get_attr")]
    return out


def _strip_meta(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        for k in [k for k in node.meta if k.startswith("sqr_fx.")]:
            node.meta.pop(k, None)
