"""Step 4 of :func:`sqr_fx.portable.finish`: ``torch.export``'s input guard, a function made with
``exec``, becomes a GraphModule so the result pickles."""
from __future__ import annotations

import types

from torch import fx, nn


def _picklable_guards(gm: fx.GraphModule) -> None:
    """``torch.export``'s input guard (``_guards_fn``, a ``GuardsFn`` whose ``forward`` is a function made
    with ``exec``) cannot be pickled: its guards are traced into a small GraphModule, whose ``forward``
    becomes the guard's (the module keeps its type, so the rules still know it)."""
    try:
        from torch.export._unlift import GuardsFn
    except ImportError:  # pragma: no cover - older torch
        return
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.kwargs:
            continue
        mod = gm.get_submodule(node.target)
        fn = vars(mod).get("forward")
        if type(mod) is not GuardsFn or fn is None or isinstance(fn, types.MethodType):
            continue
        graph = fx.Graph()
        tracer = fx.proxy.GraphAppendingTracer(graph)
        try:
            fn(*[fx.Proxy(graph.placeholder(f"arg{i}"), tracer) for i in range(len(node.args))])
        except Exception:  # noqa: BLE001 - a guard that does not trace: kept as it is (not picklable)
            continue
        graph.output(None)
        mod.forward = fx.GraphModule(nn.Module(), graph, class_name="Guards").forward
