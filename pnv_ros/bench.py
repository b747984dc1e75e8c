"""In-process cost of this project's pipeline (``pnv bench``): medians only.

Side-by-side comparisons with the reference live in benchmarks/.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.extract import FeatureExtractor
from pnv_ros.features import PlaceFeatures
from pnv_ros.index import GlobalIndex
from pnv_ros.matching import PatchMatcher
from pnv_ros.place_map import PlaceMap


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def stored_candidates(
    feats: Sequence[PlaceFeatures], dim: int, preset: Preset, model_id: str, n: int
) -> tuple[PlaceMap, list[PlaceFeatures]]:
    """A map holding ``feats`` as the node stores them (float16 patches) and
    ``n`` candidates cycling through its keyframes."""
    pmap = PlaceMap(dim, preset, model_id)
    for i, f in enumerate(feats):
        pmap.add(f, i)
    return pmap, [pmap.get(i % len(pmap)).features for i in range(n)]


def run_bench(
    extractor: FeatureExtractor,
    images: Sequence[Path],
    *,
    top_n: int = 100,
    repeats: int = 3,
    map_sizes: Sequence[int] = (1_000, 10_000),
    exact: bool = True,
) -> dict:
    """Seconds per extracted image, ms per re-ranked candidate (top-N batched,
    candidates as the map stores them, float16; ``exact=False``: oneDNN
    similarity products; an extractor on a fast path re-ranks with bfloat16 ones as the detector does),
    global search time at a few map sizes, bytes per keyframe."""
    feats = extractor.extract(list(images))
    extract_s = [median_time(lambda p=p: extractor.extract_one(p), repeats) for p in images[: min(3, len(images))]]
    pmap, cands = stored_candidates(feats, extractor.dim, extractor.preset, extractor.info.identity, top_n)
    pm = PatchMatcher(extractor.preset, device=extractor.device, exact=exact, bf16=extractor.pooling == "fast")
    rerank = median_time(lambda: pm.rerank(feats[0], cands), repeats)
    rng = np.random.default_rng(0)
    search = {}
    for n in map_sizes:
        gi = GlobalIndex(extractor.dim)
        x = rng.standard_normal((n, extractor.dim)).astype(np.float32)
        gi.add(x / np.linalg.norm(x, axis=1, keepdims=True))
        search[str(n)] = 1000 * median_time(lambda gi=gi: gi.search(feats[0].global_desc, top_n), repeats)
    return {
        "model": extractor.info.identity,
        "preset": extractor.preset.to_dict(),
        "device": str(extractor.device),
        "images": [str(p) for p in images],
        "seconds_per_image": float(np.median(extract_s)),
        "ms_per_candidate": 1000 * rerank / top_n,
        "top_n": top_n,
        "matcher": pm.matcher.value,
        "products": "exact" if exact else "onednn",
        "bf16": extractor.bf16,
        "engine": extractor.engine_name,
        "precision": extractor.precision,
        "global_search_ms_by_map_size": search,
        "bytes_per_keyframe": pmap.nbytes_per_keyframe(),
        "patch_dtype": pmap.patch_dtype.name,
    }
