"""Channel-coupling groups: the one place that builds the union-find over channel ids.

Every channel position of every tracked tensor holds an integer id; ``union`` makes two
ids one group (residual ``add``: channel j of both operands and of the sum; BatchNorm:
input and output channel j; grouped conv: all channels of one conv group). A group is
removed or kept as a whole, so a channel goes only when every member allows it.
"""
from __future__ import annotations

import numpy as np
from networkx.utils import UnionFind

__all__ = ["Groups"]


class Groups:
    """Union-find over channel ids (networkx's), plus the set of frozen ids."""

    def __init__(self) -> None:
        self._uf = UnionFind()
        self._next = 0
        self._frozen: list[np.ndarray] = []

    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"cannot couple channel spaces of widths {len(a)} and {len(b)}")
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self._uf.union(x, y)

    def freeze(self, ids: np.ndarray) -> None:
        self._frozen.append(np.asarray(ids, np.int64))

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """``root_of[id]`` for every id, and ``frozen[root]``."""
        uf = self._uf
        root_of = np.array([uf[i] for i in range(self._next)], dtype=np.int64)
        frozen = np.zeros(self._next, bool)
        for ids in self._frozen:
            frozen[root_of[ids]] = True
        return root_of, frozen

    def __len__(self) -> int:
        return self._next
