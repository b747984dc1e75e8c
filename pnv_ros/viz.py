"""Match pictures: query and database image side by side, matched patches joined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pnv_ros.config import Preset
from pnv_ros.features import patch_keypoints, to_image_pixels
from pnv_ros.matching import ScaleMatch


def match_image(
    query: Image.Image,
    db: Image.Image,
    preset: Preset,
    matches: list[ScaleMatch],
    score: float,
    *,
    title: str = "",
    height: int = 360,
    max_lines: int = 200,
) -> np.ndarray:
    """Side-by-side RGB picture (H, W, 3) uint8 with inlier matches as lines.

    Lines come from the scale with the most inliers; keypoints are mapped from
    the network input to each original image, then to the drawing's scale.
    """
    import cv2

    def fit(im: Image.Image) -> tuple[np.ndarray, float, float]:
        s = height / im.height
        w = max(1, round(im.width * s))
        arr = np.asarray(im.convert("RGB").resize((w, height), Image.BILINEAR)).copy()
        return arr, w / im.width, s

    qa, qsx, qsy = fit(query)
    da, dsx, dsy = fit(db)
    canvas = np.concatenate([qa, da], axis=1)
    best = max(range(len(matches)), key=lambda s: matches[s].num_inliers, default=None)
    n_inl = 0
    if best is not None and matches[best].num_matches:
        m = matches[best]
        kp = patch_keypoints(preset, best)
        qk = to_image_pixels(kp, preset, query.size)[m.query_idx[m.inliers]] * (qsx, qsy)
        dk = to_image_pixels(kp, preset, db.size)[m.db_idx[m.inliers]] * (dsx, dsy) + (qa.shape[1], 0)
        n_inl = len(qk)
        step = max(1, n_inl // max_lines)
        rng = np.random.default_rng(0)
        for a, b in zip(qk[::step], dk[::step]):
            color = tuple(int(c) for c in rng.integers(64, 256, 3))
            pa, pb = tuple(int(v) for v in np.round(a)), tuple(int(v) for v in np.round(b))
            cv2.line(canvas, pa, pb, color, 1, cv2.LINE_AA)
            cv2.circle(canvas, pa, 3, color, -1, cv2.LINE_AA)
            cv2.circle(canvas, pb, 3, color, -1, cv2.LINE_AA)
    text = f"{title}  score {score:.3f}  matches {n_inl}".strip()
    cv2.rectangle(canvas, (0, 0), (min(canvas.shape[1], 12 + 9 * len(text)), 24), (0, 0, 0), -1)
    cv2.putText(canvas, text, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def save_png(rgb: np.ndarray, path: str | Path) -> None:
    """Write an (H, W, 3) uint8 picture as PNG atomically (no partial file on a full disk)."""
    from pnv_ros.storage import atomic_file

    with atomic_file(path, "wb", sync=False) as f:
        Image.fromarray(rgb).save(f, format="PNG")
