"""LoopClosureDetector at map scale: what the detector itself costs per keyframe, apart from FAISS.

Synthetic maps of 10k, 100k and 1M keyframes (512-d unit global descriptors on a random walk, as
``benchmarks/scale_index.py`` makes them; keyframes 0.2-2 s apart, all of this run, so both exclusion
windows apply), flat and HNSW indexes (``pnv_ros.index``). Re-ranking does not depend on the map size and
is not what is measured here, so the map holds no real patch data: every keyframe shares one tiny
placeholder patch row (a zero-stride array, a 2x3-cell input with patch size 1), which lets a million
keyframes fit in memory.

Queries (200 per map, after 10 to warm up): a keyframe's descriptor plus noise, half of them a revisit of an
old place, half a look at the newest keyframes' place (their nearest neighbours are the excluded recent
keyframes). Per query, timed:

- **FAISS search**: the one ``index.search`` call the detector makes (measured inside the detector by a
  timing wrapper around the FAISS index, so it is exactly the search of that query);
- **candidate stage**: the detector's way from a query descriptor to its candidate list before re-ranking
  (the exclusion limit from the session clock and keyframe count, the index search and its filtering),
  for the code before issue #13 (kept here as ``legacy_stage``) and now (``LoopClosureDetector``);
- **whole keyframe**: ``LoopClosureDetector.process`` on features (admission, retrieval, re-ranking,
  acceptance, the map add), minus the FAISS search and add and the re-ranking (``PatchMatcher.score``).

The detector's own overhead is the candidate stage (or whole keyframe) minus its FAISS calls, per query;
the table gives its median and p95 (max for the whole keyframe: it catches the amortised array growth).
Writes ``docs/results/detector_scale.md`` (and ``out/detector_scale.json``).

    .venv/bin/python benchmarks/detector_scale.py --sizes 10000,100000,1000000

About 6 minutes on 2 cores; peak memory about 5 GB (the 1M HNSW index and its descriptors).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
from common import REPO, RESULTS, machine_line
from common import write_md as write_page
from scale_index import synthetic

from pnv_ros.config import Matcher, Preset
from pnv_ros.detector import DetectorParams, LoopClosureDetector
from pnv_ros.features import PlaceFeatures
from pnv_ros.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M
from pnv_ros.matching import PatchMatcher

#: Input 48x32 -> a 2x3 feature map, one scale of 1-cell patches: 6 patch descriptors per keyframe.
TINY = Preset(
    name="tiny",
    patch_sizes=(1,),
    strides=(1,),
    patch_weights=(1.0,),
    matcher=Matcher.RAPID,
    image_height=32,
    image_width=48,
    top_n=20,
)
S = 10**9


class TimedIndex:
    """A FAISS index that adds up the time of its search and add calls."""

    def __init__(self, inner: faiss.Index) -> None:
        self.inner, self.search_s, self.add_s = inner, 0.0, 0.0

    def search(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner.search(*args, **kwargs)
        finally:
            self.search_s += time.perf_counter() - t

    def add(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.inner.add(*args, **kwargs)
        finally:
            self.add_s += time.perf_counter() - t

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def legacy_stage(det: LoopClosureDetector, features: PlaceFeatures, session_ns: int) -> list[tuple[int, float]]:
    """The candidate stage as it was before issue #13 (detector ``_limit`` + ``_candidates`` up to re-ranking,
    ``GlobalIndex.search``), copied so that both can be timed in one run."""
    p, s, m = det.params, det.session, det.map
    n = len(m)
    by_time = s.run_start + int(np.searchsorted(s.times[: s.n], session_ns - int(p.exclude_recent_s * 1e9), "right"))
    limit = min(by_time, max(s.run_start, n - p.exclude_recent_keyframes))
    if limit <= 0 or n == 0:
        return []
    gi = m.index
    q = np.ascontiguousarray(np.atleast_2d(features.global_desc), dtype=np.float32)
    nn = max(0, min(limit, len(gi)))
    k = min(int(p.top_n), nn)
    if k <= 0:
        return []
    params = None
    if nn < len(gi):
        params = faiss.SearchParameters(sel=faiss.IDSelectorRange(0, nn))
        if gi.kind == "hnsw":
            params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorRange(0, nn), efSearch=max(HNSW_EF_SEARCH, k))
    d2, ids = gi._index.search(q, k, params=params)
    dists, ids = np.sqrt(np.maximum(d2, 0.0)), ids.astype(np.int64)
    return [(int(i), float(d)) for i, d in zip(ids[0], dists[0]) if 0 <= i < limit][: p.top_n]


def current_stage(det: LoopClosureDetector, features: PlaceFeatures, session_ns: int) -> list[tuple[int, float]]:
    """The candidate stage as the detector runs it now."""
    p = det.params
    return det._nearest(features.global_desc, det._limit(session_ns, p), p.top_n, None)


def build(n: int, kind: str, descs: np.ndarray, params: DetectorParams, rng: np.random.Generator):
    """A detector whose map holds ``descs`` as n keyframes of this run, 0.2-2 s apart."""
    ext = SimpleNamespace(preset=TINY, dim=descs.shape[1], info=None, device="cpu")
    det = LoopClosureDetector(ext, params, index_kind=kind)
    m = det.map
    stamps = (100 * S + np.cumsum(rng.uniform(0.2, 2.0, n) * S)).astype(np.int64)
    t = time.perf_counter()
    for a in range(0, n, 50_000):
        m.index.add(descs[a : a + 50_000])
    build_s = time.perf_counter() - t
    m._reserve(n)
    m._stamps[:n] = stamps
    m._sizes[:n] = (TINY.image_width, TINY.image_height)
    for c in m._cols:  # one shared placeholder row per scale: no memory per keyframe
        c.base = np.broadcast_to(np.full((c.p, c.d), 1 / np.sqrt(c.d), c.dtype), (n, c.p, c.d))
    m._n = n
    m.check()
    s = det.session
    s.times = stamps.copy()
    s.n = n
    s.see(int(stamps[-1]), int(stamps[-1]))
    m.index._index = TimedIndex(m.index._index)
    return det, build_s


def place(g: np.ndarray) -> PlaceFeatures:
    g = (g / np.linalg.norm(g)).astype(np.float32)
    d = g.shape[0]
    patch = np.full((TINY.num_patches(0), d), 1 / np.sqrt(d), np.float32)
    return PlaceFeatures(g, [patch], (TINY.image_width, TINY.image_height))


def pct(v: list[float]) -> dict[str, float]:
    a = 1000 * np.asarray(v)
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "max_ms": float(a.max())}


def measure(det: LoopClosureDetector, descs: np.ndarray, queries: int, warmup: int, rng: np.random.Generator) -> dict:
    n, d = descs.shape
    timed: TimedIndex = det.map.index._index
    score_s = [0.0]
    real_score = PatchMatcher.score

    def timed_score(self, *a, **k):
        t = time.perf_counter()
        try:
            return real_score(self, *a, **k)
        finally:
            score_s[0] += time.perf_counter() - t

    PatchMatcher.score = timed_score
    rows: dict[str, list[float]] = {
        k: [] for k in ("faiss", "legacy", "legacy_over", "now", "now_over", "kf_over", "kf_faiss_add")
    }
    same = 0
    try:
        for j in range(warmup + queries):
            newest = len(det.map) - 1
            src = int(rng.integers(0, n // 2)) if j % 2 == 0 else newest - int(rng.integers(0, 5))
            g = descs[src] if src < n else det.map.index.reconstruct(src)
            f = place(g + rng.standard_normal(d).astype(np.float32) * (0.1 / np.sqrt(d)))
            stamp = int(det.session.last_stamp) + int(rng.uniform(0.2, 2.0) * S)
            session_ns = stamp + det.session.offset
            with det.lock:
                res = {}
                for name, fn in (("legacy", legacy_stage), ("now", current_stage)):
                    s0 = timed.search_s
                    t = time.perf_counter()
                    res[name] = fn(det, f, session_ns)
                    dt = time.perf_counter() - t
                    if j >= warmup:
                        rows[name].append(dt)
                        rows[f"{name}_over"].append(dt - (timed.search_s - s0))
                        if name == "now":
                            rows["faiss"].append(timed.search_s - s0)
            same += res["legacy"] == res["now"]
            s0, a0, r0 = timed.search_s, timed.add_s, score_s[0]
            t = time.perf_counter()
            r = det.process(f, stamp)
            dt = time.perf_counter() - t
            assert r.status == "keyframe", r.status
            if j >= warmup:
                rows["kf_over"].append(dt - (timed.search_s - s0) - (timed.add_s - a0) - (score_s[0] - r0))
                rows["kf_faiss_add"].append(timed.add_s - a0)
    finally:
        PatchMatcher.score = real_score
    out = {k: pct(v) for k, v in rows.items()}
    out["identical_candidates"] = same
    out["queries"] = warmup + queries
    return out


def machine() -> str:
    """The machine line of the page: common's, with the numpy and faiss versions this benchmark depends on."""
    return f"{machine_line()}, numpy {np.__version__}, faiss {faiss.__version__}"


def write_md(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    f = lambda x: f"{x:.3f}" if x < 10 else f"{x:.1f}"  # noqa: E731
    lines = [
        "# Detector overhead at map scale",
        "",
        f"Generated by `benchmarks/detector_scale.py --sizes {args.sizes} --queries {args.queries}` on "
        f"{datetime.date.today().isoformat()}; {machine()}. Synthetic 512-d maps, every keyframe of this run "
        f"(exclusion windows {args.exclude_s:g} s and {args.exclude_kf} keyframes), top {args.top_n}; HNSW "
        f"M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}, efSearch={HNSW_EF_SEARCH}. Times per query in ms.",
        "",
        "Overhead = the detector's time minus its FAISS calls in the same query (median / p95). Candidate stage: "
        "exclusion limit + index search + filtering, before re-ranking. Whole keyframe: `process()` on features "
        "(admission, retrieval, re-ranking, acceptance, map add) minus FAISS search, FAISS add and the patch "
        "scoring (median / p95 / max).",
        "",
        "| keyframes | index | FAISS search (median) | candidate stage overhead, before #13 | candidate stage "
        "overhead, now | whole keyframe overhead, now | FAISS add (median) | same candidates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {f(r['faiss']['p50_ms'])} | {f(r['legacy_over']['p50_ms'])} / "
            f"{f(r['legacy_over']['p95_ms'])} | {f(r['now_over']['p50_ms'])} / {f(r['now_over']['p95_ms'])} | "
            f"{f(r['kf_over']['p50_ms'])} / {f(r['kf_over']['p95_ms'])} / {f(r['kf_over']['max_ms'])} | "
            f"{f(r['kf_faiss_add']['p50_ms'])} | {r['identical_candidates']}/{r['queries']} |"
        )
    write_page(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--kinds", default="flat,hnsw")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--exclude-s", type=float, default=10.0)
    ap.add_argument("--exclude-kf", type=int, default=10)
    ap.add_argument("--md", default=str(RESULTS / "detector_scale.md"))
    ap.add_argument("--json", default=str(REPO / "out" / "detector_scale.json"))
    a = ap.parse_args()
    params = DetectorParams(
        top_n=a.top_n,
        exclude_recent_s=a.exclude_s,
        exclude_recent_keyframes=a.exclude_kf,
        min_score=1.0,
        min_visual_change=0.0,
    )
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        descs = synthetic(n, a.dim, np.random.default_rng(n))
        for kind in a.kinds.split(","):
            rng = np.random.default_rng(1)
            det, build_s = build(n, kind, descs, params, rng)
            r = {"n": n, "kind": kind, "build_s": build_s, **measure(det, descs, a.queries, a.warmup, rng)}
            rows.append(r)
            print(
                f"n={n:>8} {kind:4}: faiss {r['faiss']['p50_ms']:.3f} ms; candidate-stage overhead before "
                f"{r['legacy_over']['p50_ms']:.4f} / {r['legacy_over']['p95_ms']:.4f}, now "
                f"{r['now_over']['p50_ms']:.4f} / {r['now_over']['p95_ms']:.4f} ms; keyframe overhead "
                f"{r['kf_over']['p50_ms']:.3f} / {r['kf_over']['p95_ms']:.3f} / {r['kf_over']['max_ms']:.2f} ms; "
                f"same candidates {r['identical_candidates']}/{r['queries']} (build {build_s:.0f} s)",
                flush=True,
            )
            del det
        del descs
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=1))
    write_md(Path(a.md), rows, a)
    print(f"wrote {a.md} and {a.json}")


if __name__ == "__main__":
    main()
