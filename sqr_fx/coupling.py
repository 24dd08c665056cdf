"""Channel-coupling groups: the one place that builds the union-find over channel ids.

Every channel position of every tracked tensor holds an integer id; ``union`` makes two
ids one group (residual ``add``: channel j of both operands and of the sum; BatchNorm:
input and output channel j; grouped conv: all channels of one conv group). A group is
removed or kept as a whole, so a channel goes only when every member allows it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Groups"]


class Groups:
    """Union-find over channel ids, plus the set of frozen ids.

    ``union`` only records the pairs (one array pair per call); :meth:`resolve` joins them all at
    once on id arrays (:func:`components`), so a residual stream of thousands of coupled channels
    costs a few vector operations, not a Python call per channel."""

    def __init__(self) -> None:
        self._next = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._frozen: list[np.ndarray] = []

    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise ValueError(f"cannot couple channel spaces of widths {len(a)} and {len(b)}")
        self._pairs.append((np.asarray(a, np.int64), np.asarray(b, np.int64)))

    def freeze(self, ids: np.ndarray) -> None:
        self._frozen.append(np.asarray(ids, np.int64))

    def resolve(self) -> tuple[np.ndarray, np.ndarray]:
        """``root_of[id]`` for every id (the smallest id of its group), and ``frozen[root]``."""
        a = np.concatenate([p[0] for p in self._pairs] + [np.zeros(0, np.int64)])
        b = np.concatenate([p[1] for p in self._pairs] + [np.zeros(0, np.int64)])
        root_of = components(self._next, a, b)
        frozen = np.zeros(self._next, bool)
        for ids in self._frozen:
            frozen[root_of[ids]] = True
        return root_of, frozen

    def __len__(self) -> int:
        return self._next


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of ids ``0..n-1`` joined by the pairs ``(a[k], b[k])``: each id's label
    is the smallest id of its component. Every step hooks the larger root of each still-split pair
    under the smaller one and then points every id at its root; each step removes at least one root
    per split component, so it ends, in a few steps on channel-coupling graphs."""
    parent = np.arange(n, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            return parent
        ra, rb = ra[split], rb[split]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # pointer jumping: parent[parent] until every id points at a root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
