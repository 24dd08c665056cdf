"""Per-channel abstract values of one tensor: the analysis' lattice.

Every tensor node the analysis understands carries a :class:`ChanInfo` on one
axis (its *channel axis*): for each position along that axis a channel-group id
(positions with the same id are removed together, everywhere) and an abstract
value from the lattice ``zero < const(c) < dynamic``. ``zero`` is ``const(0.0)``.
A tensor whose channel axis the analysis cannot follow has no ChanInfo
(``None``): nothing is ever removed through it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ChanInfo", "META_KEY"]

#: the one namespaced ``node.meta`` key the analysis writes
META_KEY = "sqr_fx.chan"


@dataclass
class ChanInfo:
    """Channel facts of one tensor along axis ``dim``.

    ``ids[i]``: channel-group id of position ``i``; ``const[i]``: the position
    holds the same scalar ``value[i]`` at every other index and for every input.
    """

    dim: int
    ids: np.ndarray
    const: np.ndarray
    value: np.ndarray

    @classmethod
    def dynamic(cls, dim: int, ids: np.ndarray) -> "ChanInfo":
        n = len(ids)
        return cls(dim, ids, np.zeros(n, bool), np.zeros(n, np.float64))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def zero(self) -> np.ndarray:
        """Positions known to be exactly zero."""
        return self.const & (self.value == 0.0)

    def with_dim(self, dim: int) -> "ChanInfo":
        return ChanInfo(dim, self.ids, self.const, self.value)

    def take(self, index) -> "ChanInfo":
        """Positions ``index`` (a slice, index array or mask) along the channel axis."""
        return ChanInfo(self.dim, self.ids[index], self.const[index], self.value[index])

    def repeat(self, times: int) -> "ChanInfo":
        """Every position repeated ``times`` (flatten of the channel axis with inner dims)."""
        return ChanInfo(
            self.dim, np.repeat(self.ids, times), np.repeat(self.const, times), np.repeat(self.value, times)
        )

    @staticmethod
    def concat(infos: list["ChanInfo"], dim: int) -> "ChanInfo":
        return ChanInfo(
            dim,
            np.concatenate([i.ids for i in infos]),
            np.concatenate([i.const for i in infos]),
            np.concatenate([i.value for i in infos]),
        )
