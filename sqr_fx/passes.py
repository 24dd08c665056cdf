"""minimize as a pass of the torch.fx pass infrastructure (``PassBase`` / ``PassResult`` / ``PassManager``).

>>> import torch, sqr_fx
>>> from torch.fx.passes.infra.pass_manager import PassManager
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
>>> with torch.no_grad(): net[0].weight[:3] = 0; net[0].bias[:3] = -1.0   # three dead units
>>> gm = torch.fx.symbolic_trace(net)
>>> result = PassManager([sqr_fx.MinimizePass((torch.randn(3, 4),))])(gm)
>>> result.modified, tuple(result.graph_module.get_parameter("0.weight").shape)
(True, (5, 4))
"""
from __future__ import annotations

from typing import Any

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["MinimizePass"]


class MinimizePass(PassBase):
    """``PassBase`` wrapper of :func:`sqr_fx.minimize`: returns ``PassResult(new_module, modified)``.

    The input module is never mutated (a pass manager gets the new module back); ``modified`` is
    True when some channel or head was removed. ``report`` holds the last run's MinimizeReport.
    """

    def __init__(self, example_inputs: Any, **minimize_kwargs: Any):
        super().__init__()
        self.example_inputs, self.kwargs = example_inputs, minimize_kwargs
        self.report = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        from .minimize import minimize

        small = minimize(graph_module, self.example_inputs, **self.kwargs)
        self.report = small.sqr_report
        return PassResult(small, small.sqr_report.rounds > 0)
