"""Ground truth for place recognition: which database images each query matches.

Formats, chosen by file suffix:
- ``.npy`` / ``.bmp`` / ``.png``: a matrix, (Q, DB) for these queries and
  database, or a square sequence matrix indexed by frame number when the
  image names are frame numbers (RTAB-Map's ``samples_GT.bmp``: row i-1,
  column j-1 for frame i closing a loop with frame j).
- ``.csv`` with a ``positive*`` column: one row per query; the query is named
  by a ``*_file`` column's stem (or a name / 0-based index in the first
  column); positives are database names if any token is one, else 0-based
  database indices.
- ``.csv`` with ``name,x,y[,z]`` columns: positions, with a radius: a database
  image is positive when it lies within the radius of the query.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pnv_ros.errors import GroundTruthError


class GroundTruth:
    """Positives per query, as sets of database indices."""

    def __init__(self, positives: Sequence[set[int]]):
        self.positives = [set(p) for p in positives]

    def __len__(self) -> int:
        return len(self.positives)

    def has_positive(self) -> np.ndarray:
        """(Q,) bool: queries with at least one positive."""
        return np.array([bool(p) for p in self.positives])


def _matrix(m: np.ndarray, path: Path, qn: Sequence[str], dbn: Sequence[str]) -> GroundTruth:
    if m.ndim != 2:
        raise GroundTruthError(f"ground truth {path}: matrix of shape {m.shape} is not 2-D")
    m = m != 0
    if m.shape == (len(qn), len(dbn)):
        return GroundTruth([set(np.flatnonzero(row).tolist()) for row in m])
    if m.shape[0] == m.shape[1] and all(n.isdigit() for n in list(qn) + list(dbn)):
        nmax = m.shape[0]
        frames = [int(n) for n in list(qn) + list(dbn)]
        if min(frames) < 1 or max(frames) > nmax:
            raise GroundTruthError(
                f"ground truth {path}: {nmax}x{nmax} sequence matrix, but frame numbers run "
                f"{min(frames)}..{max(frames)}: the names do not fit it"
            )
        cols = np.array([int(n) - 1 for n in dbn])
        return GroundTruth([set(np.flatnonzero(m[int(q) - 1, cols]).tolist()) for q in qn])
    raise GroundTruthError(
        f"ground truth {path}: matrix of shape {m.shape} does not fit {len(qn)} queries x {len(dbn)} "
        f"database images (give a (Q, DB) matrix, or a square one indexed by frame-number names)"
    )


def _positives_csv(rows: list[dict[str, str]], path: Path, qn: Sequence[str], dbn: Sequence[str]) -> GroundTruth:
    header = list(rows[0].keys())
    pos_col = next(c for c in header if c.lower().startswith("positive"))
    file_col = next((c for c in header if c.lower().endswith("_file") or c.lower() == "file"), None)
    key_col = header[0]
    qindex = {n: i for i, n in enumerate(qn)}
    dbindex = {n: i for i, n in enumerate(dbn)}
    tokens = [t for r in rows for t in (r[pos_col] or "").split()]
    by_name = any(t in dbindex for t in tokens)
    out: list[set[int]] = [set() for _ in qn]
    seen = 0
    for r in rows:
        key = Path(r[file_col]).stem if file_col else r[key_col].strip()
        if key in qindex:
            qi = qindex[key]
        elif not file_col and key.isdigit() and int(key) < len(qn):
            qi = int(key)
        else:
            continue  # a query not in this run
        seen += 1
        for t in (r[pos_col] or "").split():
            if by_name:
                if t in dbindex:
                    out[qi].add(dbindex[t])
            else:
                if not t.lstrip("-").isdigit() or not 0 <= int(t) < len(dbn):
                    raise GroundTruthError(
                        f"ground truth {path}: positive {t!r} of query {key!r} is not a database index "
                        f"0..{len(dbn) - 1} nor a database name"
                    )
                out[qi].add(int(t))
    if seen == 0:
        raise GroundTruthError(f"ground truth {path}: none of its {len(rows)} rows names one of the {len(qn)} queries")
    return GroundTruth(out)


def _positions_csv(
    rows: list[dict[str, str]], path: Path, qn: Sequence[str], dbn: Sequence[str], radius: float
) -> GroundTruth:
    cols = [c for c in ("x", "y", "z") if c in rows[0]]
    pos = {r["name"]: np.array([float(r[c]) for c in cols]) for r in rows}
    missing = [n for n in list(qn) + list(dbn) if n not in pos]
    if missing:
        raise GroundTruthError(f"ground truth {path}: no position for image(s) {missing[:5]}")
    db = np.stack([pos[n] for n in dbn])
    return GroundTruth([set(np.flatnonzero(np.linalg.norm(db - pos[q], axis=1) <= radius).tolist()) for q in qn])


def _read_matrix(path: Path) -> np.ndarray:
    """A 0/1 matrix from .npy (never unpickled) or an 8-bit image (.bmp/.png)."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError:
            raise GroundTruthError(
                f"ground truth {path} holds Python objects (pickle), which are never loaded: "
                f"give a 0/1 matrix or a CSV of positives"
            ) from None
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def load_ground_truth(
    path: str | Path, query_names: Sequence[str], db_names: Sequence[str], radius: float | None = None
) -> GroundTruth:
    """Read ground truth for these queries and database (see module doc)."""
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"ground truth file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".bmp", ".png"):
            return _matrix(_read_matrix(path), path, query_names, db_names)
        if suffix == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if not rows:
                raise GroundTruthError(f"ground truth {path} has no rows")
            if any(c.lower().startswith("positive") for c in rows[0]):
                return _positives_csv(rows, path, query_names, db_names)
            if "name" in rows[0] and "x" in rows[0]:
                if radius is None:
                    raise GroundTruthError(f"ground truth {path} holds positions: give a radius (--gt-radius)")
                return _positions_csv(rows, path, query_names, db_names, radius)
            raise GroundTruthError(
                f"ground truth {path}: CSV needs a 'positive...' column or 'name,x,y' columns, has {list(rows[0])}"
            )
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, GroundTruthError):
            raise
        raise GroundTruthError(f"ground truth {path} cannot be read: {e}") from None
    raise GroundTruthError(f"ground truth {path}: use .npy, .bmp, .png or .csv")


N_VALUES = (1, 5, 10, 20, 50, 100)


def recall_at_n(
    predictions: Sequence[Sequence[int]], gt: GroundTruth, n_values: Sequence[int] = N_VALUES
) -> dict[int, float]:
    """Recall@N over the queries that have a positive (the reference's rule:
    a query counts at N when any of its top N is a positive)."""
    if len(predictions) != len(gt):
        raise GroundTruthError(f"{len(predictions)} queries predicted but ground truth has {len(gt)}")
    mask = gt.has_positive()
    total = int(mask.sum())
    out = {}
    for n in n_values:
        hits = sum(
            1
            for pred, pos, m in zip(predictions, gt.positives, mask)
            if m and any(int(p) in pos for p in list(pred)[:n])
        )
        out[int(n)] = hits / total if total else float("nan")
    return out


def load_sequence_gt(
    path: str | Path,
    n_frames: int,
    *,
    stamps_ns: Sequence[int] | None = None,
    radius: float | None = None,
    min_gap_s: float = 0.0,
) -> list[set[int]]:
    """Loop-closure ground truth of one sequence: for each frame i, the earlier
    frames j < i it closes a loop with (0-based frame order in the bag).

    - a square matrix (.npy/.bmp/.png) G[i, j] over all frames;
    - a CSV of positives (rtabmap style, 1-based frame numbers when they run 1..N);
    - a positions CSV (x,y[,z] per frame, in frame order) with ``radius``: j is
      positive when within the radius and at least ``min_gap_s`` older.
    Only j < i is kept (online detection cannot match the future).
    """
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"ground truth file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".bmp", ".png"):
            m = _read_matrix(path)
            if m.ndim != 2 or m.shape != (n_frames, n_frames):
                raise GroundTruthError(
                    f"ground truth {path} is a {m.shape} matrix but the sequence has {n_frames} frames: "
                    f"give an {n_frames}x{n_frames} matrix"
                )
            return [set(np.flatnonzero(m[i, :i]).tolist()) for i in range(n_frames)]
        if suffix == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if not rows:
                raise GroundTruthError(f"ground truth {path} has no rows")
            header = list(rows[0])
            pos_col = next((c for c in header if c.lower().startswith("positive")), None)
            if pos_col is not None:
                keys = [int(r[header[0]]) for r in rows]
                base = 1 if min(keys) == 1 and max(keys) == len(rows) else 0
                if max(keys) - base >= n_frames or len(rows) != n_frames:
                    raise GroundTruthError(
                        f"ground truth {path} has {len(rows)} rows (frames {min(keys)}..{max(keys)}) but the "
                        f"sequence has {n_frames} frames"
                    )
                out: list[set[int]] = [set() for _ in range(n_frames)]
                for k, r in zip(keys, rows):
                    i = k - base
                    vals = [int(t) - base for t in (r[pos_col] or "").split()]
                    if any(not 0 <= v < n_frames for v in vals):
                        raise GroundTruthError(
                            f"ground truth {path}: frame {k} names a positive outside 0..{n_frames - 1 + base}"
                        )
                    out[i] = {v for v in vals if v < i}
                return out
            if "x" in rows[0] and "y" in rows[0]:
                if radius is None:
                    raise GroundTruthError(
                        f"ground truth {path} holds positions: give a distance threshold (--gt-radius)"
                    )
                if len(rows) != n_frames:
                    raise GroundTruthError(
                        f"ground truth {path} has {len(rows)} positions but the sequence has {n_frames} frames"
                    )
                xyz = np.array([[float(r["x"]), float(r["y"]), float(r.get("z") or 0.0)] for r in rows])
                st = np.asarray(stamps_ns if stamps_ns is not None else np.arange(n_frames) * 1e9, dtype=np.float64)
                out = []
                for i in range(n_frames):
                    d = np.linalg.norm(xyz[:i] - xyz[i], axis=1)
                    old = (st[i] - st[:i]) / 1e9 >= min_gap_s
                    out.append(set(np.flatnonzero((d <= radius) & old).tolist()))
                return out
            raise GroundTruthError(f"ground truth {path}: CSV needs a 'positive...' column or x,y columns")
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, GroundTruthError):
            raise
        raise GroundTruthError(f"ground truth {path} cannot be read: {e}") from None
    raise GroundTruthError(f"ground truth {path}: use .npy, .bmp, .png or .csv")
