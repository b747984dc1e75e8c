"""Loop-closure metrics: small pure functions over per-keyframe decisions.

A keyframe's decision is its best re-ranked candidate and that candidate's
absolute score. At threshold t it reports a loop when score >= t; the loop is
a true positive when the ground truth marks the pair. A loop into a frame the
ground truth marks "ignore" counts neither way (it is not reported). Recall
counts keyframes that have a positive among the frames they could have matched
(earlier keyframes outside the detector's exclusion window): a positive the
detector could never return is not counted, and is reported apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Decision:
    """Best candidate of one keyframe (match_frame -1 when there was none)."""

    frame: int
    match_frame: int
    score: float
    correct: bool
    has_positive: bool
    top_frames: Sequence[int] = ()
    ignored: bool = False  # the match is a frame the ground truth ignores: neither true nor false


def precision_recall(decisions: Sequence[Decision], threshold: float) -> dict[str, float]:
    """Precision, recall and F1 at one threshold (precision 1 when nothing is reported)."""
    reported = [d for d in decisions if d.match_frame >= 0 and not d.ignored and d.score >= threshold]
    tp = sum(d.correct for d in reported)
    positives = sum(d.has_positive for d in decisions)
    p = tp / len(reported) if reported else 1.0
    r = tp / positives if positives else float("nan")
    f1 = 2 * p * r / (p + r) if positives and (p + r) > 0 else 0.0
    return {
        "precision": p,
        "recall": r,
        "f1": f1,
        "reported": len(reported),
        "true_positives": tp,
        "positives": positives,
    }


def pr_curve(decisions: Sequence[Decision]) -> dict[str, list[float] | float]:
    """Precision-recall over every distinct score threshold, its area (average
    precision, step-wise) and the recall at 100% precision."""
    cands = sorted((d for d in decisions if d.match_frame >= 0 and not d.ignored), key=lambda d: -d.score)
    positives = sum(d.has_positive for d in decisions)
    thresholds, prec, rec = [], [], []
    tp = 0
    for i, d in enumerate(cands):
        tp += d.correct
        if i + 1 < len(cands) and cands[i + 1].score == d.score:
            continue  # ties enter together
        thresholds.append(float(d.score))
        prec.append(tp / (i + 1))
        rec.append(tp / positives if positives else 0.0)
    ap, last_r = 0.0, 0.0
    for p, r in zip(prec, rec):
        ap += p * (r - last_r)
        last_r = r
    r100 = max([r for p, r in zip(prec, rec) if p >= 1.0], default=0.0)
    return {
        "thresholds": thresholds,
        "precision": prec,
        "recall": rec,
        "average_precision": ap,
        "recall_at_100_precision": r100,
    }


def recall_at_n(
    decisions: Sequence[Decision], positives: Sequence[set[int]], n_values=(1, 5, 10, 20)
) -> dict[str, float]:
    """Retrieval-stage Recall@N over keyframes with a reachable positive."""
    rows = [(d, positives[d.frame]) for d in decisions if d.has_positive]
    out = {}
    for n in n_values:
        hits = sum(1 for d, pos in rows if any(f in pos for f in list(d.top_frames)[:n]))
        out[str(n)] = hits / len(rows) if rows else float("nan")
    return out


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p95 and max in milliseconds."""
    if not len(seconds):
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "max_ms": float("nan"), "count": 0}
    a = np.asarray(seconds, dtype=np.float64) * 1000
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "max_ms": float(a.max()),
        "count": int(a.size),
    }
