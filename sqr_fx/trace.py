"""nn.Module -> functional torch.fx GraphModule with shapes: the pass's front end.

Two tracers, one graph dialect downstream:

* ``torch.fx.symbolic_trace`` gives torch-level targets (modules, ``F.*``, methods);
* ``torch.export.export(...).module()`` gives aten-level targets (``aten.conv2d`` ...),
  used when symbolic tracing fails (Hugging Face transformers 5.x, data-dependent Python).

Weighted leaf modules (Linear, ConvNd, BatchNorm, LayerNorm, GroupNorm) are then rewritten into
their functional form with ``get_attr`` parameters, so one rules table keyed by op
meaning serves both front ends and the rewrite only ever slices ``get_attr`` tensors.
"""
from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
import inspect
import io
import operator
import warnings
from collections import OrderedDict
from itertools import chain
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .attention import functionalize_mha
from .errors import SqrFxError, TiedWeightsError, TraceError, TrainingModeError, UnsupportedDtypeError
from .normalize import NotFunctional, canonical, is_inplace, linear_from_matmul, normalize_args, resolve_inplace
from .rules.registry import has_hooks
from .equivalence import _flatten
from .verify import _clone, outputs_match, run_cloned

__all__ = ["to_graph", "fetch_attr", "propagate_shapes", "check_model", "tied_targets", "shared_ties", "ShapeFailure",
           "keyword_adapter"]

# modules whose forward differs between train() and eval()
_TRAIN_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.RReLU)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fetch_attr(root: nn.Module, target: str) -> Any:
    """Resolve a dotted ``get_attr`` target on ``root``."""
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def check_model(model: nn.Module) -> None:
    """Clear errors for inputs the exact rewrite cannot take (training mode, dtypes).

    Every submodule counts, not only the root: ``model.eval(); model.bn.train()`` leaves a BatchNorm
    that normalizes with batch statistics, a different function from the eval one."""
    culprits = [n or type(model).__name__ for n, m in model.named_modules()
                if m.training and isinstance(m, _TRAIN_SENSITIVE)]
    if culprits:
        raise TrainingModeError(
            "these modules are in training mode and compute a different function there: "
            f"{culprits[:5]}{' ...' if len(culprits) > 5 else ''}. minimize() preserves the eval-mode "
            "function: call model.eval() first (and do not switch submodules back to train())."
        )
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.dtype not in _FLOAT_DTYPES:
            raise UnsupportedDtypeError(f"tensor {name!r} has dtype {t.dtype}")
        if t.is_complex() or t.is_quantized:
            raise UnsupportedDtypeError(f"tensor {name!r} has dtype {t.dtype}; only real floating tensors are supported")
        if t.is_meta:
            raise SqrFxError(f"tensor {name!r} is on the meta device: minimize reads weight values; "
                             "load the weights first")


def _export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``torch.export`` with every dim dynamic where the model allows it (static otherwise); a graph
    that still holds in-place ops on views is functionalized by ``run_decompositions({})``."""
    auto = torch.export.Dim.AUTO
    dyn = tuple({d: auto for d in range(x.dim())} if isinstance(x, torch.Tensor) else None for x in example_inputs)
    try:
        ep = torch.export.export(model, example_inputs, dynamic_shapes=dyn)
    except Exception:  # noqa: BLE001 - fall back to a static export
        ep = torch.export.export(model, example_inputs)
    gm = ep.module()
    if any(is_inplace(n, gm) for n in gm.graph.nodes if n.op == "call_function"):
        try:
            resolve_inplace(_functional(copy.deepcopy(gm)))
        except NotFunctional:
            gm = ep.run_decompositions({}).module()
    return gm


def _functional(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace weighted leaf modules by functional calls on ``get_attr`` parameters (the graph only:
    the caller recompiles, as :func:`resolve_inplace` does right after)."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.MultiheadAttention):
            functionalize_mha(gm, node, mod)
            continue
        build = _FUNCTIONALIZE.get(type(mod))
        if build is None or has_hooks(mod):  # hooks: kept as a module
            continue
        bound = canonical(node, gm) if node.kwargs else (node.args, {})  # ``lin(input=x)`` too
        if bound is None or len(bound[0]) != 1 or bound[1]:
            continue
        with g.inserting_before(node):
            params = {p: g.get_attr(f"{node.target}.{p}") if getattr(mod, p, None) is not None else None
                      for p in ("weight", "bias", "running_mean", "running_var")}
            call = build(mod, bound[0][0], params)
            if call is None:
                for p in params.values():
                    if p is not None:
                        g.erase_node(p)
                continue
            new = g.call_function(*call)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.lint()
    return gm


def _conv(mod: nn.Module, x: fx.Node, p: dict):
    if mod.padding_mode != "zeros":
        return None
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[mod.weight.dim() - 2]
    return fn, (x, p["weight"], p["bias"], mod.stride, mod.padding, mod.dilation, mod.groups)


def _bn(mod: nn.Module, x: fx.Node, p: dict):
    if not mod.track_running_stats or mod.running_mean is None:
        return None  # batch statistics even in eval: no rule, the op stays frozen
    return F.batch_norm, (x, p["running_mean"], p["running_var"], p["weight"], p["bias"], False, 0.0, mod.eps)


_FUNCTIONALIZE: dict[type, Callable[..., Any]] = {
    nn.Linear: lambda m, x, p: (F.linear, (x, p["weight"], p["bias"])),
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.BatchNorm1d: _bn,
    nn.BatchNorm2d: _bn,
    nn.BatchNorm3d: _bn,
    nn.LayerNorm: lambda m, x, p: (F.layer_norm, (x, tuple(m.normalized_shape), p["weight"], p["bias"], m.eps)),
    nn.GroupNorm: lambda m, x, p: (F.group_norm, (x, m.num_groups, p["weight"], p["bias"], m.eps)),
    nn.Embedding: lambda m, x, p: None if m.max_norm is not None else (
        F.embedding, (x, p["weight"], m.padding_idx, None, 2.0, m.scale_grad_by_freq, m.sparse)),
}


def _unwrap_parametrizations(model: nn.Module) -> nn.Module:
    """Bake ``torch.nn.utils.prune`` / ``parametrize`` masks into plain dense tensors (on a copy)."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for mod in model.modules():
        for hook in list(getattr(mod, "_forward_pre_hooks", {}).values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(mod, hook._tensor_name)
            elif isinstance(hook, WeightNorm):  # the hook recomputes w = g v / |v|: bake it once
                torch.nn.utils.remove_weight_norm(mod, hook.name)
            elif isinstance(hook, SpectralNorm) and not mod.training:  # eval: fixed u, v; exact to bake
                torch.nn.utils.remove_spectral_norm(mod, hook.name)
        if parametrize.is_parametrized(mod):
            # not parametrize.remove_parametrizations: it deletes the property from the class,
            # which the copy shares with the user's original module
            values = {n: getattr(mod, n).detach().clone() for n in mod.parametrizations.keys()}
            mod.__class__ = mod.__class__.__bases__[0]
            del mod._modules["parametrizations"]
            for n, v in values.items():
                mod.register_parameter(n, nn.Parameter(v))
    return model


def _private_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that the front end may edit (functional layers, baked parametrizations).
    Parameters share their STORAGE with ``model`` (new Parameter objects), not copied: nothing in the pass writes into a tensor, a sliced
    parameter is a new tensor, and :func:`privatize` clones the ones the result still shares before it is
    returned (one copy of the kept weights, not two: a 1B-parameter model needs no extra 4 GB). Buffers
    are copied (a forward may update them); so are non-leaf tensor attributes (``prune`` leaves
    ``weight = orig * mask``)."""
    # new Parameter objects over the same storage: ``prune.remove`` assigns ``weight_orig.data`` on the copy
    memo: dict[int, Any] = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    for mod in model.modules():
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return deepcopy_modules(model, memo)


_NIL = object()


def deepcopy_modules(obj: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(obj, memo)``, with the modules of a tree copied without ``copy``'s generic path.

    ``deepcopy`` rebuilds a module through ``__reduce_ex__`` and deep-copies its ``__dict__``, a dozen hook
    tables included, one generic call each (~70 us a module: 8 % of the pass on a 512-layer chain). For a
    module whose class customises none of that (no ``__deepcopy__``, ``__reduce__``/``__reduce_ex__``,
    ``__getstate__``/``__setstate__``, ``__new__``, slots or copyreg entry of its own), this does the same
    steps directly: ``cls.__new__``, the memo entry first, every ``__getstate__`` entry deep-copied with the
    shared memo (an empty hook table becomes a new empty table of its type, memoized like deepcopy's, so
    aliasing stays as it was), child modules likewise, then ``__setstate__``. Anything else goes to
    ``copy.deepcopy``."""
    if not isinstance(obj, nn.Module):
        return copy.deepcopy(obj, memo)
    found = memo.get(id(obj), _NIL)
    if found is not _NIL:
        return found
    cls = type(obj)
    if not _plainly_copied(cls) or "__deepcopy__" in vars(obj):
        return copy.deepcopy(obj, memo)
    state = nn.Module.__getstate__(obj)
    new = cls.__new__(cls)
    memo[id(obj)] = new
    _keep_alive(obj, memo)
    copied: dict[str, Any] = {}
    for key, value in state.items():
        kind = type(value)
        if key == "_modules" and kind is dict:
            found = memo.get(id(value), _NIL)
            if found is _NIL:
                found = memo[id(value)] = {}
                _keep_alive(value, memo)
                for name, child in value.items():
                    found[name] = deepcopy_modules(child, memo)
            copied[key] = found
        elif (kind is dict or kind is OrderedDict) and not value:
            found = memo.get(id(value), _NIL)
            if found is _NIL:
                found = memo[id(value)] = kind()
                _keep_alive(value, memo)
            copied[key] = found
        else:
            copied[key] = copy.deepcopy(value, memo)
    new.__setstate__(copied)
    return new


def _keep_alive(x: Any, memo: dict[int, Any]) -> None:
    """What ``copy`` does for every object it memoizes: keep it alive while the memo is (its id stays its own)."""
    memo.setdefault(id(memo), []).append(x)


@functools.lru_cache(maxsize=None)
def _plainly_copied(cls: type) -> bool:
    """``copy.deepcopy`` of a ``cls`` instance takes the default ``__reduce_ex__`` path with ``nn.Module``'s state."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ is nn.Module.__setstate__ and cls.__new__ is object.__new__
            and cls not in copyreg.dispatch_table and not any("__slots__" in vars(k) for k in cls.__mro__))


def tied_targets(gm: fx.GraphModule) -> dict[str, list[str]]:
    """``get_attr`` targets whose tensor is read by more than one op, mapped to all its names.

    A module called as a ``call_module`` node (kept whole: hooks, no functional form) reads its own
    parameters and buffers without a ``get_attr``; each such call counts as one more reader, so a
    weight that module shares with a ``get_attr`` elsewhere is tied (kept whole) too."""
    users: dict[int, list[fx.Node]] = {}
    hidden: dict[int, int] = {}  # id(tensor) -> reads by call_module nodes
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = fetch_attr(gm, node.target)
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                users.setdefault(id(t), []).append(node)
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for key in {id(t) for t in chain(mod.parameters(), mod.buffers())}:
                hidden[key] = hidden.get(key, 0) + 1
    tied: dict[str, list[str]] = {}
    for key, nodes in users.items():
        if sum(len(n.users) for n in nodes) + hidden.get(key, 0) > 1:
            names = sorted({n.target for n in nodes})
            tied.update({n: names for n in names})
    return tied


def shared_ties(gm: fx.GraphModule) -> dict[str, list[str]]:
    """The tied targets that can be sliced once for all their readers (the rest stay whole).

    A tied 2-D tensor qualifies when every op reading it slices the SAME axis (1) along its own
    channel group: ``embedding`` (axis 1 = output channels) and ``linear`` with it as the weight and
    no tied bias (axis 1 = input channels; its output rows, axis 0, are then kept whole). The
    analysis couples those readers' channel ids (``Analysis._couple_shared``), so one keep mask
    slices the tensor once and it stays one parameter. Any other reader (a tied bias, ``addmm``,
    an elementwise op, a graph output ...) keeps the tensor whole, as before.
    """
    from .rules import lookup  # the rules import nothing from here; a local import avoids a cycle

    tied = tied_targets(gm)
    nodes: dict[tuple[str, ...], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in tied:
            nodes.setdefault(tuple(tied[node.target]), []).append(node)

    def sliceable(user: fx.Node, attr: fx.Node) -> bool:
        found = lookup(user, gm)
        if found is None or found[0].family not in ("embedding", "linear"):
            return False
        a = found[1]
        seen: list[fx.Node] = []
        fx.node.map_arg((user.args, user.kwargs), lambda n: seen.append(n) if n is attr else None)
        if a.get("weight") is not attr or len(seen) != 1:
            return False  # not the weight, or also read as the input / bias of the same op
        if found[0].family == "embedding":
            return True
        b = a.get("bias")
        return b is None or (isinstance(b, fx.Node) and b.op == "get_attr" and b.target not in tied)

    shared: dict[str, list[str]] = {}
    for names, attrs in nodes.items():
        t = fetch_attr(gm, attrs[0].target)
        if t.dim() == 2 and all(sliceable(u, n) for n in attrs for u in n.users):
            shared.update({n: list(names) for n in names})
    return shared


def recognize_patterns(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """Written-out LayerNorms, RMSNorms, rotary embeddings, MoE batched linears and run-time padded attention
    become the one call they compute, and slots of a fused projection become gathers (patterns.py,
    layer_norm_pattern.py)."""
    from .layer_norm_pattern import layer_norm_from_pattern  # (the patterns read the rules' op names)
    from .patterns import (expert_linear_from_pattern, fused_slots_from_pattern, padded_sdpa_from_pattern,
                           rms_norm_from_pattern, rotary_from_pattern)

    slots = fused_slots_from_pattern(gm)
    if slots:  # new nodes: their shapes (the rotary match reads them)
        propagate_shapes(gm, example_inputs)
    # LayerNorm first: its centred ``d * rsqrt(mean(d ** 2) + eps)`` would also read as an RMSNorm of d
    return (slots + layer_norm_from_pattern(gm, example_inputs) + rms_norm_from_pattern(gm, example_inputs)
            + rotary_from_pattern(gm, example_inputs) + expert_linear_from_pattern(gm)
            + padded_sdpa_from_pattern(gm, example_inputs))


def fold_constants(gm: fx.GraphModule) -> int:
    from .constfold import fold_constants as fold  # constfold reads fetch_attr from here

    return fold(gm)


# ---- one compile per pass ------------------------------------------------------------------------------
# The pass edits and rebuilds graphs several times (trace, in-place resolution, one rewrite per round) but
# runs them only through interpreters: their Python code is needed once, on the result. Inside the pass they
# are torch's ``_LazyGraphModule``, which compiles on first call (or ``.code``) instead of on every edit;
# :func:`compiled` makes the result an ordinary ``GraphModule`` (jit.script refuses the lazy class).
try:
    from torch.fx._lazy_graph_module import _LazyGraphModule, _use_lazy_graph_module
except ImportError:  # pragma: no cover - an older torch: every module compiles eagerly
    _LazyGraphModule = None


def lazy_graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)``, compiled on first call (see above)."""
    cls = _LazyGraphModule if _LazyGraphModule is not None else fx.GraphModule
    return cls(root, graph, class_name=class_name)


def _lazily(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the GraphModules torch makes inside it lazy (``symbolic_trace``'s)."""
    if _LazyGraphModule is None:
        return fn(*args, **kwargs)
    with _use_lazy_graph_module(True):
        return fn(*args, **kwargs)


def compiled(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` as an ordinary ``GraphModule``, its code generated from its graph as it is now. A lazy one
    becomes a plain one over the same modules, tensors and graph (its ``__dict__``, so non-persistent
    buffers, hooks and container types stay as they are); a plain one is recompiled in place."""
    if _LazyGraphModule is None or not isinstance(gm, _LazyGraphModule):
        gm.recompile()
        return gm
    out = fx.GraphModule.__new__(fx.GraphModule)  # (its own class, as every GraphModule has)
    out.__dict__.update(gm.__dict__)
    type(out).__name__ = type(gm).__name__
    out.graph = gm.graph  # (the setter owns the graph and compiles it)
    return out


_SPECIALIZED = (type(None), bool, int, float, str)


def _trace_at_defaults(model: nn.Module, n_inputs: int) -> fx.GraphModule:
    """``symbolic_trace`` with every forward argument the example inputs leave at a plain default
    (``attn_mask=None``, ``is_causal=False``: timm's ``forward(x, attn_mask=None)``) fixed to it.

    The analysis sees the call the example inputs make, and torch.export specializes such arguments
    the same way. Exactness for other calls: FX keeps the argument in the signature, under its own
    name, and guards it (``_assert_is_none``, ``torch._assert(arg == default)``), so the result
    refuses another value loudly instead of computing something else."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return _lazily(fx.symbolic_trace, model)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    fixed = {p.name: p.default for p in params[n_inputs:]
             if p.kind in named and type(p.default) in _SPECIALIZED}
    if not fixed or any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return _lazily(fx.symbolic_trace, model)
    gm = _lazily(fx.symbolic_trace, model, concrete_args=fixed)
    order = [p.name for p in params if p.kind in named]
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], order):
        node.target = name  # FX renames a fixed argument (``attn_mask_1``): callers use the original name
    gm.recompile()
    return gm


def _symbolic(model: nn.Module, example_inputs: tuple, expected: Any) -> fx.GraphModule:
    """``symbolic_trace`` + the functional front end, checked against the model on the example inputs.

    ``symbolic_trace`` records Python's ``h += 1`` out of place and cannot see aliasing, so a
    trace may compute another function than the model: the check catches that (and any
    in-place op it cannot make functional) and the caller falls back to ``torch.export``.
    The check's run of the graph is its shape propagation too (one real run, not two).
    A ``GraphModule`` ``model`` is edited in place."""
    gm = model if isinstance(model, fx.GraphModule) else _trace_at_defaults(model, len(example_inputs))
    normalize_args(gm, recompile=False)  # (resolve_inplace recompiles)
    gm = _functional(gm)
    resolve_inplace(gm)
    linear_from_matmul(gm)
    fold_constants(gm)
    got = propagate_shapes(gm, example_inputs)
    problem = outputs_match(expected, got)
    if problem is not None:
        raise NotFunctional(f"the symbolic trace computes another function than the model ({problem})")
    recognize_patterns(gm, example_inputs)  # (shapes known now; the new node keeps the product's shape)
    return gm


def to_graph(model: nn.Module, example_inputs: tuple, strict: bool = False) -> tuple[fx.GraphModule, str]:
    """Trace a private copy of ``model`` to a functional GraphModule with every node's shape on the
    example inputs (``node.meta['tensor_meta']``); return it and the tracer used.

    ``model`` is never modified. A ``GraphModule`` is copied, not re-traced (unless it mutates
    tensors in a way its graph cannot express: then it goes through ``torch.export`` too).
    """
    check_model(model)
    private = _unwrap_parametrizations(_private_copy(model))
    expected = _runs(private, example_inputs)
    # which inputs take another size on axis 1: asked of the copy BEFORE the front end edits its modules
    # (``nn.MultiheadAttention`` loses ``in_proj_weight`` to the functional form, and a copy that no longer
    # runs would answer "channels" for every input)
    varying = _varying_axis1(private, example_inputs)
    try:
        gm = _symbolic(private, example_inputs, expected)
        frontend = "GraphModule" if isinstance(private, fx.GraphModule) else "fx"
    except Exception as fx_err:  # noqa: BLE001 - any tracer failure (or a trace that differs) means: try export
        # the attempt may have edited its copy (a GraphModule's graph, attention modules): export a fresh one
        model = _unwrap_parametrizations(_private_copy(model))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm, frontend = _export(model, example_inputs), "export"
            normalize_args(gm, recompile=False)
            gm = _functional(gm)
            resolve_inplace(gm)
            linear_from_matmul(gm)
            fold_constants(gm)
        except Exception as ex_err:  # noqa: BLE001
            raise TraceError(
                f"could not trace {type(model).__name__}: torch.fx.symbolic_trace failed with "
                f"{type(fx_err).__name__}: {str(fx_err)[:500]}; torch.export.export failed with "
                f"{type(ex_err).__name__}: {str(ex_err)[:500]}"
            ) from ex_err
        problem = outputs_match(expected, propagate_shapes(gm, example_inputs))
        if problem is not None:  # (writes through aliased views, data-dependent code ...)
            raise TraceError(f"neither front end reproduces {type(model).__name__} on the example inputs: "
                             f"torch.fx.symbolic_trace failed with {type(fx_err).__name__}: {str(fx_err)[:300]}; "
                             f"torch.export's program computes another function ({problem})")
        _guard_sizes_of_one(model, gm, example_inputs)
        recognize_patterns(gm, example_inputs)
    if frontend == "export":  # what the RESULT accepts is the program's (its guards may fix what the model left free)
        varying = _varying_axis1(gm, example_inputs)
    _mark_varying_axis1(gm, varying)
    shared = shared_ties(gm)
    whole = {k: v for k, v in tied_targets(gm).items() if k not in shared}
    if strict and whole:
        raise TiedWeightsError(
            f"parameter(s) read by more than one op: {sorted(set(map(tuple, whole.values())))[:3]}. Slicing a "
            "tied weight for one reader would change the others; without strict=True they are kept whole "
            "(and stay tied), with every channel they touch. (A tensor read only as embedding tables and "
            "bias-untied linear weights is sliced once along its columns and needs no strict exception.)"
        )
    return gm, frontend


def _guard_sizes_of_one(model: nn.Module, gm: fx.GraphModule, example_inputs: tuple) -> None:
    """``torch.export`` with ``Dim.AUTO`` assumes every dynamic size is at least 2 (its 0/1
    specialization), and ``ExportedProgram.module()`` does not check that: a model that branches on a
    size (``if x.shape[0] > 1``) keeps only the branch taken at the example, and answers another size-1
    input with it, silently. For each dynamic size (one symbol: every input axis that shares it) larger
    than 1 in the example, the model and the program run with it at 1; where the model runs and the two
    differ, a guard node (``torch._assert``, "Guard failed: ...") makes the program (and so the result)
    refuse that size instead; the self-check then reports it in ``fixed_shapes``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):  # (nested inputs: no one-to-one map to probe by)
        return
    axes: dict[str, list[tuple[int, int]]] = {}  # symbol -> (input index, axis)
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        val = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(val, torch.Tensor) or val.dim() != x.dim():
            continue
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt) and x.shape[d] > 1:
                axes.setdefault(str(size.node.expr), []).append((i, d))
    refused = []
    for sym, where in axes.items():
        probe = list(example_inputs)
        for i, d in where:
            probe[i] = probe[i].narrow(d, 0, 1)
        try:
            want = run_cloned(model, tuple(probe), quiet=True)
        except Exception:  # noqa: BLE001 - the model refuses size 1 itself: nothing to guard
            continue
        try:
            got = run_cloned(gm, tuple(probe), quiet=True)
        except Exception:  # noqa: BLE001 - the program refuses it already
            continue
        # the same branch runs the same ops: rounding-close (float64 1e-12, float32 1e-6 of the output's
        # scale); another branch may differ by little (a factor a later norm divides out, up to its eps)
        rel = max([_SAME_BRANCH.get(t.dtype, 1e-3) for _, t in _flatten(want)
                   if isinstance(t, torch.Tensor) and t.is_floating_point()], default=1e-12)
        if outputs_match(want, got, rel=rel) is not None:
            refused.append(where[0])
    if not refused:
        return
    g = gm.graph
    with g.inserting_before(placeholders[-1].next):  # right after the inputs
        for i, d in refused:
            ok = g.call_function(operator.ge, (g.call_function(torch.ops.aten.sym_size.int, (placeholders[i], d)), 2))
            g.call_function(torch._assert, (ok, f"Guard failed: {placeholders[i].target}.size()[{d}] >= 2 (the "
                                                "exported program holds only the branch the model takes at sizes "
                                                "of 2 and more)"))
    gm.recompile()


_SAME_BRANCH = {torch.float64: 1e-12, torch.float32: 1e-6}


def _varying_axis1(model: nn.Module, example_inputs: tuple) -> set[int]:
    """Graph inputs are assumed to carry channels on axis 1 (NCHW, [B, F]); the inputs whose axis 1 ``model``
    accepts at another size (channels-last images, [C, L] signals) have no channels there: their indices.
    A channel axis is refused at the first layer, so the probe is cheap. ``model`` must be intact: any
    failure counts as a refusal."""
    from .verify import _new_values

    g = torch.Generator().manual_seed(0)
    varying = set()
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 4, 5) or not x.is_floating_point():
            continue
        shape = list(x.shape)
        shape[1] += 1
        probe = list(example_inputs)
        probe[i] = _new_values(x, tuple(shape), g)
        try:
            run_cloned(model, tuple(probe), quiet=True)
        except Exception:  # noqa: BLE001 - refused: axis 1 is a fixed width (channels)
            continue
        varying.add(i)
    return varying


def _mark_varying_axis1(gm: fx.GraphModule, varying: set[int]) -> None:
    """Mark the placeholders of the inputs :func:`_varying_axis1` found: no input feature is gathered along
    their axis 1."""
    from .rules.shape import VARYING_AXIS1

    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i in varying:
            node.meta[VARYING_AXIS1] = True


def _runs(model: nn.Module, example_inputs: tuple) -> Any:
    """The model's outputs on its example inputs; it must run there (everything downstream is checked
    against that run)."""
    try:
        return run_cloned(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - the user's inputs do not fit the model
        raise SqrFxError(
            f"the model does not run on example_inputs ({_describe(example_inputs)}): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e


class ShapeFailure(SqrFxError):
    """Shape propagation failed at ``node`` (its name): the graph does not run on the example inputs."""

    def __init__(self, message: str, node: str | None, detail: str = ""):
        super().__init__(message)
        self.node, self.detail = node, detail


class _NamingShapeProp(fx.Interpreter):
    """``ShapeProp`` (real tensors) that remembers the node it runs and prints no traceback."""

    def run_node(self, n: fx.Node) -> Any:
        self.current = n.name
        try:
            result = super().run_node(n)
        except Exception as e:
            raise RuntimeError(f"ShapeProp error for: node={n.format_node()}") from e
        self.record(n, result)
        return result

    @staticmethod
    def record(n: fx.Node, result: Any) -> None:
        """``n.meta['tensor_meta']`` (shape, dtype, strides of each tensor in ``result``) and ``['type']``."""
        found = False

        def meta(x: Any) -> Any:
            nonlocal found
            if isinstance(x, torch.Tensor):
                found = True
                return _extract_tensor_metadata(x, include_contiguity=False)  # (3 stride checks a tensor: unused)
            return x

        tensor_meta = fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = tensor_meta
        n.meta["type"] = type(result)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> Any:
    """Record every node's output shape/dtype in ``node.meta['tensor_meta']``; return the graph's
    outputs (run on copies of the inputs, without grad)."""
    prop = _NamingShapeProp(gm)
    prop.current = None
    try:
        return run_cloned(lambda *xs: prop.run(*xs), example_inputs)
    except Exception as e:  # noqa: BLE001 - the user's inputs do not fit the model
        cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
        raise ShapeFailure(f"the model does not run on example_inputs ({_describe(example_inputs)}): {detail}",
                           prop.current, detail) from e


def keyword_adapter(model: nn.Module, inputs: dict) -> tuple[nn.Module, tuple]:
    """A module whose ``forward(k1, k2, ...)`` calls ``model(k1=k1, k2=k2, ...)``, and the values in
    that order: a model driven by keyword inputs (as ``torch.export`` accepts them) traces with graph
    inputs named by the keys, so the result is called with the same keywords."""
    names = list(inputs)
    if not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise SqrFxError(f"keyword example inputs need identifier keys, got {names}")
    params = ", ".join(names)
    call = ", ".join(f"{n}={n}" for n in names)
    scope: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.model({call})\n", scope)  # noqa: S102 - names checked
    adapter = type(f"{type(model).__name__}Keywords", (nn.Module,), {"forward": scope["forward"]})()
    adapter.model = model
    return adapter.train(model.training), tuple(inputs[n] for n in names)


def _describe(inputs: tuple) -> str:
    return ", ".join(f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


#: ``node.meta`` key: the node's output shape on each derived input the graph accepts (other batch and
#: spatial/sequence sizes, :func:`sqr_fx.verify.derived_inputs`); ``None`` for a non-tensor output
OTHER_SHAPES = "sqr_fx.other_shapes"


#: ops whose output has their input's shape, run on meta tensors as ``empty_like`` (their meta kernels are
#: Python decompositions: MobileNet v2's 70 hardtanh cost 0.4 s)
_SAME_SHAPE = {F.batch_norm, torch.batch_norm, torch.ops.aten.batch_norm.default, F.group_norm,
               torch.ops.aten.group_norm.default, F.instance_norm, F.layer_norm, torch.ops.aten.layer_norm.default,
               F.rms_norm, F.relu, F.relu6, F.hardtanh, F.gelu, F.silu,
               F.hardswish, F.hardsigmoid, F.mish, F.elu, F.leaky_relu, F.softplus, F.dropout, torch.relu,
               torch.sigmoid, torch.tanh, torch.ops.aten.relu.default, torch.ops.aten.hardtanh.default,
               torch.ops.aten.gelu.default, torch.ops.aten.silu.default, torch.ops.aten.hardswish.default}


def _same_shape_module(mod: nn.Module) -> bool:
    """An activation / norm / dropout module: output shaped like its input (run as ``empty_like`` on meta)."""
    if isinstance(mod, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Identity,
                        nn.modules.dropout._DropoutNd)):
        return True
    return type(mod).__module__ == "torch.nn.modules.activation" and not isinstance(
        mod, (nn.MultiheadAttention, nn.GLU))


_aten = torch.ops.aten
#: pointwise binary ops whose output is the broadcast of their operands, typed by ``torch.result_type``
#: (division only where that type is floating: integer true division gives a float)
_BROADCAST = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, _aten.add.Tensor,
              _aten.sub.Tensor, _aten.mul.Tensor}
_DIVISION = {operator.truediv, torch.div, _aten.div.Tensor}
_LINEAR = {F.linear, _aten.linear.default}


class _Recording(fx.Interpreter):
    """Runs a graph and hands each node's output to ``record(node, output)``."""

    def __init__(self, gm: fx.GraphModule, record: Callable[[fx.Node, Any], None]):
        super().__init__(gm)
        self.record = record

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.record(n, out)
        return out


class _OnMeta(_Recording):
    """:class:`_Recording` on meta tensors: shapes and dtypes without data or FLOPs. Ops whose meta kernel
    is a slow Python decomposition but whose output shape is plain get it directly: norms and activations
    (their input's), pointwise binary ops (the broadcast), attention (the query's rows, the value's or
    output projection's width)."""

    def __init__(self, gm: fx.GraphModule, record: Callable[[fx.Node, Any], None],
                 on_meta: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None):
        super().__init__(gm, record)
        self.on_meta = on_meta if on_meta is not None else {}  # target -> (tensor, its meta copy): runs share it

    def get_attr(self, target, args, kwargs):
        t = super().get_attr(target, args, kwargs)
        if not isinstance(t, torch.Tensor):
            return t
        seen = self.on_meta.get(target)
        if seen is None or seen[0] is not t:
            seen = self.on_meta[target] = (t, t.to("meta"))
        return seen[1]

    def call_function(self, target, args, kwargs):
        if target in _SAME_SHAPE and args and isinstance(args[0], torch.Tensor):
            return _like(args[0])  # (meta batch_norm runs a Python decomposition: slow)
        out = _meta_shape(target, args, kwargs)
        return out if out is not None else super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        if _same_shape_module(mod) and args and isinstance(args[0], torch.Tensor):
            return _like(args[0])
        state = {k: v.to("meta") for k, v in chain(mod.named_parameters(), mod.named_buffers())}
        return torch.func.functional_call(mod, state, args, kwargs) if state else mod(*args, **kwargs)


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` of a meta tensor, without its Python reference implementation where ``x`` is
    dense (contiguous or channels-last: ``empty_like`` then keeps ``x``'s strides)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _meta_shape(target: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The empty meta output of a broadcasting binary op or an attention call, None for any other op (or
    operands outside the plain form: then the op's own meta kernel runs)."""
    from .attention import padded_sdpa, self_attention

    if target in _BROADCAST or target in _DIVISION:
        ops = args[:2]
        if len(args) != 2 or set(kwargs) - {"alpha"} or not any(isinstance(v, torch.Tensor) for v in ops) \
                or not all(isinstance(v, (torch.Tensor, int, float, bool)) for v in ops):
            return None
        dtype = torch.result_type(*ops)
        if target in _DIVISION and not dtype.is_floating_point:
            return None
        shape = torch.broadcast_shapes(*(tuple(v.shape) for v in ops if isinstance(v, torch.Tensor)))
        return torch.empty(shape, dtype=dtype, device="meta")
    if target in _LINEAR:  # (meta linear decomposes to t + addmm in Python: slow on deep stacks)
        x, w = args[0] if args else kwargs.get("input"), args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if len(args) + len(kwargs) > 3 or not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor) \
                or x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype \
                or not x.dtype.is_floating_point or (b is not None and (not isinstance(b, torch.Tensor) or b.dtype != w.dtype
                                                   or tuple(b.shape) not in ((w.shape[0],), ()))):
            return None  # (anything else, mismatches included: the op's own meta kernel decides, and raises)
        return torch.empty(tuple(x.shape[:-1]) + (w.shape[0],), dtype=x.dtype, device="meta")
    if target is self_attention and isinstance(args[0], torch.Tensor) and isinstance(args[7], torch.Tensor):
        x, w = args[0], args[7]
        return torch.empty(tuple(x.shape[:-1]) + (w.shape[0],), dtype=x.dtype, device="meta")
    if target in (F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default, padded_sdpa):
        q, k, v = (args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(("query", "key", "value")))
        positional = 10 if target is padded_sdpa else 6  # (sdpa's scale and enable_gqa are keyword-only)
        if len(args) > positional or kwargs.get("enable_gqa") or not all(isinstance(t, torch.Tensor) and t.dim() >= 2
                                                                         for t in (q, k, v)):
            return None  # (grouped heads: the op's own meta kernel)
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        try:  # [..., L, E] x [..., S, E] x [..., S, Ev] -> [broadcast of the leading axes, L, Ev]
            lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
            if isinstance(mask, torch.Tensor) and torch.broadcast_shapes(lead, mask.shape[:-2]) != lead:
                return None  # (a mask wider than the scores: the op's own kernel decides)
        except RuntimeError:
            return None
        return torch.empty(tuple(lead) + (q.shape[-2], v.shape[-1]), dtype=q.dtype, device="meta")
    return None


def _run_for_shapes(gm: fx.GraphModule, inputs: tuple, record: Callable[[fx.Node, Any], None],
                    on_meta: Optional[dict] = None) -> bool:
    """Run ``gm`` on tensors shaped like ``inputs`` for the shapes alone, calling ``record(node, output)``:
    on meta tensors (no data, no FLOPs); where meta tensors cannot run (a tensor made in forward on the
    CPU, a data-dependent size), on fake tensors, then for real. False when all three fail. ``on_meta``:
    the meta copies of ``gm``'s tensors, shared by several runs of the same graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for way in ("meta", "fake", "real"):
            try:
                if way == "meta":
                    _OnMeta(gm, record, on_meta).run(*(x.to("meta") if isinstance(x, torch.Tensor) else x
                                                       for x in inputs))
                elif way == "fake":  # (fake tensors log a refused size at ERROR level: kept quiet)
                    with _quiet("torch._subclasses.fake_tensor"), FakeTensorMode(allow_non_fake_inputs=True) as mode:
                        _Recording(gm, record).run(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                                                     for x in inputs))
                else:
                    with contextlib.redirect_stderr(io.StringIO()):
                        _Recording(gm, record).run(*_clone(inputs))
                return True
            except Exception:  # noqa: BLE001 - next way; a size the graph refuses fails them all
                continue
    return False


def propagate_shapes_meta(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """:func:`propagate_shapes` without a real forward where it can (:func:`_run_for_shapes`), for a graph
    whose outputs the caller does not need. A graph that fails every way gets :func:`propagate_shapes`,
    whose :class:`ShapeFailure` names the node."""
    if not _run_for_shapes(gm, example_inputs, _NamingShapeProp.record):
        propagate_shapes(gm, example_inputs)


class OtherSizes:
    """The derived inputs of :func:`sqr_fx.verify.derived_inputs` other than the example itself (another
    batch, spatial or sequence size), drawn on first use and shared by every round of one ``minimize``."""

    def __init__(self, example_inputs: tuple):
        self.example_inputs = example_inputs
        self._inputs: list[tuple] | None = None

    @property
    def inputs(self) -> list[tuple]:
        if self._inputs is None:
            from .verify import derived_inputs

            self._inputs = [x for _, x in derived_inputs(self.example_inputs)[1:]]
        return self._inputs


def record_other_shapes(gm: fx.GraphModule, sizes: OtherSizes | tuple) -> None:
    """Write :data:`OTHER_SHAPES` on every node: the shapes the graph's values take at the derived input
    sizes it accepts (``sizes``: an :class:`OtherSizes`, or the example inputs to derive them from). A rule
    whose channel mapping is read off the traced sizes (``reshape(-1, 6)``, ``flatten`` over axes of
    size 1) compares it with these, so a mapping that holds only at the traced size is refused. Shapes
    come from meta tensors (:func:`_run_for_shapes`); an input size the graph refuses is skipped."""
    if not isinstance(sizes, OtherSizes):
        sizes = OtherSizes(sizes)
    for node in gm.graph.nodes:
        node.meta[OTHER_SHAPES] = []
    on_meta: dict = {}
    for inputs in sizes.inputs:
        seen: dict[fx.Node, Any] = {}
        if _run_for_shapes(gm, inputs, lambda n, out: seen.__setitem__(
                n, tuple(out.shape) if isinstance(out, torch.Tensor) else None), on_meta):
            for node in gm.graph.nodes:
                node.meta[OTHER_SHAPES].append(seen.get(node))


def privatize(gm: nn.Module, model: nn.Module) -> None:
    """Clone, in place on ``gm``, every tensor it shares storage with ``model`` (:func:`_private_copy`
    shares the parameters): the result never aliases the input. A tensor held under several names
    stays one tensor; a Parameter stays a Parameter with its ``requires_grad``."""
    theirs = {t.untyped_storage().data_ptr() for t in chain(model.parameters(), model.buffers()) if t.numel()}
    clones: dict[int, Any] = {}

    def own(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.numel() or t.untyped_storage().data_ptr() not in theirs:
            return t
        if id(t) not in clones:
            c = t.detach().clone()
            clones[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
        return clones[id(t)]

    for mod in gm.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in list(store.items()):
                if t is not None and own(t) is not t:
                    store[k] = own(t)
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and own(v) is not v:
                setattr(mod, k, own(v))


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence ``logger`` below CRITICAL for the block (a probe whose failure is expected)."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
