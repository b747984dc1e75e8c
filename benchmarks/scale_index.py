"""Global retrieval at map scale: flat (exact) vs HNSW (approximate), as the
node uses them (pnv_ros.index.GlobalIndex), on synthetic 512-d descriptors.

Synthetic "places": a random walk on the unit sphere (consecutive keyframes
look alike, as on a robot), so neighbours have structure like real maps.
Queries are noisy copies of random map entries. For each size: build time,
index memory, single-query latency (median, p95; one query at a time, as a
loop closer asks), and Recall@1 / Recall@20 of HNSW against flat.

    .venv/bin/python benchmarks/scale_index.py --sizes 10000,100000,1000000 --out out/scale
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from pnv_ros.index import GlobalIndex


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
    ap.add_argument("--out", default="out/scale")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        data = synthetic(n, a.dim, rng)
        qi = rng.choice(n, a.queries, replace=False)
        queries = data[qi] + rng.standard_normal((a.queries, a.dim)).astype(np.float32) * 0.02
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        res = {}
        for kind in ("flat", "hnsw"):
            gi = GlobalIndex(a.dim, kind)
            t = time.perf_counter()
            for s in range(0, n, 50_000):
                gi.add(data[s : s + 50_000])
            build = time.perf_counter() - t
            lat, ids = [], []
            for q in queries:
                t = time.perf_counter()
                _, i = gi.search(q, 20)
                lat.append(time.perf_counter() - t)
                ids.append(i[0])
            res[kind] = {"build_s": build, "bytes": index_bytes(gi), "ids": np.array(ids),
                         "p50_ms": 1000 * float(np.median(lat)), "p95_ms": 1000 * float(np.percentile(lat, 95))}  # fmt: skip
            del gi
        flat, hnsw = res["flat"]["ids"], res["hnsw"]["ids"]
        r1 = float(np.mean(flat[:, 0] == hnsw[:, 0]))
        r20 = float(np.mean([len(set(a_) & set(b_)) / 20 for a_, b_ in zip(flat, hnsw)]))
        row = {"n": n, **{f"{k}_{m}": res[k][m] for k in res for m in ("build_s", "bytes", "p50_ms", "p95_ms")},
               "hnsw_recall_at_1_vs_flat": r1, "hnsw_recall_at_20_vs_flat": r20}  # fmt: skip
        rows.append(row)
        print(f"n={n:>8}: flat {row['flat_p50_ms']:.2f} ms/query ({row['flat_bytes'] / 2**20:.0f} MiB, "
              f"add {row['flat_build_s']:.1f} s); hnsw {row['hnsw_p50_ms']:.3f} ms/query "
              f"({row['hnsw_bytes'] / 2**20:.0f} MiB, build {row['hnsw_build_s']:.0f} s); "
              f"hnsw recall vs flat R@1 {r1:.3f}, R@20 {r20:.3f}", flush=True)  # fmt: skip
        del data
    (out / "scale.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    ns = [r["n"] for r in rows]
    ax.loglog(ns, [r["flat_p50_ms"] for r in rows], "o-", label="flat (exact)")
    ax.loglog(ns, [r["hnsw_p50_ms"] for r in rows], "s-", label="HNSW (M=32, efConstruction=200, efSearch=1024)")
    ax.set(xlabel="keyframes in the map", ylabel="ms per query (median)",
           title="Global retrieval time vs map size (512-d, 2 CPU cores)")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'}")


if __name__ == "__main__":
    main()
