"""Per-channel abstract values of one tensor: the analysis' lattice.

Every tensor node the analysis understands carries a :class:`ChanInfo` on one
axis (its *channel axis*): for each position along that axis a channel-group id
(positions with the same id are removed together, everywhere) and an abstract
value from the lattice ``zero < const(c) < dynamic``. ``zero`` is ``const(0.0)``.
A tensor whose channel axis the analysis cannot follow has no ChanInfo
(``None``): nothing is ever removed through it.

After an attention head split (``[B, T, H*D] -> [B, T, H, D]``) the channels span two
axes: ``head`` (size ``heads``) and ``dim`` (size D); ``ids`` then lists the H*D
positions in (head, dim) row-major order, exactly the order of the merged axis. Only
rules registered with ``heads=True`` see such an info; for every other op it is frozen.

A fused projection split into three factors (timm's ``qkv.reshape(B, N, 3, H, D)``) adds a ``group``
axis (size ``groups``) in front: ``ids`` lists the G*H*D positions in (group, head, dim) row-major
order and ``heads`` counts G*H heads (group g, head h is head ``g * H + h``). Only the layout rules
that move the axes or take one group (``permute``, ``unbind``/``select``/``x[g]`` on the group axis)
follow it; every other rule sees it frozen (``GROUP_AWARE``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import numpy as np
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

__all__ = ["ChanInfo", "GROUP_AWARE", "META_KEY", "shape_of"]

#: rule families that understand an info with a ``group`` axis; every other rule has it frozen
GROUP_AWARE = frozenset({"permute", "view", "unbind", "select", "slice", "size"})

#: the one namespaced ``node.meta`` key the analysis writes
META_KEY = "sqr_fx.chan"


def shape_of(a: Any) -> Optional[tuple[int, ...]]:
    """The traced shape of a tensor node (``tensor_meta`` from shape propagation); None otherwise."""
    tm = a.meta.get("tensor_meta") if isinstance(a, fx.Node) else None
    return tuple(int(s) for s in tm.shape) if isinstance(tm, TensorMetadata) else None


@dataclass
class ChanInfo:
    """Channel facts of one tensor along axis ``dim``.

    ``ids[i]``: channel-group id of position ``i``; ``const[i]``: the position
    holds the same scalar ``value[i]`` at every other index and for every input.
    With ``head`` set, position ``i`` is (head ``i // (len / heads)``, index ``i % ...``
    along ``dim``) of a head-split tensor.
    """

    dim: int
    ids: np.ndarray
    const: np.ndarray
    value: np.ndarray
    head: Optional[int] = None
    heads: int = 1
    blocks: bool = False  # positions are channel blocks of traced spatial size (flatten of [C, H, W])
    group: Optional[int] = None  # axis of the outer factor of a three-factor split (fused qkv's "3")
    groups: int = 1

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
        return replace(self, dim=dim)

    @property
    def split(self) -> bool:
        """The channels span a head axis and a per-head axis (see the module docstring)."""
        return self.head is not None

    def group_part(self, g: int) -> "ChanInfo":
        """Group ``g`` of a grouped info, with the group axis dropped: an ordinary head-split info."""
        assert self.group is not None
        n, ax = len(self) // self.groups, self.group

        def part(arr):
            return np.asarray(arr).reshape(self.groups, n)[g]

        return ChanInfo(self.dim - (ax < self.dim), part(self.ids), part(self.const), part(self.value),
                        head=self.head - (ax < self.head), heads=self.heads // self.groups)

    def per_head(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (one entry per position) as a [heads, D] array."""
        return np.asarray(arr).reshape(self.heads, -1)

    def probe(self, arr: np.ndarray, ndim: int) -> np.ndarray:
        """``arr`` shaped to broadcast against the tensor (rank ``ndim``) along its channel axes."""
        shape = [1] * max(ndim, self.dim + 1, (self.head or 0) + 1)
        if not self.split:
            shape[self.dim] = len(self)
            return np.asarray(arr).reshape(shape)
        a = self.per_head(arr)
        shape[self.head], shape[self.dim] = a.shape
        return (a if self.head < self.dim else a.T).reshape(shape)

    def unprobe(self, y: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`probe`: one entry per position, in (head, dim) order."""
        if not self.split:
            return np.asarray(y).reshape(-1)
        y = np.asarray(y).reshape(self.heads, -1) if self.head < self.dim else np.asarray(y).reshape(-1, self.heads).T
        return y.reshape(-1)

    def take(self, index) -> "ChanInfo":
        """Positions ``index`` (a slice, index array or mask) along the channel axis."""
        assert not self.split, "take() of a head-split info"
        return ChanInfo(self.dim, self.ids[index], self.const[index], self.value[index])

    def repeat(self, times: int) -> "ChanInfo":
        """Every position repeated ``times`` (flatten of the channel axis with inner dims)."""
        assert not self.split, "repeat() of a head-split info"
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
