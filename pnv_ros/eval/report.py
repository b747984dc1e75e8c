"""A run folder a person can read: metrics.json, loop_closures.csv, plots, report.md,
and pictures of the worst false positives and of missed loops."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from pnv_ros.eval.metrics import Decision, latency_stats, pr_curve, precision_recall, recall_at_n
from pnv_ros.eval.replay import ReplayResult
from pnv_ros.storage import to_json


def _ignore(positives: list[set[int]]) -> list[set[int]]:
    """The ground truth's ignored frames per frame (a SequenceGT's ``ignore``; none for a plain list)."""
    ign = getattr(positives, "ignore", None)
    return ign if ign is not None else [set() for _ in positives]


def findable(result: ReplayResult, positives: list[set[int]]) -> list[tuple[set[int], str]]:
    """Per keyframe record: (its positives the detector could return, and when there are
    none although the ground truth has some, why: 'exclusion_window' when a positive is a
    keyframe inside the run's exclusion window, 'not_keyframes' when none is a keyframe
    (skipped, or not kept by the keyframe policy); '' otherwise). A keyframe can match an
    earlier keyframe that is at least ``exclude_recent_s`` older (by stamp) and not one of
    the last ``exclude_recent_keyframes`` keyframes, as the detector's ``_limit``."""
    kf_of = {r.frame: n for n, r in enumerate(result.records)}
    stamps = np.array([r.stamp_ns for r in result.records], dtype=np.int64)
    window = int(result.exclude_recent_s * 1e9)
    out = []
    for n, r in enumerate(result.records):
        limit = min(n - result.exclude_recent_keyframes, int(np.searchsorted(stamps[:n], r.stamp_ns - window, "right")))
        pos = positives[r.frame]
        ok = {j for j in pos if kf_of.get(j, n) < limit}
        why = "" if ok or not pos else ("exclusion_window" if any(j in kf_of for j in pos) else "not_keyframes")
        out.append((ok, why))
    return out


def decisions(result: ReplayResult, positives: list[set[int]]) -> list[Decision]:
    ign = _ignore(positives)
    return [
        Decision(
            r.frame,
            r.match_frame,
            r.score,
            r.match_frame in positives[r.frame],
            bool(ok),
            r.top_frames,
            r.match_frame >= 0 and r.match_frame in ign[r.frame] and r.match_frame not in positives[r.frame],
        )
        for r, (ok, _) in zip(result.records, findable(result, positives))
    ]


def compute_metrics(result: ReplayResult, positives: list[set[int]], threshold: float) -> dict[str, Any]:
    ds = decisions(result, positives)
    curve = pr_curve(ds)
    n_kf = len(result.records)
    why = [(r.frame, w) for r, (_, w) in zip(result.records, findable(result, positives))]
    unfindable = {k: [f for f, w in why if w == k] for k in ("exclusion_window", "not_keyframes")}
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
        "ground_truth": {
            "frames_with_positives": sum(bool(p) for p in positives),
            "keyframes_with_positives": sum(bool(positives[r.frame]) for r in result.records),
            "keyframes_with_findable_positives": sum(d.has_positive for d in ds),
            "unfindable": {
                "note": "keyframes whose positives the detector could never return: excluded from recall",
                "exclusion_window": {
                    "count": len(unfindable["exclusion_window"]),
                    "frames": unfindable["exclusion_window"],
                },
                "not_keyframes": {"count": len(unfindable["not_keyframes"]), "frames": unfindable["not_keyframes"]},
            },
            "exclude_recent_s": result.exclude_recent_s,
            "exclude_recent_keyframes": result.exclude_recent_keyframes,
            "ignored_loops_at_threshold": sum(d.ignored and d.score >= threshold for d in ds),
        },
        "skipped_frames": {
            "count": len(result.skipped),
            "frames": [{"frame": s.frame, "stamp_ns": s.stamp_ns, "reason": s.reason} for s in result.skipped],
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


_CSV_HEADER = [
    "frame",
    "stamp_ns",
    "match_frame",
    "score",
    "accepted",
    "correct",
    "has_positive",
    "global_distance",
    "num_matches",
    "num_inliers",
    "ignored",
]


def _write_loop_closures_csv(
    path: Path, result: ReplayResult, positives: list[set[int]], ds: list[Decision], threshold: float
) -> None:
    """Write ``loop_closures.csv``: one row per keyframe record (columns ``_CSV_HEADER``).

    ``accepted`` is the detector's decision at ``threshold`` (never for a loop into an ignored
    frame), ``correct`` whether the best match is a positive, ``has_positive`` whether a positive
    was one the detector could return; scores and distances have 6 decimals.
    """
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_CSV_HEADER)
        for r, d in zip(result.records, ds):  # has_positive: a positive the detector could return
            accepted = int(r.score >= threshold and r.match_frame >= 0 and not d.ignored)
            w.writerow(
                [
                    r.frame,
                    r.stamp_ns,
                    r.match_frame,
                    f"{r.score:.6f}",
                    accepted,
                    int(r.match_frame in positives[r.frame]),
                    int(d.has_positive),
                    f"{r.global_distance:.6f}",
                    r.num_matches,
                    r.num_inliers,
                    int(d.ignored),
                ]
            )


def _write_examples(
    ex: Path, result: ReplayResult, positives: list[set[int]], ds: list[Decision], threshold: float
) -> None:
    """Write side-by-side pictures into the folder ``ex`` (created if missing): the 5
    highest-scoring false positives at ``threshold`` and the first 5 missed loops (a keyframe
    with a findable positive whose accepted match, if any, is not one), each paired with the
    findable positive nearest its best match. Pairs without both thumbnails are left out."""
    ex.mkdir(exist_ok=True)
    reach = [ok for ok, _ in findable(result, positives)]
    fps = sorted(
        (
            r
            for r, d in zip(result.records, ds)
            if r.match_frame >= 0 and r.score >= threshold and not d.correct and not d.ignored
        ),
        key=lambda r: -r.score,
    )[:5]
    for r in fps:
        _pair_picture(
            ex / f"false_positive_{r.frame}_{r.match_frame}.png",
            result,
            r.frame,
            r.match_frame,
            f"FALSE POSITIVE frame {r.frame} -> {r.match_frame}, score {r.score:.3f}",
        )
    missed = [
        (r, ok) for r, ok in zip(result.records, reach) if ok and not (r.score >= threshold and r.match_frame in ok)
    ]
    for r, ok in missed[:5]:
        truth = min(ok, key=lambda j: abs(j - r.match_frame) if r.match_frame >= 0 else j)
        _pair_picture(
            ex / f"missed_{r.frame}_{truth}.png",
            result,
            r.frame,
            truth,
            f"MISSED frame {r.frame} (true {truth}); best was {r.match_frame} at {r.score:.3f}",
        )


def _ms3(d: dict[str, float], fmt: str) -> str:
    """A latency summary's ``p50 / p95 / max`` (milliseconds) formatted with ``fmt``."""
    return " / ".join(format(d[k], fmt) for k in ("p50_ms", "p95_ms", "max_ms"))


def _summary_rows(metrics: dict[str, Any], threshold: float) -> list[tuple[str, str]]:
    """The report's metric table as (metric, formatted value) rows, from ``compute_metrics``'s dict."""
    at = metrics["at_threshold"]
    lat = metrics["latency"]
    g, sk = metrics["ground_truth"], metrics["skipped_frames"]
    un = g["unfindable"]
    return [
        (
            f"precision / recall / F1 at threshold {threshold:.2f}",
            f"{at['precision']:.3f} / {at['recall']:.3f} / {at['f1']:.3f}",
        ),
        ("loops reported / true / revisiting frames", f"{at['reported']} / {at['true_positives']} / {at['positives']}"),
        ("average precision (PR area)", f"{metrics['average_precision']:.3f}"),
        ("recall at 100% precision", f"{metrics['recall_at_100_precision']:.3f}"),
        ("retrieval Recall@1/5/10/20", " / ".join(f"{v:.3f}" for v in metrics["retrieval_recall_at_n"].values())),
        (
            "revisiting keyframes: with GT positives / findable",
            f"{g['keyframes_with_positives']} / {g['keyframes_with_findable_positives']}",
        ),
        (
            "not findable: positives only in the exclusion window / never keyframes",
            f"{un['exclusion_window']['count']} / {un['not_keyframes']['count']}",
        ),
        ("loops into ignored frames (not counted)", f"{g['ignored_loops_at_threshold']}"),
        ("keyframes / frames / skipped frames", f"{metrics['keyframes']} / {metrics['frames']} / {sk['count']}"),
        ("keyframes per second", f"{metrics['keyframes_per_second']:.2f}"),
        ("latency extract p50 / p95 / max (ms)", _ms3(lat["extract"], ".0f")),
        ("latency re-rank p50 / p95 / max (ms)", _ms3(lat["rerank"], ".1f")),
        (
            "peak memory (MB) / map bytes per keyframe",
            f"{metrics['peak_rss_mb']:.0f} / {metrics['map_bytes_per_keyframe']:.0f}",
        ),
    ]


def _unfindable_and_skipped_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's closing paragraphs: keyframes left out of recall (positives only in the
    exclusion window, or never keyframes) and a table of skipped frames; each only when non-empty."""
    g, sk = metrics["ground_truth"], metrics["skipped_frames"]
    un = g["unfindable"]
    lines: list[str] = []
    if un["exclusion_window"]["count"]:
        lines += [
            f"Keyframes whose positives all lie in the exclusion window ({g['exclude_recent_s']:g} s, "
            f"{g['exclude_recent_keyframes']} keyframes), not counted in recall: frames "
            + ", ".join(map(str, un["exclusion_window"]["frames"]))
            + ".",
            "",
        ]
    if un["not_keyframes"]["count"]:
        lines += [
            "Keyframes whose positives never became keyframes, not counted in recall: frames "
            + ", ".join(map(str, un["not_keyframes"]["frames"]))
            + ".",
            "",
        ]
    if sk["count"]:
        lines += [
            f"## Skipped frames ({sk['count']})",
            "",
            "Frames that cannot be decoded; the detector skipped them, as the node does.",
            "",
            "| frame | stamp (ns) | reason |",
            "|---|---|---|",
            *(f"| {f['frame']} | {f['stamp_ns']} | {f['reason'].replace('|', '/')} |" for f in sk["frames"]),
            "",
        ]
    return lines


def _report_markdown(metrics: dict[str, Any], threshold: float, info: dict[str, Any], title: str) -> str:
    """The text of ``report.md``: title, run description from ``info`` (model, preset, mode,
    bag), the metric table, the plots, and the notes on unfindable keyframes and skipped frames."""
    preset_name = info.get("preset", {}).get("name", "?")
    lines = [
        f"# {title}",
        "",
        f"Model `{info.get('model', '?')}`, preset `{preset_name}`, mode `{info.get('mode')}`,",
        f"bag `{info.get('bag')}`.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _summary_rows(metrics, threshold)),
        "",
        "![precision-recall](pr_curve.png)",
        "",
        "![latency](latency.png)",
        "",
        "Examples (worst false positives, missed loops) are in `examples/`.",
        "",
    ]
    lines += _trajectory_lines(metrics)
    lines += _unfindable_and_skipped_lines(metrics)
    return "\n".join(lines)


def _trajectory_lines(metrics: dict[str, Any]) -> list[str]:
    """report.md's trajectory section (``pnv eval --gt-poses``): ATE, RPE, the METRIC loop poses' errors, the plot."""
    tr, lt = metrics.get("trajectory"), metrics.get("loop_transforms")
    if not tr or not lt:
        return []

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    rpe, rpe_opt, graph = tr.get("rpe_odometry") or {}, tr.get("rpe_optimized") or {}, tr.get("pose_graph")
    by = f" by {graph['source']}, {graph['keyframes']} keyframes, {graph['loops']} loops" if graph else ""
    return [
        "## Trajectory",
        "",
        f"Against `{tr['ground_truth']}` at {tr['keyframes_with_odometry']} keyframes ({tr['alignment']}).",
        *(["", f"The pose graph got {graph['loops_rule']}.", ""] if graph else [""]),
        "| | value |",
        "|---|---|",
        f"| ATE RMSE, odometry | {f(tr['ate_rmse_m_odometry'], '.3f')} m |",
        f"| ATE RMSE, optimised{by} | {f(tr['ate_rmse_m_optimized'], '.3f')} m |",
        f"| RPE over {tr['rpe_delta_m']:g} m, odometry | {f(rpe.get('translation_rmse_m'), '.3f')} m, "
        f"{f(rpe.get('rotation_rmse_deg'), '.2f')} deg |",
        f"| RPE over {tr['rpe_delta_m']:g} m, optimised | {f(rpe_opt.get('translation_rmse_m'), '.3f')} m, "
        f"{f(rpe_opt.get('rotation_rmse_deg'), '.2f')} deg |",
        f"| METRIC loop poses | {lt['count']} |",
        f"| loop pose error, median | {f(lt['median_translation_error_m'], '.3f')} m, "
        f"{f(lt['median_rotation_error_deg'], '.2f')} deg |",
        f"| loop pose error, p95 | {f(lt['p95_translation_error_m'], '.3f')} m, "
        f"{f(lt['p95_rotation_error_deg'], '.2f')} deg |",
        f"| loop pose NEES, mean (6 if the covariances are right) | {f(lt['nees_mean'], '.2f')} |",
        "",
        "![top view](trajectory.png)",
        "",
    ]


def write_run(
    out: Path,
    result: ReplayResult,
    positives: list[set[int]],
    threshold: float,
    info: dict[str, Any],
    title: str = "loop closure",
) -> dict[str, Any]:
    """Write the run folder's files into ``out`` (the caller renames it into place):
    ``metrics.json`` (``compute_metrics`` plus ``info``), ``loop_closures.csv``, the plots
    ``pr_curve.png`` and ``latency.png``, ``examples/`` and ``report.md``. Returns the metrics."""
    metrics = compute_metrics(result, positives, threshold)
    metrics.update(info)
    ds = decisions(result, positives)
    (out / "metrics.json").write_text(to_json(metrics))  # strict JSON: an undefined recall is null
    _write_loop_closures_csv(out / "loop_closures.csv", result, positives, ds, threshold)
    _plots(out, metrics, result, title)
    _write_examples(out / "examples", result, positives, ds, threshold)
    (out / "report.md").write_text(_report_markdown(metrics, threshold, info, title))
    return metrics
