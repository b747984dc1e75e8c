"""Ground truth for place recognition and loop closure: one reader, explicit formats.

Two entry points read the same formats: :func:`load_ground_truth` for a query set
against a database (``pnv match``) and :func:`load_sequence_gt` for one sequence,
frame i against its earlier frames j < i (``pnv eval``). Nothing is guessed from
the values: a file that fits no reading below, or a token that names nothing, is a
:class:`GroundTruthError` that says which row / token and what to change.

Matrices (``.npy``, ``.bmp``, ``.png``)
  - image (8-bit, RTAB-Map's convention, as its own evaluation reads ``*_GT.bmp``):
    255 = loop, 0 = no loop, any other value (grey) = ignore;
  - ``.npy`` (never unpickled): 1 / True = loop, 0 / False = no loop, -1 or NaN =
    ignore; any other value is an error.
  - Shape (Q, DB) for these queries x database; or square (N, N) over a sequence
    numbered by its file names: G[i-1, j-1] is frame i against frame j, frames 1..N
    (RTAB-Map's ``samples_GT.bmp``); the names' file stems must then be numbers
    (``12``, ``12.jpg``, ``images/12.jpg``). For a sequence, (N, N) over the N frames
    in bag order.

CSV of positives: one row per query; exactly one ``positive...`` column, whose
tokens are space-separated. The header says how they read:
  - ``positive_names``: image names (bound as below);
  - ``positive_indices`` / ``positive_ref_indices`` / ``positive_db_indices``
    (any ``positive_*indices``): numbers, see *numbering*;
  - a bare ``positives``: ``positives_as="names"|"indices"`` (``--gt-positives``);
    without it, only when exactly one of the two readings fits every token.
  The query is named by a ``query_file`` / ``query_name`` / ``name`` / ``file``
  column (bound as below), else by ``query_index`` (or the first column).
  *Numbering* of indices, 0-based or not, is stated, never inferred from the range:
  ``index_base`` (``--gt-index-base 0|1``) when given; else, when a ``*_file``
  column pairs every row's ``query_index`` with the same number in its file name
  (``1,images/1.jpg``: RTAB-Map's ``gt.csv``, 1..84; ``0,query/0000000.jpg``:
  VPR-Bench corridor's, 0..110), the indices are those file numbers: a positive k is
  the image whose file stem is the number k; else indices count from 0 (positions in
  the database list / frames in bag order). A file-number positive of an image that is
  listed in the file but absent from this database is left out; one that names no
  image at all is an error.

CSV of positions: ``name,x,y[,z]``, with a radius: a database image is positive
when it lies within the radius of the query (sequences: of frame i, at least
``min_gap_s`` older; rows in frame order).

Name binding (feature-set names are file identities: ``ref/1.jpg``; older sets
hold stems: ``1``): a token binds to the identity equal to it; else to the identity
that is the token plus a suffix; else to the one identity with the same file stem
or whose path ends with the token's (or the token's with the identity's). A token
matching several identities is an error ("ambiguous: 1 names ref/1.jpg and
query/1.jpg"), as is an unknown positive token.

Ignore: a loop reported into an ignored image counts as neither a true nor a false
positive; a query whose only marked images are ignored has no positive.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from pnv_ros.errors import GroundTruthError

#: value of an ignored cell in a .npy matrix (NaN too)
NPY_IGNORE = -1
POSITIVES_AS = ("names", "indices")


class GroundTruth:
    """Positives per query, as sets of database indices; ``ignore``: the database
    indices that count neither way for that query."""

    def __init__(self, positives: Sequence[set[int]], ignore: Sequence[set[int]] | None = None):
        self.positives = [set(p) for p in positives]
        self.ignore = [set(s) for s in ignore] if ignore is not None else [set() for _ in self.positives]
        for p, s in zip(self.positives, self.ignore):
            s -= p

    def __len__(self) -> int:
        return len(self.positives)

    def has_positive(self) -> np.ndarray:
        """(Q,) bool: queries with at least one positive."""
        return np.array([bool(p) for p in self.positives])


class SequenceGT(list):
    """Loop-closure ground truth of a sequence: ``gt[i]`` is the set of earlier frames
    j < i that frame i closes a loop with; ``gt.ignore[i]`` the earlier frames that
    count neither way. A list, so it compares equal to a plain list of sets."""

    def __init__(self, positives: Sequence[set[int]], ignore: Sequence[set[int]] | None = None):
        super().__init__(set(p) for p in positives)
        self.ignore = [set(s) - p for s, p in zip(ignore, self)] if ignore is not None else [set() for _ in self]


# -- names ---------------------------------------------------------------------------------------


def _parts(name: str) -> tuple[str, ...]:
    return PurePosixPath(name.replace("\\", "/")).parts


def _stem(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).stem


def _no_suffix(name: str) -> str:
    p = PurePosixPath(name.replace("\\", "/"))
    return str(p.with_suffix("")) if p.suffix else str(p)


def _number(name: str) -> int | None:
    s = _stem(name)
    return int(s) if s.isdecimal() else None


class _Names:
    """Binds tokens of a GT file to image identities (see the module doc)."""

    def __init__(self, names: Sequence[str], what: str, path: Path):
        self.names, self.what, self.path = list(names), what, path
        self.exact = {n: i for i, n in enumerate(self.names)}
        self.plain: dict[str, list[int]] = {}
        self.by_number: dict[int, list[int]] = {}
        self.near: dict[str, list[int]] = {}  # by file stem and by last path component
        for i, n in enumerate(self.names):
            self.plain.setdefault(_no_suffix(n), []).append(i)
            for key in {_stem(n), (_parts(n) or ("",))[-1]}:
                self.near.setdefault(key, []).append(i)
            k = _number(n)
            if k is not None:
                self.by_number.setdefault(k, []).append(i)

    def _one(self, token: str, hits: list[int]) -> int:
        if len(hits) > 1:
            raise GroundTruthError(
                f"ground truth {self.path}: ambiguous: {token} names "
                + " and ".join(self.names[i] for i in hits[:4])
                + f" ({self.what}); write the name in full (e.g. {self.names[hits[0]]})"
            )
        return hits[0]

    def bind(self, token: str) -> int | None:
        """The index of the identity ``token`` names, None when it names none."""
        if token in self.exact:
            return self.exact[token]
        if token in self.plain:
            return self._one(token, self.plain[token])
        tp, ts = _parts(token) or ("",), _stem(token)
        near = sorted(set(self.near.get(ts, [])) | set(self.near.get(tp[-1], [])))
        hits = [
            i
            for i in near
            if _stem(n := self.names[i]) == ts
            or (len(np_ := _parts(n)) >= len(tp) and np_[-len(tp) :] == tp)
            or (len(tp) >= len(np_) and tp[-len(np_) :] == np_)
        ]
        return self._one(token, hits) if hits else None

    def number(self, k: int, token: str) -> int | None:
        """The identity whose file stem is the number k."""
        hits = self.by_number.get(k, [])
        return self._one(token, hits) if hits else None


# -- matrices ------------------------------------------------------------------------------------


def _read_matrix(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(loop, ignore) bool matrices from .npy (never unpickled) or an 8-bit image."""
    if path.suffix.lower() == ".npy":
        try:
            m = np.load(path, allow_pickle=False)
        except ValueError:
            raise GroundTruthError(
                f"ground truth {path} holds Python objects (pickle), which are never loaded: "
                f"give a 0/1 matrix or a CSV of positives"
            ) from None
        if m.ndim != 2:
            raise GroundTruthError(f"ground truth {path}: matrix of shape {m.shape} is not 2-D (rows x columns)")
        if m.dtype == bool:
            return m, np.zeros_like(m)
        if m.dtype.kind not in "iuf":
            raise GroundTruthError(f"ground truth {path}: a matrix of {m.dtype} (use 0/1, -1 or NaN = ignore)")
        f = m.astype(np.float64)
        loop, ignore = f == 1, np.isnan(f) | (f == NPY_IGNORE)
        bad = ~(loop | ignore | (f == 0))
        if bad.any():
            at = tuple(int(x) for x in np.argwhere(bad)[0])
            raise GroundTruthError(
                f"ground truth {path}: value {m[at]} at row {at[0]}, column {at[1]}: a .npy matrix holds "
                f"1 (loop), 0 (no loop) or {NPY_IGNORE} / NaN (ignore) ({int(bad.sum())} cells hold other values)"
            )
        return loop, ignore
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("L"))
    if (a == 1).any() and not ((a != 0) & (a != 1)).any():
        raise GroundTruthError(
            f"ground truth {path}: an image holding only 0 and 1; in a GT image a loop is 255 (RTAB-Map's "
            f"convention: 0 = no loop, any grey = ignore), so its 1s would all be ignored: save it with loops "
            f"as 255, or as a .npy 0/1 matrix"
        )
    return a == 255, (a != 0) & (a != 255)  # RTAB-Map: 255 loop, 0 none, grey ignore


def _matrix(path: Path, qn: Sequence[str], dbn: Sequence[str]) -> GroundTruth:
    loop, ign = _read_matrix(path)
    if loop.ndim != 2:
        raise GroundTruthError(f"ground truth {path}: matrix of shape {loop.shape} is not 2-D")

    def rows(r: np.ndarray, c: np.ndarray) -> GroundTruth:
        return GroundTruth([set(np.flatnonzero(x).tolist()) for x in r], [set(np.flatnonzero(x).tolist()) for x in c])

    if loop.shape == (len(qn), len(dbn)):
        if not loop.any():
            raise _no_positive(path, f"for these {len(qn)} queries")
        return rows(loop, ign)
    numbers = [_number(n) for n in list(qn) + list(dbn)]
    if loop.shape[0] == loop.shape[1] and all(k is not None for k in numbers):
        nmax = loop.shape[0]
        if min(numbers) < 1 or max(numbers) > nmax:
            raise GroundTruthError(
                f"ground truth {path}: {nmax}x{nmax} sequence matrix, but frame numbers run "
                f"{min(numbers)}..{max(numbers)}: the names do not fit it"
            )
        qi = np.array(numbers[: len(qn)]) - 1
        cols = np.array(numbers[len(qn) :]) - 1
        if not loop[np.ix_(qi, cols)].any():
            raise _no_positive(path, f"between these {len(qn)} queries and {len(dbn)} database frames")
        return rows(loop[np.ix_(qi, cols)], ign[np.ix_(qi, cols)])
    raise GroundTruthError(
        f"ground truth {path}: matrix of shape {loop.shape} does not fit {len(qn)} queries x {len(dbn)} "
        f"database images (give a (Q, DB) matrix, or a square one indexed by frame-number names)"
    )


# -- CSV of positives ----------------------------------------------------------------------------


class _PositivesCSV:
    """The explicit reading of a positives CSV (see the module doc)."""

    def __init__(self, rows: list[dict[str, str]], path: Path, positives_as: str | None, index_base: int | None):
        self.rows, self.path = rows, path
        header = list(rows[0])
        pcols = [c for c in header if c.lower().startswith("positive")]
        if len(pcols) != 1:
            raise GroundTruthError(f"ground truth {path}: several positive columns {pcols}: keep one")
        self.pos_col = pcols[0]
        low = self.pos_col.lower()
        if positives_as is not None and positives_as not in POSITIVES_AS:
            raise GroundTruthError(f"positives_as {positives_as!r}: use names or indices")
        if low == "positive_names":
            stated = "names"
        elif low.startswith("positive_") and low.endswith("indices"):
            stated = "indices"
        elif low == "positives":
            stated = None
        else:
            raise GroundTruthError(
                f"ground truth {path}: column {self.pos_col!r}: name it positive_names, positive_indices "
                f"or positives (with --gt-positives names|indices)"
            )
        if stated and positives_as and stated != positives_as:
            raise GroundTruthError(
                f"ground truth {path}: its column {self.pos_col!r} says {stated}, but {positives_as} was asked for"
            )
        self.reading = stated or positives_as  # None: decide by the tokens (exactly one reading must fit)
        low_header = {c.lower(): c for c in header}
        self.file_col = next(
            (low_header[c] for c in ("query_file", "query_name", "name", "file") if c in low_header),
            next((c for c in header if c.lower().endswith("_file")), None),
        )
        self.key_col = low_header.get("query_index", header[0] if header[0] != self.pos_col else None)
        if self.key_col == self.file_col:
            self.key_col = low_header.get("query_index")
        # numbering of indices: the option, else file numbers stated by the file column, else from 0
        self.file_numbers = False
        self.base_stated = index_base is not None
        if index_base is not None:
            if index_base not in (0, 1):
                raise GroundTruthError(f"index base {index_base}: use 0 or 1")
            self.base = index_base
        else:
            self.base = 0
            if self.key_col and self.file_col:
                self.file_numbers = all(
                    (r[self.key_col] or "").strip().isdecimal()
                    and _number((r[self.file_col] or "").strip()) == int(r[self.key_col])
                    for r in rows
                )

    def check_indices(self) -> None:
        """Indices with numbered files named by a file column but no query_index: are they positions (0-based)
        or file numbers? Neither is guessed."""
        if (
            self.base_stated
            or self.file_numbers
            or not self.file_col
            or (self.key_col and all((r[self.key_col] or "").strip().isdecimal() for r in self.rows))
        ):
            return
        if all(_number((r[self.file_col] or "").strip()) is not None for r in self.rows):
            raise GroundTruthError(
                f"ground truth {self.path}: index positives with numbered files ({self.file_col} "
                f"{(self.rows[0][self.file_col] or '').strip()}) and no query_index column: whether the indices "
                f"count from 0 or are the files' numbers is not said; give --gt-index-base 0|1 (or a "
                f"query_index column)"
            )

    def tokens(self, r: dict[str, str]) -> list[str]:
        return (r[self.pos_col] or "").split()

    def how(self) -> str:
        if self.file_numbers:
            return f"file numbers ({self.key_col} = the number in {self.file_col})"
        return f"{self.base}-based indices"

    def where(self, n: int) -> str:
        return f"row {n + 2}"  # the header is line 1


def _positives_csv(
    rows: list[dict[str, str]],
    path: Path,
    qn: Sequence[str],
    dbn: Sequence[str],
    positives_as: str | None,
    index_base: int | None,
) -> GroundTruth:
    c = _PositivesCSV(rows, path, positives_as, index_base)
    qnames, dbnames = _Names(qn, "queries", path), _Names(dbn, "database", path)
    listed = {int(r[c.key_col]) for r in rows if c.key_col and (r[c.key_col] or "").strip().isdecimal()}

    def as_index(t: str, n: int) -> tuple[int | None, str | None]:
        """(database index or None when left out, error text or None)."""
        if not t.lstrip("-").isdecimal():
            return None, f"{t!r} is not a number"
        k = int(t)
        if c.file_numbers:
            i = dbnames.number(k, t)
            if i is None and k not in listed:
                return None, f"{t!r} is the number of no database image nor of a row"
            return i, None
        if not 0 <= k - c.base < len(dbn):
            return None, f"{t!r} is outside {c.base}..{len(dbn) - 1 + c.base} ({c.how()})"
        return k - c.base, None

    def as_name(t: str, n: int) -> tuple[int | None, str | None]:
        i = dbnames.bind(t)
        return (i, None) if i is not None else (None, f"{t!r} names no database image")

    readings = {"names": as_name, "indices": as_index}
    reading = c.reading
    if reading is None:  # a bare column: exactly one reading must fit every token
        fits = []
        for name, fn in readings.items():
            try:
                ok = all(fn(t, n)[1] is None for n, r in enumerate(rows) for t in c.tokens(r))
            except GroundTruthError:
                ok = False
            if ok:
                fits.append(name)
        if len(fits) != 1:
            raise GroundTruthError(
                f"ground truth {path}: column {c.pos_col!r} "
                + ("reads both as names and as indices" if fits else "reads neither as names nor as indices")
                + f": say which with --gt-positives names|indices (or name the column positive_names / "
                f"positive_indices); indices: {c.how()}"
            )
        reading = fits[0]
    if reading == "indices":
        c.check_indices()
    fn = readings[reading]
    out: list[set[int]] = [set() for _ in qn]
    seen = 0
    for n, r in enumerate(rows):
        if c.file_col:
            qi = qnames.bind((r[c.file_col] or "").strip())
        else:
            key = (r[c.key_col] if c.key_col else "").strip()
            if not key.isdecimal() or not 0 <= int(key) - c.base < len(qn):
                raise GroundTruthError(
                    f"ground truth {path}: {c.where(n)}, query {c.key_col} {key!r} is not one of the {len(qn)} "
                    f"queries ({c.base}-based; --gt-index-base 0|1 says how indices count, or add a query_file column)"
                )
            qi = int(key) - c.base
        if qi is None:
            continue  # a query not in this run
        seen += 1
        for t in c.tokens(r):
            i, err = fn(t, n)
            if err:
                raise GroundTruthError(
                    f"ground truth {path}: {c.where(n)}, positive {err}; the column {c.pos_col!r} is read as "
                    f"{reading if reading == 'names' else c.how()}"
                    + ("" if reading == "names" else " (--gt-index-base 0|1 says how indices count)")
                )
            if i is not None:
                out[qi].add(i)
    if seen == 0:
        raise GroundTruthError(f"ground truth {path}: none of its {len(rows)} rows names one of the {len(qn)} queries")
    if not any(out):
        raise _no_positive(path, f"for these {len(qn)} queries")
    return GroundTruth(out)


def _positions_csv(
    rows: list[dict[str, str]], path: Path, qn: Sequence[str], dbn: Sequence[str], radius: float
) -> GroundTruth:
    cols = [c for c in ("x", "y", "z") if c in rows[0]]
    ids = list(dict.fromkeys(list(qn) + list(dbn)))
    names = _Names(ids, "images", path)
    pos: dict[str, np.ndarray] = {}
    for n, r in enumerate(rows):
        i = names.bind(r["name"].strip())
        if i is not None:
            pos[ids[i]] = _position(r, cols, path, n)
    missing = [n for n in ids if n not in pos]
    if missing:
        raise GroundTruthError(f"ground truth {path}: no position for image(s) {missing[:5]}")
    db = np.stack([pos[n] for n in dbn])
    out = [set(np.flatnonzero(np.linalg.norm(db - pos[q], axis=1) <= radius).tolist()) for q in qn]
    if not any(out):
        raise _no_positive(path, f"within {radius:g} of any query", "a larger --gt-radius?")
    return GroundTruth(out)


def _position(r: dict[str, str], cols: list[str], path: Path, n: int) -> np.ndarray:
    """One row's finite coordinates, or GroundTruthError naming the row (a NaN would silently match nothing)."""
    try:
        v = np.array([float((r[c] or "").strip()) for c in cols])
    except ValueError:
        v = np.array([np.nan])
    if not np.isfinite(v).all():
        raise GroundTruthError(
            f"ground truth {path}: row {n + 2}: position {[r[c] for c in cols]} is not {len(cols)} finite numbers"
        )
    return v


def _no_positive(path: Path, where: str, hint: str = "") -> GroundTruthError:
    return GroundTruthError(
        f"ground truth {path} marks no loop {where}: every recall would be undefined" + (f"; {hint}" if hint else "")
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise GroundTruthError(f"ground truth {path} has no rows")
    return rows


def _is_positives(rows: list[dict[str, str]]) -> bool:
    return any(c.lower().startswith("positive") for c in rows[0])


def load_ground_truth(
    path: str | Path,
    query_names: Sequence[str],
    db_names: Sequence[str],
    radius: float | None = None,
    *,
    positives_as: str | None = None,
    index_base: int | None = None,
) -> GroundTruth:
    """Read ground truth for these queries and database (see the module doc).

    positives_as: ``names`` or ``indices`` for a bare ``positives`` column;
    index_base: 0 or 1, how index tokens count (else as the file states, else 0)."""
    path = Path(path)
    if not path.is_file():
        raise GroundTruthError(f"ground truth file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".npy", ".bmp", ".png"):
            return _matrix(path, query_names, db_names)
        if suffix == ".csv":
            rows = _read_csv(path)
            if _is_positives(rows):
                return _positives_csv(rows, path, query_names, db_names, positives_as, index_base)
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
    a query counts at N when any of its top N is a positive). Ignored database
    images are passed over: they take no place in the top N."""
    if len(predictions) != len(gt):
        raise GroundTruthError(f"{len(predictions)} queries predicted but ground truth has {len(gt)}")
    mask = gt.has_positive()
    total = int(mask.sum())
    ranked = [[int(p) for p in pred if int(p) not in ign] for pred, ign in zip(predictions, gt.ignore)]
    out = {}
    for n in n_values:
        hits = sum(1 for pred, pos, m in zip(ranked, gt.positives, mask) if m and any(p in pos for p in pred[:n]))
        out[int(n)] = hits / total if total else float("nan")
    return out


def _sequence_csv(
    rows: list[dict[str, str]], path: Path, n_frames: int, positives_as: str | None, index_base: int | None
) -> SequenceGT:
    c = _PositivesCSV(rows, path, positives_as, index_base)
    if len(rows) != n_frames:
        raise GroundTruthError(f"ground truth {path} has {len(rows)} rows but the sequence has {n_frames} frames")
    # each row's frame (bag order): from its index column, else the row order
    if c.key_col and all((r[c.key_col] or "").strip().isdecimal() for r in rows):
        keys = [int(r[c.key_col]) for r in rows]
        first = min(keys) if c.file_numbers else c.base
        frames = [k - first for k in keys]
        bad = next((n for n, f in enumerate(frames) if not 0 <= f < n_frames), None)
        if bad is not None:
            raise GroundTruthError(
                f"ground truth {path}: {c.where(bad)}, {c.key_col} {keys[bad]} is outside "
                f"{first}..{n_frames - 1 + first} ({c.how()}, {n_frames} frames); say how indices count "
                f"with --gt-index-base 0|1"
            )
        if len(set(frames)) != n_frames:
            raise GroundTruthError(f"ground truth {path}: {c.key_col} names some frames twice")
    else:
        keys, first, frames = list(range(n_frames)), c.base, list(range(n_frames))  # rows in frame order
    names = _Names([(r[c.file_col] or "").strip() for r in rows], "frames", path) if c.file_col else None

    def as_index(t: str) -> int | None:
        return int(t) - first if t.lstrip("-").isdecimal() and 0 <= int(t) - first < n_frames else None

    def as_name(t: str) -> int | None:
        if names is None:
            raise GroundTruthError(f"ground truth {path}: names as positives need a query_file column naming each row")
        i = names.bind(t)
        return frames[i] if i is not None else None

    readings = {"names": as_name, "indices": as_index}
    reading = c.reading
    if reading is None:
        fits = [k for k, fn in readings.items() if _all_fit(fn, rows, c)]
        if len(fits) != 1:
            raise GroundTruthError(
                f"ground truth {path}: column {c.pos_col!r} "
                + ("reads both as names and as indices" if fits else "reads neither as names nor as indices")
                + f": say which with --gt-positives names|indices; indices: {c.how()}"
            )
        reading = fits[0]
    if reading == "indices":
        c.check_indices()
    out: list[set[int]] = [set() for _ in range(n_frames)]
    for n, (f, r) in enumerate(zip(frames, rows)):
        vals = []
        for t in c.tokens(r):
            v = readings[reading](t)
            if v is None:
                raise GroundTruthError(
                    f"ground truth {path}: {c.where(n)}, positive {t!r} names no frame of the {n_frames} "
                    + ("(names of the query_file column)" if reading == "names" else f"({c.how()})")
                    + "; --gt-positives names|indices and --gt-index-base 0|1 say how to read it"
                )
            vals.append(v)
        out[f] = {v for v in vals if v < f}
    if not any(out):
        raise _no_positive(path, "between a frame and an earlier one")
    return SequenceGT(out)


def _all_fit(fn, rows: list[dict[str, str]], c: _PositivesCSV) -> bool:
    try:
        return all(fn(t) is not None for r in rows for t in c.tokens(r))
    except GroundTruthError:
        return False


def load_sequence_gt(
    path: str | Path,
    n_frames: int,
    *,
    stamps_ns: Sequence[int] | None = None,
    radius: float | None = None,
    min_gap_s: float = 0.0,
    positives_as: str | None = None,
    index_base: int | None = None,
) -> SequenceGT:
    """Loop-closure ground truth of one sequence: for each frame i, the earlier
    frames j < i it closes a loop with (0-based frame order in the bag), and the
    earlier frames to ignore (``.ignore``).

    - a square matrix (.npy/.bmp/.png) G[i, j] over all frames (ignore cells as in the module doc);
    - a CSV of positives, one row per frame (numbering stated as in the module doc);
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
            loop, ign = _read_matrix(path)
            if loop.ndim != 2 or loop.shape != (n_frames, n_frames):
                raise GroundTruthError(
                    f"ground truth {path} is a {loop.shape} matrix but the sequence has {n_frames} frames: "
                    f"give an {n_frames}x{n_frames} matrix"
                )
            if not np.tril(loop, -1).any():
                upper = int(np.triu(loop, 1).sum())
                raise _no_positive(
                    path,
                    "between a frame and an earlier one (below the diagonal)",
                    f"its {upper} loops lie above it: G[i, j] is frame i against earlier frame j; transpose it"
                    if upper
                    else "",
                )
            return SequenceGT(
                [set(np.flatnonzero(loop[i, :i]).tolist()) for i in range(n_frames)],
                [set(np.flatnonzero(ign[i, :i]).tolist()) for i in range(n_frames)],
            )
        if suffix == ".csv":
            rows = _read_csv(path)
            if _is_positives(rows):
                return _sequence_csv(rows, path, n_frames, positives_as, index_base)
            if "x" in rows[0] and "y" in rows[0]:
                if radius is None:
                    raise GroundTruthError(
                        f"ground truth {path} holds positions: give a distance threshold (--gt-radius)"
                    )
                if len(rows) != n_frames:
                    raise GroundTruthError(
                        f"ground truth {path} has {len(rows)} positions but the sequence has {n_frames} frames"
                    )
                cols = [c for c in ("x", "y", "z") if c in rows[0]]
                xyz = np.array([_position(r, cols, path, n) for n, r in enumerate(rows)])
                st = np.asarray(stamps_ns if stamps_ns is not None else np.arange(n_frames) * 1e9, dtype=np.float64)
                out = []
                for i in range(n_frames):
                    d = np.linalg.norm(xyz[:i] - xyz[i], axis=1)
                    old = (st[i] - st[:i]) / 1e9 >= min_gap_s
                    out.append(set(np.flatnonzero((d <= radius) & old).tolist()))
                if not any(out):
                    raise _no_positive(path, f"within {radius:g} of an earlier frame", "a larger --gt-radius?")
                return SequenceGT(out)
            raise GroundTruthError(f"ground truth {path}: CSV needs a 'positive...' column or x,y columns")
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, GroundTruthError):
            raise
        raise GroundTruthError(f"ground truth {path} cannot be read: {e}") from None
    raise GroundTruthError(f"ground truth {path}: use .npy, .bmp, .png or .csv")
