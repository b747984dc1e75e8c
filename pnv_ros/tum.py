"""TUM RGB-D folders and trajectory files (Sturm et al., IROS 2012; vision.in.tum.de/data/datasets/rgbd-dataset).

The layout (TUM's file formats page):

- ``rgb.txt``, ``depth.txt``: one image a line, ``timestamp filename`` (seconds, a path relative to the folder);
  ``#`` starts a comment line. Colour is 640 x 480 8-bit (PNG in TUM's archives, any image file here); depth is
  a 16-bit PNG registered to the colour camera, :data:`DEPTH_UNITS_PER_M` units per metre, 0 = no measurement.
- ``associations.txt`` (made by TUM's ``associate.py``): ``rgb_stamp rgb_file depth_stamp depth_file``; read when
  the folder has no ``rgb.txt`` / ``depth.txt``.
- trajectory files (``groundtruth.txt``, an odometry): ``timestamp tx ty tz qx qy qz qw``, the colour camera's
  optical centre and orientation in the world frame (:class:`pnv_ros.trajectory.Trajectory`).

Colour and depth are paired as ``associate.py`` pairs them (:func:`associate`): every pair of stamps closer than
``max_dt`` (0.02 s, its default), the closest first, each image at most once. A colour image without depth that
close is not a frame of the sequence (``TumSequence.unpaired``: TUM's tools leave them out too).

Every error is a :class:`TumError` that names the file and line (``rgb.txt:12: ...``): a line that is not
``timestamp filename`` (or not 8 numbers in a trajectory), a stamp listed twice or going back, a listed image that
does not exist (a missing depth frame), a folder with neither layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnv_ros.errors import PnvError
from pnv_ros.trajectory import QUATERNION_NORM_TOLERANCE, Trajectory, TrajectoryError

#: TUM depth PNG units per metre (TUM's file formats page: "the depth images are scaled by a factor of 5000")
DEPTH_UNITS_PER_M = 5000
#: colour-depth pairing tolerance, seconds: associate.py's default --max_difference
MAX_DT_S = 0.02


class TumError(PnvError, ValueError):
    """A TUM RGB-D folder, list or trajectory file cannot be read, or names an image that is not there."""


@dataclass(frozen=True)
class StampedFile:
    """One line of ``rgb.txt`` / ``depth.txt``: stamp (s), the file (absolute), and where it was listed."""

    stamp: float
    path: Path
    where: str  # "rgb.txt:12"


@dataclass(frozen=True)
class TumFrame:
    """A colour image and its depth image (stamps in seconds)."""

    stamp: float
    rgb: Path
    depth_stamp: float
    depth: Path


@dataclass
class TumSequence:
    """The frames of a TUM folder in stamp order; ``unpaired``: colour images without depth within ``max_dt``."""

    folder: Path
    frames: list[TumFrame]
    unpaired: list[StampedFile] = field(default_factory=list)


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of the non-comment, non-blank lines; ',' and tabs separate as spaces (associate.py)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TumError(f"{path} cannot be read: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.replace(",", " ").replace("\t", " ").strip()
        if s and not s.startswith("#"):
            out.append((n, s.split()))
    return out


def _stamp(token: str, where: str, what: str = "timestamp") -> float:
    try:
        v = float(token)
    except ValueError:
        v = float("nan")
    if not np.isfinite(v):
        raise TumError(f"{where}: {what} {token!r} is not a number")
    return v


def read_file_list(path: str | Path, *, check_files: bool = True) -> list[StampedFile]:
    """``rgb.txt`` / ``depth.txt``: the listed files in stamp order, paths relative to the list's folder.

    Raises:
        TumError: a line that is not ``timestamp filename``, a stamp listed twice, a listed file that does not
            exist (with ``check_files``), or a list without any line.
    """
    path = Path(path)
    out: list[StampedFile] = []
    seen: dict[float, str] = {}
    for n, tok in _lines(path):
        where = f"{path}:{n}"
        if len(tok) < 2:
            raise TumError(f"{where}: need 'timestamp filename', got {' '.join(tok)!r}")
        t = _stamp(tok[0], where)
        if t in seen:
            raise TumError(f"{where}: stamp {tok[0]} is listed twice (first at {seen[t]})")
        seen[t] = where
        f = path.parent / tok[1]
        if check_files and not f.is_file():
            raise TumError(f"{where}: {tok[1]} does not exist (a missing image; fix the list or restore the file)")
        out.append(StampedFile(t, f, where))
    if not out:
        raise TumError(f"{path} lists no image")
    return sorted(out, key=lambda s: s.stamp)


def associate(first: list[float], second: list[float], max_dt: float = MAX_DT_S) -> list[tuple[int, int]]:
    """TUM's ``associate.py``: index pairs (i, j) with ``|first[i] - second[j]| < max_dt``, the closest pairs
    first, each index at most once; sorted by i."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    if not len(a) or not len(b):
        return []
    order = np.argsort(b)
    bs = b[order]
    cands = []
    for i, t in enumerate(a):  # only the neighbours within max_dt (sorted search instead of all pairs)
        lo, hi = np.searchsorted(bs, t - max_dt, "left"), np.searchsorted(bs, t + max_dt, "right")
        cands += [(abs(t - bs[k]), i, int(order[k])) for k in range(lo, hi) if abs(t - bs[k]) < max_dt]
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for _, i, j in sorted(cands):
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j))
    return sorted(out)


def read_associations(path: str | Path, max_dt: float = MAX_DT_S) -> list[TumFrame]:
    """``associations.txt``: ``rgb_stamp rgb_file depth_stamp depth_file`` a line, in stamp order.

    Raises:
        TumError: a line of another shape, stamps further apart than ``max_dt``, a colour stamp listed twice, or
            a listed image that does not exist.
    """
    path = Path(path)
    frames: dict[float, TumFrame] = {}
    for n, tok in _lines(path):
        where = f"{path}:{n}"
        if len(tok) < 4:
            raise TumError(f"{where}: need 'rgb_stamp rgb_file depth_stamp depth_file', got {' '.join(tok)!r}")
        t, td = _stamp(tok[0], where, "colour timestamp"), _stamp(tok[2], where, "depth timestamp")
        if abs(t - td) >= max_dt:
            raise TumError(f"{where}: colour and depth are {abs(t - td):.3f} s apart (at most {max_dt:g} s)")
        if t in frames:
            raise TumError(f"{where}: colour stamp {tok[0]} is listed twice")
        for kind, name in (("colour", tok[1]), ("depth", tok[3])):
            if not (path.parent / name).is_file():
                raise TumError(f"{where}: {kind} image {name} does not exist (a missing {kind} frame)")
        frames[t] = TumFrame(t, path.parent / tok[1], td, path.parent / tok[3])
    if not frames:
        raise TumError(f"{path} lists no frame")
    return [frames[t] for t in sorted(frames)]


def read_sequence(folder: str | Path, max_dt: float = MAX_DT_S) -> TumSequence:
    """The colour-depth frames of a TUM RGB-D folder: ``rgb.txt`` and ``depth.txt`` paired by :func:`associate`,
    else ``associations.txt``.

    Raises:
        TumError: a folder with neither layout, no colour image paired with depth, or as the readers above.
    """
    folder = Path(folder)
    rgb_txt, depth_txt, assoc = folder / "rgb.txt", folder / "depth.txt", folder / "associations.txt"
    if rgb_txt.is_file() and depth_txt.is_file():
        rgb, depth = read_file_list(rgb_txt), read_file_list(depth_txt)
        pairs = associate([r.stamp for r in rgb], [d.stamp for d in depth], max_dt)
        if not pairs:
            raise TumError(
                f"{folder}: no colour image of rgb.txt has a depth image of depth.txt within {max_dt:g} s "
                f"(colour {rgb[0].stamp:.6f}..{rgb[-1].stamp:.6f}, depth {depth[0].stamp:.6f}..{depth[-1].stamp:.6f})"
            )
        frames = [TumFrame(rgb[i].stamp, rgb[i].path, depth[j].stamp, depth[j].path) for i, j in pairs]
        paired = {i for i, _ in pairs}
        return TumSequence(folder, frames, [r for i, r in enumerate(rgb) if i not in paired])
    if assoc.is_file():
        return TumSequence(folder, read_associations(assoc, max_dt))
    if not folder.is_dir():
        raise TumError(f"TUM folder {folder} does not exist")
    raise TumError(f"{folder} is not a TUM RGB-D folder: it needs rgb.txt and depth.txt (or associations.txt)")


def read_trajectory(path: str | Path) -> Trajectory:
    """A TUM trajectory file: ``timestamp tx ty tz qx qy qz qw`` a line (seconds, metres, unit quaternion).

    Raises:
        TumError: a line without exactly 8 numbers, a stamp that does not increase, a quaternion whose norm is
            not 1 (naming the line), or a file without poses.
    """
    path = Path(path)
    rows, where = [], []
    for n, tok in _lines(path):
        w = f"{path}:{n}"
        if len(tok) != 8:
            raise TumError(
                f"{w}: a TUM trajectory line is 'timestamp tx ty tz qx qy qz qw' (8 numbers), got {len(tok)}"
            )
        rows.append([_stamp(x, w, "value") for x in tok])
        where.append(w)
        if len(rows) > 1 and rows[-1][0] <= rows[-2][0]:
            raise TumError(f"{w}: stamp {tok[0]} does not come after the previous line's ({where[-2]})")
    if not rows:
        raise TumError(f"{path} holds no pose (TUM format: 'timestamp tx ty tz qx qy qz qw' a line)")
    a = np.array(rows)
    norms = np.linalg.norm(a[:, 4:], axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > QUATERNION_NORM_TOLERANCE)
    if bad.size:
        raise TumError(
            f"{where[bad[0]]}: quaternion qx qy qz qw = {a[bad[0], 4:].tolist()} has norm {norms[bad[0]]:.4f}, not 1 "
            f"(is the file in TUM's column order?)"
        )
    try:
        return Trajectory(a[:, 0], a[:, 1:4], a[:, 4:])
    except TrajectoryError as e:
        raise TumError(f"{path}: {e}") from None


def write_trajectory(path: str | Path, traj: Trajectory, comment: str = "") -> None:
    """Write ``traj`` as a TUM trajectory file (stamps with 6 decimals, poses with 6)."""
    lines = [f"# {c}" for c in comment.splitlines()] + ["# timestamp tx ty tz qx qy qz qw"]
    for t, p, q in zip(traj.stamps, traj.positions, traj.quaternions):
        lines.append(f"{t:.6f} " + " ".join(f"{v:.6f}" for v in (*p, *q)))
    Path(path).write_text("\n".join(lines) + "\n")


def load_depth_mm(path: str | Path) -> np.ndarray:
    """A TUM depth PNG (16-bit, :data:`DEPTH_UNITS_PER_M` units per metre) as (H, W) uint16 millimetres, REP 118's
    ``16UC1`` (0 = no measurement; rounded to the nearest millimetre: TUM's unit is 0.2 mm).

    Raises:
        TumError: a file that cannot be read or is not a 16-bit single-channel image.
    """
    import cv2

    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise TumError(f"depth image {path} cannot be read")
    if a.dtype != np.uint16 or a.ndim != 2:
        raise TumError(f"depth image {path} is {a.dtype} {a.shape}: TUM depth is a 16-bit single-channel PNG")
    mm = (a.astype(np.uint32) * 1000 + DEPTH_UNITS_PER_M // 2) // DEPTH_UNITS_PER_M
    return mm.astype(np.uint16)
