"""Global descriptor index: FAISS behind one small interface, chosen by name.

``flat`` (exact L2, the reference's ``IndexFlatL2``) is the default;
``hnsw`` is an approximate graph index for large maps. Ids are the positions
in insertion order (0, 1, 2, ...).
"""

from __future__ import annotations

import faiss
import numpy as np

from pnv_ros.errors import ConfigError

INDEX_KINDS = ("flat", "hnsw")
#: HNSW graph degree, build and search breadth (see GlobalIndex).
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 64, 400, 2048


class GlobalIndex:
    """Incremental nearest-neighbour search over (N, D) unit descriptors.

    Args:
        dim: descriptor dimension D.
        kind: 'flat' (exact) or 'hnsw' (approximate: M=64, efConstruction=400,
            efSearch=2048, chosen with benchmarks/scale_index.py at 1M keyframes on
            its hard (between-places) queries: flat's nearest neighbour found for
            0.955 with M=32 however wide the search (efSearch up to 8192: poorly
            linked entries), 0.965 with M=64 / efConstruction 200, 0.985 with M=96,
            0.995 with M=64 / efConstruction 400 (insertion ~0.14 ms a keyframe at 1M).
    """

    def __init__(self, dim: int, kind: str = "flat") -> None:
        if kind not in INDEX_KINDS:
            raise ConfigError(f"unknown index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
        self.dim, self.kind = int(dim), kind
        if kind == "flat":
            self._index = faiss.IndexFlatL2(self.dim)
        else:
            self._index = faiss.IndexHNSWFlat(self.dim, HNSW_M)
            self._index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            self._index.hnsw.efSearch = HNSW_EF_SEARCH

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, descs: np.ndarray) -> None:
        """Append descriptors (N, D) or (D,); they get the next ids."""
        descs = np.ascontiguousarray(np.atleast_2d(descs), dtype=np.float32)
        if descs.shape[1] != self.dim:
            raise ConfigError(f"descriptors of dimension {descs.shape[1]} do not fit a {self.dim}-d index")
        self._index.add(descs)

    def search(self, queries: np.ndarray, k: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by L2 distance among ids < limit (all when None).

        queries: (Q, D) or (D,). Returns distances (Q, k') (not squared) and
        ids (Q, k'), nearest first, k' = min(k, number searchable). HNSW may
        find fewer than k': the rest of its row is id -1 (callers filter it).
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(self) if limit is None else max(0, min(limit, len(self)))
        k = min(int(k), n)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        params = None
        if n < len(self):
            params = faiss.SearchParameters(sel=faiss.IDSelectorRange(0, n))
            if self.kind == "hnsw":
                params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorRange(0, n), efSearch=max(HNSW_EF_SEARCH, k))
        d2, ids = self._index.search(q, k, params=params)
        return np.sqrt(np.maximum(d2, 0.0)), ids.astype(np.int64)

    def reconstruct(self, i: int) -> np.ndarray:
        """The stored descriptor (D,) float32 of id i."""
        return self._index.reconstruct(int(i))

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        """Stored descriptors (n, D) float32 of ids start .. start + n - 1."""
        if n <= 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_n(int(start), int(n))
