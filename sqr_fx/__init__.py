"""sqr_fx: exact structural minimization of pruned networks as a torch.fx pass.

>>> import torch, sqr_fx
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
>>> small = sqr_fx.minimize(net, (torch.randn(3, 8),))
>>> _ = sqr_fx.check_equivalence(net, small, (torch.randn(5, 8),))
"""
from .backend import last_report, make_backend
from .cycle import History, SqueezeRelease, squeeze_release
from .equivalence import check_equivalence, max_relative_error
from .errors import (
    EquivalenceError,
    SqrFxError,
    TiedWeightsError,
    TraceError,
    TrainingModeError,
    UnsupportedDtypeError,
    UnsupportedOpError,
)
from .layers import CompensatedGroupNorm, CompensatedLayerNorm, CompensatedRMSNorm
from .minimize import minimize
from .passes import MinimizePass
from .prune import prune
from .release import release
from .report import LayerRow, MinimizeReport
from .size import count_parameters, count_stored_floats

__all__ = [
    "minimize",
    "MinimizePass",
    "make_backend",
    "last_report",
    "prune",
    "release",
    "SqueezeRelease",
    "squeeze_release",
    "History",
    "CompensatedLayerNorm",
    "CompensatedRMSNorm",
    "CompensatedGroupNorm",
    "check_equivalence",
    "max_relative_error",
    "count_stored_floats",
    "count_parameters",
    "MinimizeReport",
    "LayerRow",
    "SqrFxError",
    "TraceError",
    "UnsupportedOpError",
    "TrainingModeError",
    "TiedWeightsError",
    "UnsupportedDtypeError",
    "EquivalenceError",
]
__version__ = "0.1.0"
