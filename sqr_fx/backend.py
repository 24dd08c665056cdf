"""``torch.compile(model, backend="sqr_fx")``: minimize dynamo's graph, then hand it to the next backend.

Dynamo lifts a module's parameters and buffers to graph inputs
(``L_self_modules_conv1_parameters_weight_``) and passes their real tensors among the example
inputs. The backend binds those placeholders back to the tensors as ``get_attr`` constants (the
pass reads weight values), keeps the user's inputs as graph inputs (a ``SymInt`` of a dynamic
recompile is driven by its hint), minimizes, and compiles the smaller graph with ``next_backend``
(default ``"inductor"``). Each compiled graph's report is kept: :func:`last_report`, or a
``callback(report)`` passed through :func:`make_backend`. ``minimize`` keywords go to :func:`make_backend`,
or as ``torch.compile(model, backend="sqr_fx", options={"align": 8})``.

Inference only: the minimized graph holds its own (sliced) tensors, so training through it would
not update the model's parameters; a graph in training mode (batch statistics, dropout) is refused
by minimize's checks.

>>> import torch, sqr_fx
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
>>> fast = torch.compile(net, backend=sqr_fx.make_backend(next_backend="eager"))
>>> _ = fast(torch.randn(3, 4))
>>> sqr_fx.last_report().frontend
'GraphModule'
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .report import MinimizeReport

__all__ = ["sqr_fx_backend", "make_backend", "last_report"]

_REPORTS: list[MinimizeReport] = []


def last_report() -> Optional[MinimizeReport]:
    """The report of the graph the ``sqr_fx`` backend compiled last (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


def _is_state(node: fx.Node, example: Any) -> bool:
    """A placeholder dynamo lifted from the module's parameters or buffers."""
    name = str(node.target)
    return isinstance(example, nn.Parameter) or "_parameters_" in name or "_buffers_" in name


def _bind_state(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int]]:
    """A GraphModule with the lifted state as ``get_attr`` tensors; the positions of the user inputs."""
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # dynamo keeps its own graph
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    root = nn.Module()
    keep: list[int] = []
    for i, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(ex, torch.Tensor) and _is_state(node, ex)):
            keep.append(i)
            continue
        name = f"state_{i}_{node.name}"
        if isinstance(ex, nn.Parameter):
            root.register_parameter(name, ex)
            gm.register_parameter(name, ex)
        else:
            root.register_buffer(name, ex)
            gm.register_buffer(name, ex)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    for name, mod in gm.named_children():
        root.add_module(name, mod)
    out = fx.GraphModule(root, gm.graph)
    return out, keep


def _concrete(x: Any) -> Any:
    if isinstance(x, torch.SymInt):
        return int(x.node.hint)
    return x


def make_backend(next_backend: str | Callable = "inductor", callback: Callable[[MinimizeReport], Any] | None = None,
                 **minimize_kwargs: Any) -> Callable:
    """A torch.compile backend: minimize (``minimize_kwargs``), then compile with ``next_backend``."""

    def backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None, **_: Any) -> Callable:
        """``options``: ``torch.compile(..., options=...)``, more ``minimize`` keywords (e.g. ``align``)."""
        from .minimize import minimize

        bound, keep = _bind_state(gm, list(example_inputs))
        user = tuple(_concrete(example_inputs[i]) for i in keep)
        small = minimize(bound.eval(), user, **{**minimize_kwargs, **(options or {})})
        _REPORTS.append(small.sqr_report)
        del _REPORTS[:-16]
        if callback is not None:
            callback(small.sqr_report)
        compile_next = torch._dynamo.lookup_backend(next_backend) if isinstance(next_backend, str) else next_backend
        compiled = compile_next(small, [example_inputs[i] for i in keep])

        def run(*args: Any) -> Any:
            return compiled(*[args[i] for i in keep])

        return run

    return backend


sqr_fx_backend = make_backend()


def register() -> None:
    """Register ``"sqr_fx"`` with torch.compile (also done through the package's entry point)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "sqr_fx" not in _BACKENDS:
        register_backend(sqr_fx_backend, name="sqr_fx")
