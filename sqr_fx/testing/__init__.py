"""Testing tools shipped with sqr_fx: a generative differential fuzzer for ``minimize``.

``python -m sqr_fx.testing.fuzz --n 200 --seed 0`` runs random pruned models (every rule family, in
every argument form: keyword / positional, module / functional / method, in-place, batched /
unbatched, literal / negative dims) through ``minimize`` and checks exactness, purity and the fixpoint.
A case is plain data (:class:`Case` of :class:`Op`), so a failure prints as a recipe and
:func:`check_case` replays it (the saved regression tests call it).
"""
import importlib

from .core import GENS, Case, Op, State, build

__all__ = ["Case", "Op", "State", "GENS", "build", "generate_case", "run_case", "check_case", "shrink"]
_LAZY = ("check_case", "generate_case", "run_case", "shrink")  # from .fuzz, imported on first use


def __getattr__(name: str):
    # lazily: ``python -m sqr_fx.testing.fuzz`` must not find the module imported already
    if name in _LAZY:
        return getattr(importlib.import_module(".fuzz", __name__), name)
    raise AttributeError(name)
