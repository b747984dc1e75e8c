"""Global retrieval at map scale: flat (exact) vs HNSW (approximate), as the
node uses them (pnv_ros.index.GlobalIndex), on synthetic 512-d descriptors.

Synthetic "places": a random walk on the unit sphere (consecutive keyframes
look alike, as on a robot), so neighbours have structure like real maps.
Two query sets of 200 each, from random map entries:
- revisits: the entry plus noise of norm ~0.1, so its own entry is (nearly
  always) the true nearest neighbour, as when a robot comes back to a place;
- hard: the entry plus noise of norm ~0.45, which lands between places: the
  nearest neighbours are many, at almost equal distances (the entry itself
  is the nearest for <1% of queries).
For each size: build time, index memory, single-query latency (median, p95;
one query at a time, as a loop closer asks; revisit queries), and Recall@1 /
Recall@20 of HNSW against flat for both sets; for the hard set also how much
farther HNSW's first answer is than flat's when they differ. Build time is
one add per 50k keyframes, as ``PlaceMap.load`` adds a saved map (one add);
for HNSW also the node's way, one keyframe at a time, timed over the first
``--one-at-a-time`` keyframes (a map loaded like that would take this times n).

    .venv/bin/python benchmarks/scale_index.py --sizes 10000,100000,1000000 --out out/scale
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from pnv_ros.index import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, GlobalIndex


def synthetic(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    cur = rng.standard_normal(d).astype(np.float32)
    block = 10_000
    for s in range(0, n, block):
        steps = rng.standard_normal((min(block, n - s), d)).astype(np.float32) * 0.15
        walk = cur + np.cumsum(steps, axis=0)
        cur = walk[-1]
        out[s : s + len(walk)] = walk + rng.standard_normal(walk.shape).astype(np.float32) * 0.5
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def index_bytes(gi: GlobalIndex) -> int:
    return int(faiss.serialize_index(gi._index).size)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--one-at-a-time", type=int, default=10000, help="HNSW keyframes added singly to time (0: skip)")
    ap.add_argument("--out", default="out/scale")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        data = synthetic(n, a.dim, rng)
        qi = rng.choice(n, a.queries, replace=False)
        noise = rng.standard_normal((a.queries, a.dim)).astype(np.float32)
        sets = {"hard": data[qi] + noise * 0.02, "revisit": data[qi] + noise * (0.1 / np.sqrt(a.dim))}
        for q in sets.values():
            q /= np.linalg.norm(q, axis=1, keepdims=True)
        res = {}
        for kind in ("flat", "hnsw"):
            gi = GlobalIndex(a.dim, kind)
            t = time.perf_counter()
            for s in range(0, n, 50_000):
                gi.add(data[s : s + 50_000])
            build = time.perf_counter() - t
            lat, found = [], {}
            for name, queries in sets.items():
                ids, dists = [], []
                for q in queries:
                    t = time.perf_counter()
                    d, i = gi.search(q, 20)
                    if name == "revisit":
                        lat.append(time.perf_counter() - t)
                    ids.append(i[0])
                    dists.append(d[0])
                found[name] = (np.array(ids), np.array(dists))
            res[kind] = {
                "build_s": build,
                "bytes": index_bytes(gi),
                "found": found,
                "p50_ms": 1000 * float(np.median(lat)),
                "p95_ms": 1000 * float(np.percentile(lat, 95)),
            }
            del gi
        single = min(n, a.one_at_a_time)
        if single:
            gi = GlobalIndex(a.dim, "hnsw")
            t = time.perf_counter()
            for v in data[:single]:
                gi.add(v)
            res["hnsw"]["single_add_ms"] = 1000 * (time.perf_counter() - t) / single
            del gi
        row = {"n": n, **{f"{k}_{m}": res[k][m] for k in res for m in ("build_s", "bytes", "p50_ms", "p95_ms")}}
        if single:
            row["hnsw_single_add_ms"] = res["hnsw"]["single_add_ms"]
            row["hnsw_single_add_first"] = single
        for name in sets:
            (flat, fd), (hnsw, hd) = res["flat"]["found"][name], res["hnsw"]["found"][name]
            miss = flat[:, 0] != hnsw[:, 0]
            row[f"hnsw_recall_at_1_vs_flat_{name}"] = float(np.mean(~miss))
            row[f"hnsw_recall_at_20_vs_flat_{name}"] = float(
                np.mean([len(set(x) & set(y)) / 20 for x, y in zip(flat, hnsw)])
            )
            row[f"hnsw_miss_max_extra_distance_{name}"] = (
                float((hd[miss, 0] / fd[miss, 0] - 1).max()) if miss.any() else 0.0
            )
        rows.append(row)
        print(
            f"n={n:>8}: flat {row['flat_p50_ms']:.2f} ms/query ({row['flat_bytes'] / 2**20:.0f} MiB, "
            f"add {row['flat_build_s']:.1f} s); hnsw {row['hnsw_p50_ms']:.3f} ms/query "
            f"({row['hnsw_bytes'] / 2**20:.0f} MiB, build {row['hnsw_build_s']:.0f} s"
            + (
                f"; singly {row['hnsw_single_add_ms']:.2f} ms/keyframe over the first {single}, batched "
                f"{1000 * row['hnsw_build_s'] / n:.2f}"
                if single
                else ""
            )
            + f"); hnsw recall vs flat "
            f"R@1 / R@20: revisits {row['hnsw_recall_at_1_vs_flat_revisit']:.3f} / "
            f"{row['hnsw_recall_at_20_vs_flat_revisit']:.3f}, hard {row['hnsw_recall_at_1_vs_flat_hard']:.3f} / "
            f"{row['hnsw_recall_at_20_vs_flat_hard']:.3f} (a missed first answer at most "
            f"{100 * row['hnsw_miss_max_extra_distance_hard']:.2f}% farther)",
            flush=True,
        )
        del data
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    ns = [r["n"] for r in rows]
    ax.loglog(ns, [r["flat_p50_ms"] for r in rows], "o-", label="flat (exact)")
    label = f"HNSW (M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}, efSearch={HNSW_EF_SEARCH})"
    ax.loglog(ns, [r["hnsw_p50_ms"] for r in rows], "s-", label=label)
    ax.set(
        xlabel="keyframes in the map",
        ylabel="ms per query (median)",
        title="Global retrieval time vs map size (512-d, 2 CPU cores)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'}")


if __name__ == "__main__":
    main()
