"""Sequences from the shared real sets, for `pnv bag make` + `pnv eval`.

- rtabmap_loop84: as is (84 frames, the authors' GT matrix).
- corridor: the reference traversal then the query traversal (222 frames);
  query i (frame 111 + i) revisits reference j when |i - j| <= 2.
- gardenspoint10: the night traversal then the day traversal (20 frames);
  day i (frame 10 + i) revisits night i (hard GT).
Writes, per set, an image folder (symlinks, frame order) and gt.npy.

    .venv/bin/python benchmarks/sequence_sets.py --data ../shared/data --out out/sequences
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pnv_ros.images import list_images


def _write(out: Path, name: str, frames: list[Path], gt: np.ndarray) -> None:
    d = out / name / "images"
    d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        link = d / f"{i}{f.suffix}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f.resolve())
    np.save(out / name / "gt.npy", gt.astype(np.uint8))
    print(f"{name}: {len(frames)} frames, {int(gt.any(axis=1).sum())} revisiting, {out / name}")


def two_traversals(first: list[Path], second: list[Path], tol: int) -> np.ndarray:
    n1, n2 = len(first), len(second)
    g = np.zeros((n1 + n2, n1 + n2), np.uint8)
    for i in range(n2):
        for j in range(max(0, i - tol), min(n1, i + tol + 1)):
            g[n1 + i, j] = 1
    return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="out/sequences")
    a = ap.parse_args()
    data, out = Path(a.data), Path(a.out)
    rt = data / "rtabmap_samples_loop84"
    if rt.is_dir():
        _write(out, "rtabmap_loop84", list_images([rt / "images"]), np.load(rt / "gt_matrix.npy"))
    co = data / "corridor_vprbench"
    if co.is_dir():
        ref, qry = list_images([co / "ref"]), list_images([co / "query"])
        _write(out, "corridor", ref + qry, two_traversals(ref, qry, 2))
    gp = data / "gardenspoint_walking_subset10"
    if gp.is_dir():
        night, day = list_images([gp / "ref"]), list_images([gp / "query"])
        _write(out, "gardenspoint10", night + day, two_traversals(night, day, 0))


if __name__ == "__main__":
    main()
