"""The visual-change test's threshold, measured: how much the picture changes between consecutive frames of a
walk (RTAB-Map loop, about 1 s apart) and between a frame and the same view perturbed as a camera that does not
move perturbs it (pixel noise, a few pixels of shake, an exposure change).

    .venv/bin/python benchmarks/visual_change.py

Prints both distributions for pnv_ros.detector.visual_change (1 - normalised cross-correlation of 32 x 24 grey
thumbnails); DetectorParams.min_visual_change (0.2) sits between them. No model needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pnv_ros.detector import thumbnail, visual_change

FRAMES = Path(__file__).resolve().parent.parent / "data" / "rtabmap_samples_loop84" / "images"


def perturb(a: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    f = a.astype(np.float64)
    if kind.startswith("noise"):
        f = f + rng.normal(0, float(kind[len("noise") :]), f.shape)
    elif kind.startswith("shift"):
        f = np.roll(f, int(kind[len("shift") :]), axis=1)
    elif kind == "exposure+30%":
        f = f * 1.3 + 10
    elif kind == "exposure-60%":
        f = f * 0.4
    return np.clip(f, 0, 255).astype(np.uint8)


def main() -> None:
    ims = [np.asarray(Image.open(FRAMES / f"{i}.jpg").convert("RGB")) for i in range(1, 85)]
    thumbs = [thumbnail(a) for a in ims]
    walk = np.array([visual_change(thumbs[i], thumbs[i + 1]) for i in range(len(ims) - 1)])
    print(
        f"consecutive frames of the walk ({len(walk)} pairs): min {walk.min():.3f}, "
        f"5th percentile {np.percentile(walk, 5):.3f}, median {np.median(walk):.3f}"
    )
    rng = np.random.default_rng(0)
    for kind in ("noise3", "noise8", "noise20", "shift2", "shift6", "exposure+30%", "exposure-60%"):
        # two independent perturbations of the same view, as two frames of a camera standing still
        v = [
            visual_change(
                thumbnail(perturb(a, kind, rng)),
                thumbnail(perturb(a, kind if kind.startswith("noise") else "none", rng)),
            )
            for a in ims[::3]
        ]
        print(f"same view, {kind:13s}: max {max(v):.4f}, median {np.median(v):.4f}")


if __name__ == "__main__":
    main()
