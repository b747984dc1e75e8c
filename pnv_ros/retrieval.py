"""Two-stage retrieval: global FAISS search, then patch re-ranking."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pnv_ros.config import Matcher, Preset
from pnv_ros.features import FeatureSet
from pnv_ros.index import GlobalIndex
from pnv_ros.matching import PatchMatcher


@dataclass
class QueryResult:
    """One query's two-stage result (database indices, best first).

    Attributes:
        global_ids: (N,) stage-1 order by global L2 distance.
        global_dists: (N,) their distances.
        reranked_ids: (N,) stage-2 order.
        scores: (N,) fused patch scores in stage-2 order (lower is better).
    """

    global_ids: np.ndarray
    global_dists: np.ndarray
    reranked_ids: np.ndarray
    scores: np.ndarray


def two_stage(
    db: FeatureSet,
    queries: FeatureSet,
    preset: Preset,
    *,
    top_n: int | None = None,
    matcher: Matcher | str | None = None,
    index_kind: str = "flat",
    device: str = "cpu",
    progress: bool = False,
    exact: bool = True,
    bf16: bool = False,
) -> list[QueryResult]:
    """Retrieve top-N candidates per query and re-rank them by patch matching
    (``exact=False``: oneDNN similarity products; ``bf16``: bfloat16 ones, the fast paths'; see PatchMatcher)."""
    db.check_compatible(queries)
    db.check_preset(preset, "database features")
    index = GlobalIndex(db.dim, index_kind)
    index.add(db.global_descs)
    n = top_n or preset.top_n
    dists, ids = index.search(queries.global_descs, n)
    pm = PatchMatcher(preset, matcher, device=device, exact=exact, bf16=bf16)
    db_items = [db.item(i) for i in range(len(db))]
    rng = range(len(queries))
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="re-rank", unit="query")
    out = []
    for qi in rng:
        cand = ids[qi]
        order, fused, _ = pm.rerank(queries.item(qi), [db_items[c] for c in cand], dists[qi])
        out.append(QueryResult(cand, dists[qi], cand[order], fused[order]))
    return out
