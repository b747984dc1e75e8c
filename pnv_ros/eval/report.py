"""A run folder a person can read: metrics.json, loop_closures.csv, plots, report.md,
and pictures of the worst false positives and of missed loops."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pnv_ros.eval.metrics import Decision, latency_stats, pr_curve, precision_recall, recall_at_n
from pnv_ros.eval.replay import ReplayResult


def decisions(result: ReplayResult, positives: list[set[int]]) -> list[Decision]:
    return [
        Decision(
            r.frame, r.match_frame, r.score, r.match_frame in positives[r.frame], bool(positives[r.frame]), r.top_frames
        )  # fmt: skip
        for r in result.records
    ]


def compute_metrics(result: ReplayResult, positives: list[set[int]], threshold: float) -> dict[str, Any]:
    ds = decisions(result, positives)
    curve = pr_curve(ds)
    n_kf = len(result.records)
    return {
        "threshold": threshold,
        "at_threshold": precision_recall(ds, threshold),
        "pr_curve": curve,
        "average_precision": curve["average_precision"],
        "recall_at_100_precision": curve["recall_at_100_precision"],
        "retrieval_recall_at_n": recall_at_n(ds, positives),
        "latency": {
            "extract": latency_stats([r.t_extract for r in result.records if not math.isnan(r.t_extract)]),
            "rerank": latency_stats([r.t_rerank for r in result.records if not math.isnan(r.t_rerank)]),
            "per_keyframe": latency_stats([r.t_total for r in result.records if not math.isnan(r.t_total)]),
        },
        "frames": result.n_frames,
        "keyframes": n_kf,
        "keyframes_per_second": n_kf / result.wall_s if result.wall_s > 0 else float("nan"),
        "wall_s": result.wall_s,
        "peak_rss_mb": result.peak_rss_mb,
        "map_bytes_per_keyframe": result.map_bytes_per_keyframe,
    }


def _plots(out: Path, metrics: dict[str, Any], result: ReplayResult, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = metrics["pr_curve"]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    ax.plot(c["recall"], c["precision"], "-o", ms=2.5)
    at = metrics["at_threshold"]
    ax.plot([at["recall"]], [at["precision"]], "r*", ms=12, label=f"threshold {metrics['threshold']:.2f}")
    ap, r100 = metrics["average_precision"], metrics["recall_at_100_precision"]
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.02),
        ylim=(0, 1.05),
        title=f"{title}\nAP {ap:.3f}, R@100%P {r100:.3f}",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "pr_curve.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    frames = [r.frame for r in result.records]
    for key, label in (("t_extract", "extract"), ("t_rerank", "re-rank"), ("t_total", "keyframe total")):
        vals = [getattr(r, key) * 1000 for r in result.records]
        if not all(math.isnan(v) for v in vals):
            ax.plot(frames, vals, label=label)
    ax.set(xlabel="frame", ylabel="ms", title="latency per keyframe")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    else:  # a live node's stage timings are in its /diagnostics, not in its messages
        ax.text(0.5, 0.5, "per-stage latency: see the node's /diagnostics", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "latency.png")
    plt.close(fig)


def _pair_picture(path: Path, result: ReplayResult, a: int, b: int, text: str) -> None:
    import cv2
    from PIL import Image

    ta, tb = result.thumbnails.get(a), result.thumbnails.get(b)
    if ta is None or tb is None:
        return
    h = min(ta.shape[0], tb.shape[0])
    canvas = np.concatenate([ta[:h], tb[:h]], axis=1).copy()
    cv2.rectangle(canvas, (0, 0), (canvas.shape[1], 22), (0, 0, 0), -1)
    cv2.putText(canvas, text, (5, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    Image.fromarray(canvas).save(path)


def write_run(out: Path, result: ReplayResult, positives: list[set[int]], threshold: float, info: dict[str, Any],
              title: str = "loop closure") -> dict[str, Any]:  # fmt: skip
    """Write the run folder's files into ``out`` (the caller renames it into place)."""
    metrics = compute_metrics(result, positives, threshold)
    metrics.update(info)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    with open(out / "loop_closures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "stamp_ns", "match_frame", "score", "accepted", "correct", "has_positive",
                    "global_distance", "num_matches", "num_inliers"])  # fmt: skip
        for r in result.records:
            accepted = int(r.score >= threshold and r.match_frame >= 0)
            w.writerow([r.frame, r.stamp_ns, r.match_frame, f"{r.score:.6f}", accepted,
                        int(r.match_frame in positives[r.frame]), int(bool(positives[r.frame])),
                        f"{r.global_distance:.6f}", r.num_matches, r.num_inliers])  # fmt: skip
    _plots(out, metrics, result, title)
    ex = out / "examples"
    ex.mkdir(exist_ok=True)
    fps = sorted((r for r in result.records if r.match_frame >= 0 and r.score >= threshold
                  and r.match_frame not in positives[r.frame]), key=lambda r: -r.score)[:5]  # fmt: skip
    for r in fps:
        _pair_picture(ex / f"false_positive_{r.frame}_{r.match_frame}.png", result, r.frame, r.match_frame,
                      f"FALSE POSITIVE frame {r.frame} -> {r.match_frame}, score {r.score:.3f}")  # fmt: skip
    missed = [
        r
        for r in result.records
        if positives[r.frame] and not (r.score >= threshold and r.match_frame in positives[r.frame])
    ]
    for r in missed[:5]:
        truth = min(positives[r.frame], key=lambda j: abs(j - r.match_frame) if r.match_frame >= 0 else j)
        _pair_picture(ex / f"missed_{r.frame}_{truth}.png", result, r.frame, truth,
                      f"MISSED frame {r.frame} (true {truth}); best was {r.match_frame} at {r.score:.3f}")  # fmt: skip
    at = metrics["at_threshold"]
    lat = metrics["latency"]

    def ms3(d: dict[str, float], fmt: str) -> str:
        return " / ".join(format(d[k], fmt) for k in ("p50_ms", "p95_ms", "max_ms"))

    rows = [
        (f"precision / recall / F1 at threshold {threshold:.2f}",
         f"{at['precision']:.3f} / {at['recall']:.3f} / {at['f1']:.3f}"),
        ("loops reported / true / revisiting frames", f"{at['reported']} / {at['true_positives']} / {at['positives']}"),
        ("average precision (PR area)", f"{metrics['average_precision']:.3f}"),
        ("recall at 100% precision", f"{metrics['recall_at_100_precision']:.3f}"),
        ("retrieval Recall@1/5/10/20", " / ".join(f"{v:.3f}" for v in metrics["retrieval_recall_at_n"].values())),
        ("keyframes / frames", f"{metrics['keyframes']} / {metrics['frames']}"),
        ("keyframes per second", f"{metrics['keyframes_per_second']:.2f}"),
        ("latency extract p50 / p95 / max (ms)", ms3(lat["extract"], ".0f")),
        ("latency re-rank p50 / p95 / max (ms)", ms3(lat["rerank"], ".1f")),
        ("peak memory (MB) / map bytes per keyframe",
         f"{metrics['peak_rss_mb']:.0f} / {metrics['map_bytes_per_keyframe']:.0f}"),
    ]  # fmt: skip
    preset_name = info.get("preset", {}).get("name", "?")
    lines = [
        f"# {title}", "",
        f"Model `{info.get('model', '?')}`, preset `{preset_name}`, mode `{info.get('mode')}`,",
        f"bag `{info.get('bag')}`.",
        "", "| metric | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in rows),
        "", "![precision-recall](pr_curve.png)", "", "![latency](latency.png)", "",
        "Examples (worst false positives, missed loops) are in `examples/`.", "",
    ]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines))
    return metrics
