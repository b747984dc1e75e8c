"""Training data for NetVLAD triplet training: which images show the same place, and which must never be negatives.

NetVLAD (Arandjelović et al., CVPR 2016) and Patch-NetVLAD (Hausler et al., CVPR 2021) train on triplets: a
query, one of its *positives* (a database image of the same place) and *negatives* mined among the database
images that are surely another place. Every loader here returns a :class:`TrainingSet`: the images (each once),
the database and query sides as indices into them, and per query its positives and its *non-negatives* (the
database images never to be drawn as negatives: the positives, images a little too far to be positives but too
close to be safely another place, images close in time, ground-truth cells marked "ignore"). Queries without
any positive cannot form a triplet: loaders leave them out and count them in ``TrainingSet.dropped``.
:meth:`TrainingSet.split` cuts a set into training and validation with disjoint places. Nothing here needs torch.

Distances are in metres. The rule for position-based layouts is the authors' (MSLS, Pittsburgh): a database
image within ``pos_radius`` (default 10 m) of the query is a positive; one within ``neg_radius`` (default 25 m)
is a non-negative; ``neg_radius < pos_radius`` is a ConfigError.

Layouts
-------
**Pairs** (:func:`from_pairs`): two traversals of the same route, a reference folder (the database) and a
query folder, and a ground-truth file in any format of :mod:`pnv_ros.eval.ground_truth` (a (Q, DB) or
frame-numbered matrix ``.npy`` / ``.bmp`` / ``.png``, a CSV of positives, or a positions CSV ``name,x,y[,z]``
covering both folders)::

    corridor/ref/0000000.jpg ...   corridor/query/0000000.jpg ...   corridor/gt.csv

Images are named as ``pnv extract ref/ query/`` names them (``ref/0000000.jpg``, ``query/0000000.jpg``),
which is what the ground truth's names bind to. With a matrix or a positives CSV, the non-negatives of a query
are its positives, its ignored cells and a band of ``neg_margin`` (default 1) reference images on either side of
each positive, in the reference folder's frame order: neighbours of a positive look alike and hand-made ground
truth is rarely exact at its edges, so they make poor negatives. With a positions CSV the radii apply instead.

**Positions** (:func:`from_positions`): one image sequence (a folder, frame order = file-name order as
:func:`pnv_ros.images.list_images` sorts it) and a CSV ``name,x,y[,z]`` in metres, one row per frame (``name``:
the file name or its stem, as ``pnv_ros.bags.read_poses`` reads poses; rows for other files are ignored)::

    name,x,y
    0000.jpg,0.0,0.0
    0001.jpg,0.9,0.1

Every frame is both a query and a database image. Loop-closure ground truth: frame j is a positive of frame i
when it lies within ``pos_radius`` of it *and* at least ``min_gap`` (default 10) frames away, since frames a few
moments apart are the same pass, not a revisit; the non-negatives of i are the frames within ``neg_radius`` and
the frames fewer than ``min_gap`` away (i itself included).

**Bag** (:func:`from_bag`): a ROS 1 / ROS 2 bag with one image topic (``topic`` picks one of several) and
nav_msgs/Odometry. A frame's position is the odometry within 0.1 s of its stamp (``BagReader.frames``);
frames without one, and frames that cannot be decoded, are left out (counted in ``source``). The rule is the
positions layout's, with the bag's frame numbers; ``min_gap_s`` also treats frames closer than that many
seconds (header stamps) as the same pass, which suits bags recorded at a high frame rate better than a frame
count. The images are read from the bag when iterated (:class:`BagImages`), never held in memory.

**MSLS** (:func:`from_msls`): Mapillary Street-Level Sequences as the authors' ``msls.py`` reads its training
cities::

    ROOT/train_val/<city>/query/postprocessed.csv      ,key,easting,northing,... (UTM, metres)
    ROOT/train_val/<city>/query/raw.csv                ,key,lon,lat,ca,captured_at,pano (optional)
    ROOT/train_val/<city>/query/images/<key>.jpg
    ROOT/train_val/<city>/database/...                 the same three

Panoramas (``pano`` True in raw.csv) are left out, as the authors do by default; without raw.csv nothing is.
Positives and non-negatives are found within a city (cities lie in different UTM zones). ``cities=None`` takes
every city folder under train_val (the authors' validation cities ``cph`` and ``sf`` included: use
:meth:`TrainingSet.split` or name the cities). The test cities carry no positions and cannot be used.

**Pittsburgh** (:func:`from_pittsburgh`): NetVLAD's Pitts30k / Pitts250k layout::

    ROOT/datasets/pitts30k_train.mat     struct dbStruct: whichSet, dbImageFns, utmDb (2 x DB), qImageFns,
                                         utmQ (2 x Q), numImages, numQueries, posDistThr, posDistSqThr,
                                         nonTrivPosDistSqThr
    ROOT/<dbImageFns entry>              database images (e.g. ROOT/000/000000_pitch1_yaw1.jpg)
    ROOT/queries_real/<qImageFns entry>  query images

As NetVLAD's training code does, positives lie within ``sqrt(nonTrivPosDistSqThr)`` (10 m) and non-negatives
within ``posDistThr`` (25 m), unless radii are given.

:func:`load_training_set` takes any one of these layouts by keyword (the ``pnv train`` options).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pnv_ros.errors import ConfigError, GroundTruthError, ImageError, PnvError
from pnv_ros.images import ImageSource, list_images

#: Default radii in metres (the authors' MSLS training: posDistThr 10, negDistThr 25; Pittsburgh's too).
POS_RADIUS = 10.0
NEG_RADIUS = 25.0
#: Default frames between a sequence frame and a positive of it (positions and bag layouts).
MIN_GAP = 10
#: Default band, in reference images, around each positive of a pairs layout that is never a negative.
NEG_MARGIN = 1
#: Fewest frames with a position a bag must keep.
MIN_BAG_FRAMES = 10
#: Default validation share of :meth:`TrainingSet.split`.
HOLDOUT = 0.2
PITTS_SPLIT = "pitts30k_train"
#: Frames whose odometry is further than this from their stamp have no position (``BagReader.frames``).
ODOM_TOLERANCE_S = 0.1

_FORMS = (
    "pairs=(REF_DIR, QUERY_DIR) with gt=FILE; images=DIR with positions=CSV; bag=BAG (topic= optional); "
    "msls=ROOT; pittsburgh=ROOT"
)


def _ints(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.int64).reshape(-1)


@dataclass
class TrainingSet:
    """Images and their place relations for triplet training.

    images: every image once (paths or arrays; for a bag a lazy :class:`BagImages`, iterated in order).
    db: (D,) int64, indices into ``images`` of the database side.
    queries: (Q,) int64, indices into ``images`` of the queries (each with at least one positive when made by a
        loader).
    positives: Q arrays of int64 image indices (a subset of ``db``): the same place as the query.
    non_negatives: Q arrays of int64 image indices (a subset of ``db``, a superset of the positives): never
        drawn as negatives (near the query, close in time, ignored in the ground truth).
    name: a human-readable description of the source.
    source: a JSON-able description (kind, paths, radii, counts) for a model's metadata.
    dropped: queries left out: without any positive (by the loader), or cut by :meth:`split`.
    """

    images: Sequence[ImageSource]
    db: np.ndarray
    queries: np.ndarray
    positives: list[np.ndarray]
    non_negatives: list[np.ndarray]
    name: str
    source: dict[str, Any]
    dropped: int = 0

    def __post_init__(self) -> None:
        self.db, self.queries = _ints(self.db), _ints(self.queries)
        self.positives = [_ints(p) for p in self.positives]
        self.non_negatives = [_ints(n) for n in self.non_negatives]
        if not len(self.queries) == len(self.positives) == len(self.non_negatives):
            raise ConfigError(
                f"training set {self.name}: {len(self.queries)} queries but {len(self.positives)} positive and "
                f"{len(self.non_negatives)} non-negative lists: give one of each per query"
            )

    def split(self, holdout: float = HOLDOUT, gap: int = 0) -> tuple[TrainingSet, TrainingSet]:
        """(train, validation) with disjoint places.

        The validation queries are the last ``holdout`` share of the queries (in query order, at least one);
        the validation set keeps the full database. Every image that is a validation query, or a positive or a
        non-negative of one, is a *validation place*: the training set drops it from its database, positives
        and non-negatives, and drops training queries that are such an image (a sequence's frames are queries
        and database images at once); ``gap`` more queries before the validation ones go to neither side.
        Training queries left without a positive are dropped too (all counted in ``train.dropped``).
        ConfigError when either side would have no query with a positive.
        """
        q = len(self.queries)
        if not 0.0 < holdout < 1.0:
            raise ConfigError(f"holdout {holdout}: the validation share of the queries is between 0 and 1 (e.g. 0.2)")
        if gap < 0:
            raise ConfigError(f"gap {gap}: the queries left out between training and validation cannot be negative")
        n_val = max(1, round(holdout * q))
        n_train = q - n_val - gap
        if n_train <= 0:
            raise ConfigError(
                f"training set {self.name}: its {q} queries cannot be split with holdout {holdout:g} and gap {gap} "
                f"({n_val} validation queries leave none for training): use more data or a smaller holdout / gap"
            )
        val = range(q - n_val, q)
        if not any(len(self.positives[k]) for k in val):
            raise ConfigError(f"training set {self.name}: no validation query has a positive: use a larger holdout")
        size = int(max(self.db.max(initial=-1), self.queries.max(initial=-1))) + 1
        taken = np.zeros(size, dtype=bool)  # validation places
        taken[self.queries[q - n_val :]] = True
        for k in val:
            taken[self.positives[k]] = True
            taken[self.non_negatives[k]] = True
        tq, tp, tn = [], [], []
        for k in range(n_train):
            p = self.positives[k][~taken[self.positives[k]]]
            if taken[self.queries[k]] or not len(p):
                continue
            tq.append(self.queries[k])
            tp.append(p)
            tn.append(self.non_negatives[k][~taken[self.non_negatives[k]]])
        if not tq:
            raise ConfigError(
                f"training set {self.name}: once the validation places (the last {n_val} queries, their positives "
                f"and non-negatives) are taken out, no training query keeps a positive: the validation queries "
                f"cover every place; use a smaller holdout, a smaller --min-gap (in a sequence, frames that close to a "
                f"validation query are validation places too) or data with more places"
            )
        info = {"holdout": holdout, "gap": gap, "validation_queries": n_val, "db_taken_out": int(taken[self.db].sum())}
        train = TrainingSet(
            self.images,
            self.db[~taken[self.db]],
            _ints(tq),
            tp,
            tn,
            f"{self.name} (training)",
            {**self.source, "split": {"side": "train", **info}},
            self.dropped + n_train + gap - len(tq),
        )
        keep = [k for k in val if len(self.positives[k])]
        valid = TrainingSet(
            self.images,
            self.db,
            self.queries[keep],
            [self.positives[k] for k in keep],
            [self.non_negatives[k] for k in keep],
            f"{self.name} (validation)",
            {**self.source, "split": {"side": "validation", **info}},
            n_val - len(keep),
        )
        return train, valid


def _assemble(
    images: Sequence[ImageSource],
    db: np.ndarray,
    candidates: np.ndarray,
    positives: list[np.ndarray],
    non_negatives: list[np.ndarray],
    name: str,
    source: dict[str, Any],
    nothing: Callable[[], PnvError],
) -> TrainingSet:
    """A TrainingSet of the candidates that have a positive (non-negatives made to include the positives);
    ``nothing()`` is raised when none has."""
    keep = [k for k, p in enumerate(positives) if len(p)]
    if not keep:
        raise nothing()
    pos = [np.unique(_ints(positives[k])) for k in keep]
    nn = [np.union1d(_ints(non_negatives[k]), p) for k, p in zip(keep, pos)]
    dropped = len(candidates) - len(keep)
    source = {**source, "images": len(images), "db": len(db), "queries": len(keep), "dropped": dropped}
    return TrainingSet(images, db, _ints(candidates)[keep], pos, nn, name, source, dropped)


def _check_rule(pos_radius: float, neg_radius: float, min_gap: int | None = None) -> None:
    if not pos_radius > 0 or not math.isfinite(pos_radius):
        raise ConfigError(f"pos_radius {pos_radius}: the positive radius is a positive number of metres (e.g. 10)")
    if not neg_radius >= pos_radius or not math.isfinite(neg_radius):
        raise ConfigError(
            f"neg_radius {neg_radius} is smaller than pos_radius {pos_radius}: images within the negative radius "
            f"are never negatives, so it must be at least the positive radius (the authors use 10 and 25 m)"
        )
    if min_gap is not None and (int(min_gap) != min_gap or min_gap < 1):
        raise ConfigError(f"min_gap {min_gap}: the frames between a frame and its positives is a whole number >= 1")


def _list(folder: str | Path, what: str) -> list[Path]:
    try:
        return list_images([folder])
    except ImageError as e:
        raise ConfigError(f"{what} images: {e}") from None


def _identities(paths: Sequence[Path]) -> list[str]:
    """Names as ``pnv extract`` gives them: each path relative to the deepest folder holding them all."""
    absolute = [os.path.abspath(p) for p in paths]
    base = os.path.commonpath([os.path.dirname(a) for a in absolute])
    names = [Path(os.path.relpath(a, base)).as_posix() for a in absolute]
    if len(set(names)) != len(names):
        raise ConfigError("the same image is in the reference and the query folder: give two different folders")
    return names


# -- pairs -----------------------------------------------------------------------------------------------


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []  # load_ground_truth says what is wrong


def from_pairs(
    ref_dir: str | Path,
    query_dir: str | Path,
    gt_path: str | Path,
    *,
    pos_radius: float = POS_RADIUS,
    neg_radius: float = NEG_RADIUS,
    neg_margin: int = NEG_MARGIN,
    positives_as: str | None = None,
    index_base: int | None = None,
) -> TrainingSet:
    """Two traversals (see the module doc): images = reference then query images; db = the reference images.

    gt_path: any ground truth :func:`pnv_ros.eval.ground_truth.load_ground_truth` reads (``positives_as`` /
    ``index_base`` as there). The radii (metres) apply to a positions CSV only; ``neg_margin`` (reference images
    either side of a positive that are non-negatives) to matrices and positives CSVs only.
    ConfigError for a folder without images or bad options; GroundTruthError (naming the file) for ground truth
    that cannot be read or does not fit the folders.
    """
    from pnv_ros.eval.ground_truth import load_ground_truth

    ref, qry = _list(ref_dir, "reference"), _list(query_dir, "query")
    names = _identities(ref + qry)
    dbn, qn = names[: len(ref)], names[len(ref) :]
    gt_path = Path(gt_path)
    header = _csv_header(gt_path) if gt_path.suffix.lower() == ".csv" and gt_path.is_file() else []
    positions = {"name", "x"} <= set(header) and not any(c.lower().startswith("positive") for c in header)
    opts = {"positives_as": positives_as, "index_base": index_base}
    if positions:
        _check_rule(pos_radius, neg_radius)
        gt = load_ground_truth(gt_path, qn, dbn, pos_radius, **opts)
        near = load_ground_truth(gt_path, qn, dbn, neg_radius, **opts).positives
        rule: dict[str, Any] = {"gt_kind": "positions", "pos_radius": pos_radius, "neg_radius": neg_radius}
    else:
        if int(neg_margin) != neg_margin or neg_margin < 0:
            raise ConfigError(f"neg_margin {neg_margin}: the band around each positive is a whole number >= 0")
        gt = load_ground_truth(gt_path, qn, dbn, **opts)
        m = int(neg_margin)
        near = [{j for i in p for j in range(max(0, i - m), min(len(ref), i + m + 1))} for p in gt.positives]
        rule = {"gt_kind": "matrix" if gt_path.suffix.lower() != ".csv" else "positives", "neg_margin": m}
    offset = len(ref)
    positives = [np.array(sorted(p), dtype=np.int64) for p in gt.positives]
    non_neg = [np.array(sorted(a | b | c), dtype=np.int64) for a, b, c in zip(gt.positives, gt.ignore, near)]
    source = {"kind": "pairs", "ref": str(ref_dir), "query": str(query_dir), "gt": str(gt_path), **rule}
    name = f"pairs {ref_dir} + {query_dir} ({gt_path.name})"
    nothing = lambda: GroundTruthError(f"ground truth {gt_path} gives no query a positive")  # noqa: E731
    return _assemble(
        list(ref) + list(qry),
        np.arange(len(ref)),
        offset + np.arange(len(qry)),
        positives,
        non_neg,
        name,
        source,
        nothing,
    )


# -- sequences: positions CSV and bags -----------------------------------------------------------------------


def _sequence_rule(
    xyz: np.ndarray,
    frames: np.ndarray,
    pos_radius: float,
    neg_radius: float,
    min_gap: int,
    stamps_ns: np.ndarray | None = None,
    min_gap_s: float | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per frame (row of ``xyz``): positives and non-negatives, as row indices.

    frames: (N,) ascending frame numbers (gaps where frames were left out); stamps_ns: (N,) with min_gap_s."""
    from scipy.spatial import cKDTree

    tree = cKDTree(xyz)
    near_pos = tree.query_ball_point(xyz, pos_radius, return_sorted=True)
    near_neg = tree.query_ball_point(xyz, neg_radius, return_sorted=True)
    lo = np.searchsorted(frames, frames - min_gap, side="right")  # frames fewer than min_gap away: [lo, hi)
    hi = np.searchsorted(frames, frames + min_gap, side="left")
    order = sorted_stamps = None
    if stamps_ns is not None and min_gap_s:
        order = np.argsort(stamps_ns, kind="stable")
        sorted_stamps = stamps_ns[order]
        gap_ns = int(round(min_gap_s * 1e9))
    positives, non_neg = [], []
    for i in range(len(xyz)):
        close = np.arange(lo[i], hi[i])
        if order is not None and sorted_stamps is not None:
            a = np.searchsorted(sorted_stamps, stamps_ns[i] - gap_ns, side="right")
            b = np.searchsorted(sorted_stamps, stamps_ns[i] + gap_ns, side="left")
            close = np.union1d(close, order[a:b])
        positives.append(np.setdiff1d(_ints(near_pos[i]), close))
        non_neg.append(np.union1d(_ints(near_neg[i]), close))
    return positives, non_neg


def _read_positions(path: Path, paths: Sequence[Path]) -> np.ndarray:
    """(N, 3) positions of the frames ``paths`` from a ``name,x,y[,z]`` CSV; GroundTruthError naming the file."""
    if not path.is_file():
        raise GroundTruthError(f"positions file {path} does not exist")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [(c or "").strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise GroundTruthError(f"positions file {path} cannot be read: {e}") from None
    if not {"name", "x", "y"} <= set(header):
        raise GroundTruthError(f"positions file {path}: needs the columns name,x,y[,z] (metres), has {header}")
    if not rows:
        raise GroundTruthError(f"positions file {path} has no rows")
    rows = [{(k or "").strip(): v for k, v in r.items()} for r in rows]
    cols = ["x", "y", "z"] if "z" in header else ["x", "y"]
    by_name = {p.name: i for i, p in enumerate(paths)}
    by_stem: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_stem.setdefault(p.stem, []).append(i)
    xyz = np.zeros((len(paths), 3))
    row_of: dict[int, int] = {}
    for n, r in enumerate(rows):
        token = PurePosixPath(str(r.get("name") or "").strip().replace("\\", "/")).name
        i = by_name.get(token)
        if i is None:
            hits = by_stem.get(token, [])
            if len(hits) > 1:
                raise GroundTruthError(
                    f"positions file {path}: row {n + 2}: {token!r} names "
                    + " and ".join(paths[h].name for h in hits[:3])
                    + ": write the file name"
                )
            i = hits[0] if hits else None
        if i is None:
            continue  # a frame not in this folder
        if i in row_of:
            raise GroundTruthError(
                f"positions file {path}: rows {row_of[i] + 2} and {n + 2} both give a position for {paths[i].name}"
            )
        row_of[i] = n
        try:
            v = [float(str(r.get(c) or "").strip()) for c in cols]
        except ValueError:
            v = [math.nan]
        if not all(math.isfinite(x) for x in v):
            raise GroundTruthError(
                f"positions file {path}: row {n + 2} ({paths[i].name}): {[r.get(c) for c in cols]} is not "
                f"{len(cols)} finite numbers ({','.join(cols)} in metres)"
            )
        xyz[i, : len(v)] = v
    missing = [p.name for i, p in enumerate(paths) if i not in row_of]
    if missing:
        raise GroundTruthError(
            f"positions file {path} has no position for {len(missing)} of the {len(paths)} images in "
            f"{paths[0].parent}, e.g. {', '.join(missing[:3])}: give a row name,x,y for each frame"
        )
    return xyz


def from_positions(
    images_dir: str | Path,
    positions_csv: str | Path,
    pos_radius: float = POS_RADIUS,
    neg_radius: float = NEG_RADIUS,
    min_gap: int = MIN_GAP,
) -> TrainingSet:
    """One image sequence with a position (metres) per frame; every frame is a query and a database image.

    Frame j is a positive of frame i when within ``pos_radius`` metres and at least ``min_gap`` frames away;
    non-negatives: within ``neg_radius`` metres or fewer than ``min_gap`` frames away (see the module doc).
    ConfigError for bad radii / gap or a folder without images; GroundTruthError (naming the CSV) for a
    missing column, a frame without a row, a value that is not a number, or no frame with a positive.
    """
    _check_rule(pos_radius, neg_radius, min_gap)
    paths = _list(images_dir, "sequence")
    positions_csv = Path(positions_csv)
    xyz = _read_positions(positions_csv, paths)
    n = len(paths)
    positives, non_neg = _sequence_rule(xyz, np.arange(n), pos_radius, neg_radius, int(min_gap))
    source = {
        "kind": "positions",
        "images_dir": str(images_dir),
        "positions": str(positions_csv),
        "pos_radius": pos_radius,
        "neg_radius": neg_radius,
        "min_gap": int(min_gap),
    }
    return _assemble(
        paths,
        np.arange(n),
        np.arange(n),
        positives,
        non_neg,
        f"sequence {images_dir} ({positions_csv.name})",
        source,
        lambda: GroundTruthError(
            f"positions file {positions_csv}: no frame of {images_dir} has another "
            f"within {pos_radius:g} m at least {min_gap} frames away: the sequence "
            f"never revisits a place (or use a larger pos_radius)"
        ),
    )


class BagImages:
    """Chosen frames of a bag's image topic, read and decoded only when iterated: (H, W, 3) uint8 RGB arrays
    in bag order, one per frame index of ``frames``. A sized iterable (no indexing): each iteration is one
    pass over the bag. BagError if a frame that decoded before no longer does (the bag changed)."""

    def __init__(self, path: str | Path, topic: str, frames: Sequence[int], bit_depth: int | None = None) -> None:
        self.path, self.topic, self.bit_depth = Path(path), topic, bit_depth
        self.frames = [int(i) for i in frames]

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[np.ndarray]:
        from pnv_ros.bags import BagError, BagReader

        n = 0
        with BagReader(self.path, self.topic, bit_depth=self.bit_depth) as r:
            for fr in r.frames(only=set(self.frames)):
                if fr.rgb is None:
                    raise BagError(f"bag {self.path}: frame {fr.index} on {self.topic} cannot be decoded: {fr.error}")
                n += 1
                yield fr.rgb
        if n != len(self.frames):
            raise BagError(
                f"bag {self.path}: {len(self.frames)} frames expected on {self.topic}, read {n}: "
                f"the bag changed since it was indexed; load it again"
            )


def from_bag(
    bag: str | Path,
    topic: str | None = None,
    pos_radius: float = POS_RADIUS,
    neg_radius: float = NEG_RADIUS,
    min_gap: int = MIN_GAP,
    *,
    min_gap_s: float | None = None,
    bit_depth: int | None = None,
) -> TrainingSet:
    """A ROS 1 / ROS 2 bag's image topic with nav_msgs/Odometry positions (see the module doc).

    images: a lazy :class:`BagImages` of the kept frames (those with odometry within 0.1 s that decode);
    the positions layout's rule on bag frame numbers, and with ``min_gap_s`` frames fewer than that many
    seconds apart are also the same pass. One pass over the bag decodes every frame once (to leave out
    the frames that cannot be decoded; nothing is kept). ConfigError for bad radii; BagError for an
    unreadable bag, a missing or ambiguous topic, a bag without odometry, fewer than 10 usable frames, or no
    frame with a positive.
    """
    from pnv_ros.bags import ODOM_TYPE, BagError, BagReader

    _check_rule(pos_radius, neg_radius, min_gap)
    if min_gap_s is not None and not min_gap_s >= 0:
        raise ConfigError(f"min_gap_s {min_gap_s}: seconds between a frame and its positives is a number >= 0")
    bag = Path(bag)
    frames, stamps, xyz = [], [], []
    undecodable = no_position = 0
    with BagReader(bag, topic, bit_depth=bit_depth) as r:
        topic, count = r.topic, r.count
        topics = r.topics()
        if ODOM_TYPE not in topics.values():
            raise BagError(
                f"bag {bag} has no nav_msgs/Odometry: training needs a position for each frame; record odometry "
                f"with the images (its topics: {', '.join(f'{t} ({ty})' for t, ty in topics.items())})"
            )
        for fr in r.frames():
            if fr.rgb is None:
                undecodable += 1
            elif fr.position is None:
                no_position += 1
            else:
                frames.append(fr.index)
                stamps.append(fr.stamp_ns)
                xyz.append(np.asarray(fr.position, dtype=np.float64))
    if len(frames) < MIN_BAG_FRAMES:
        raise BagError(
            f"bag {bag}: only {len(frames)} of its {count} frames on {topic} have a position (odometry within "
            f"{ODOM_TOLERANCE_S:g} s of the image stamp) and decode ({no_position} without a position, "
            f"{undecodable} undecodable); training needs at least {MIN_BAG_FRAMES}: record odometry with the images"
        )
    positives, non_neg = _sequence_rule(
        np.array(xyz),
        np.array(frames),
        pos_radius,
        neg_radius,
        int(min_gap),
        np.array(stamps, dtype=np.int64),
        min_gap_s,
    )
    source = {
        "kind": "bag",
        "path": str(bag),
        "topic": topic,
        "frames": count,
        "kept": len(frames),
        "no_position": no_position,
        "undecodable": undecodable,
        "pos_radius": pos_radius,
        "neg_radius": neg_radius,
        "min_gap": int(min_gap),
        "min_gap_s": min_gap_s,
    }
    n = len(frames)
    gap = f"{min_gap} frames" + (f" and {min_gap_s:g} s" if min_gap_s else "")
    nothing = lambda: BagError(  # noqa: E731
        f"bag {bag}: no frame on {topic} has another within {pos_radius:g} m at least {gap} away: the recording "
        f"never revisits a place (or use a larger pos_radius)"
    )
    return _assemble(
        BagImages(bag, topic, frames, bit_depth),
        np.arange(n),
        np.arange(n),
        positives,
        non_neg,
        f"bag {bag} ({topic})",
        source,
        nothing,
    )


# -- public datasets -----------------------------------------------------------------------------------------


def _radius_pairs(
    db_xy: np.ndarray, q_xy: np.ndarray, pos_radius: float, neg_radius: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query row: database rows within each radius."""
    from scipy.spatial import cKDTree

    if not len(db_xy) or not len(q_xy):
        return [np.zeros(0, np.int64)] * len(q_xy), [np.zeros(0, np.int64)] * len(q_xy)
    tree = cKDTree(db_xy)
    pos = [_ints(p) for p in tree.query_ball_point(q_xy, pos_radius, return_sorted=True)]
    neg = [_ints(p) for p in tree.query_ball_point(q_xy, neg_radius, return_sorted=True)]
    return pos, neg


def _missing_files(paths: Sequence[Path], where: Path, what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{what} {where}: {len(missing)} of its {len(paths)} images are missing, e.g. "
            f"{', '.join(str(p) for p in missing[:3])}: download or extract them"
        )


def _msls_side(d: Path, exclude_panos: bool) -> tuple[list[Path], np.ndarray, int]:
    """(image paths, (N, 2) UTM easting/northing, panoramas left out) of one MSLS query/ or database/ folder."""
    pp = d / "postprocessed.csv"
    if not pp.is_file():
        raise ConfigError(f"MSLS folder {d} has no postprocessed.csv (its rows: ,key,easting,northing,...)")
    try:
        with open(pp, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise GroundTruthError(f"MSLS file {pp} cannot be read: {e}") from None
    if not rows or not {"key", "easting", "northing"} <= set(rows[0]):
        raise GroundTruthError(f"MSLS file {pp}: needs rows with the columns key, easting, northing (UTM metres)")
    panos: set[str] = set()
    raw = d / "raw.csv"
    if exclude_panos and raw.is_file():
        try:
            with open(raw, newline="") as f:
                raw_rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise GroundTruthError(f"MSLS file {raw} cannot be read: {e}") from None
        if raw_rows and not {"key", "pano"} <= set(raw_rows[0]):
            raise GroundTruthError(f"MSLS file {raw}: needs the columns key and pano")
        panos = {r["key"].strip() for r in raw_rows if str(r["pano"]).strip().lower() in ("true", "1")}
    keys, xy = [], []
    for n, r in enumerate(rows):
        key = str(r["key"] or "").strip()
        if key in panos:
            continue
        try:
            e, no = float(r["easting"]), float(r["northing"])
        except (TypeError, ValueError):
            e = no = math.nan
        if not key or not (math.isfinite(e) and math.isfinite(no)):
            raise GroundTruthError(
                f"MSLS file {pp}: row {n + 2}: key {key!r}, easting {r['easting']!r}, northing {r['northing']!r} "
                f"(a key and two numbers in metres)"
            )
        keys.append(key)
        xy.append((e, no))
    paths = [d / "images" / f"{k}.jpg" for k in keys]
    _missing_files(paths, d, "MSLS folder")
    return paths, np.array(xy, dtype=np.float64).reshape(-1, 2), len(rows) - len(keys)


def from_msls(
    root: str | Path,
    cities: Sequence[str] | str | None = None,
    pos_radius: float = POS_RADIUS,
    neg_radius: float = NEG_RADIUS,
    *,
    exclude_panos: bool = True,
) -> TrainingSet:
    """Mapillary SLS training cities (see the module doc): images = per city its database then its query
    images; positives within ``pos_radius`` metres (UTM), non-negatives within ``neg_radius``, within a city.

    cities: names (or one comma-separated string); None = every city folder under ROOT/train_val (ROOT may
    also be the train_val folder itself). ConfigError for a missing folder, city or image, or bad radii;
    GroundTruthError (naming the file) for a CSV without the columns or with a value that is not a number.
    """
    _check_rule(pos_radius, neg_radius)
    root = Path(root)
    base = root / "train_val" if (root / "train_val").is_dir() else root
    if not base.is_dir():
        raise ConfigError(f"MSLS root {root} is not a folder (the layout: ROOT/train_val/<city>/{{query,database}})")
    available = sorted(d.name for d in base.iterdir() if (d / "query").is_dir() and (d / "database").is_dir())
    if isinstance(cities, str):
        cities = [c.strip() for c in cities.split(",") if c.strip()]
    wanted = list(cities) if cities else available
    unknown = [c for c in wanted if c not in available]
    if not wanted or unknown:
        raise ConfigError(
            f"MSLS root {root}: "
            + (f"no city {', '.join(unknown)}" if unknown else "no city folder")
            + f" under {base} with query/ and database/ (cities there: {', '.join(available) or 'none'}; "
            f"the test cities carry no positions)"
        )
    images: list[Path] = []
    db_idx, q_idx, positives, non_neg = [], [], [], []
    panos = 0
    per_city = {}
    for city in wanted:
        db_paths, db_xy, p1 = _msls_side(base / city / "database", exclude_panos)
        q_paths, q_xy, p2 = _msls_side(base / city / "query", exclude_panos)
        panos += p1 + p2
        off = len(images)
        images += db_paths + q_paths
        db_idx.append(off + np.arange(len(db_paths)))
        q_idx.append(off + len(db_paths) + np.arange(len(q_paths)))
        pos, neg = _radius_pairs(db_xy, q_xy, pos_radius, neg_radius)
        positives += [off + p for p in pos]
        non_neg += [off + n for n in neg]
        per_city[city] = {"db": len(db_paths), "queries": len(q_paths)}
    source = {
        "kind": "msls",
        "root": str(root),
        "cities": per_city,
        "pos_radius": pos_radius,
        "neg_radius": neg_radius,
        "panoramas_left_out": panos,
    }
    return _assemble(
        images,
        np.concatenate(db_idx),
        np.concatenate(q_idx),
        positives,
        non_neg,
        f"MSLS {root} ({', '.join(wanted)})",
        source,
        lambda: GroundTruthError(
            f"MSLS {root}: no query of {', '.join(wanted)} has a database image within {pos_radius:g} m"
        ),
    )


def _db_struct(path: Path) -> dict[str, Any]:
    """The fields of a NetVLAD ``dbStruct`` .mat file (names and UTM as (N,) str / (N, 2) float)."""
    from scipy.io import loadmat

    try:
        s = loadmat(path, simplify_cells=True)["dbStruct"]
    except KeyError:
        raise GroundTruthError(f"Pittsburgh file {path} holds no dbStruct (NetVLAD's datasets/*.mat)") from None
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError, TypeError, MatReadError ... on other files
        raise GroundTruthError(f"Pittsburgh file {path} cannot be read as a .mat file: {e}") from None
    if not isinstance(s, dict):
        raise GroundTruthError(f"Pittsburgh file {path}: dbStruct is not a struct")

    def field(*names: str) -> Any:
        for n in names:
            if n in s:
                return s[n]
        raise GroundTruthError(f"Pittsburgh file {path}: dbStruct has no field {names[0]} (fields: {', '.join(s)})")

    def strings(v: Any, what: str) -> list[str]:
        out = [v] if isinstance(v, str) else list(np.asarray(v, dtype=object).reshape(-1))
        if not all(isinstance(x, str) and x for x in out):
            raise GroundTruthError(f"Pittsburgh file {path}: {what} is not a list of file names")
        return out

    def utm(v: Any, n: int, what: str) -> np.ndarray:
        a = np.asarray(v, dtype=np.float64)
        if a.size == 2 * n and a.ndim <= 1:
            a = a.reshape(2, n)
        if a.shape == (2, n):
            a = a.T
        if a.shape != (n, 2) or not np.isfinite(a).all():
            raise GroundTruthError(f"Pittsburgh file {path}: {what} of shape {a.shape} is not 2 x {n} finite numbers")
        return a

    try:
        db = strings(field("dbImageFns", "dbImage"), "dbImageFns")
        q = strings(field("qImageFns", "qImage"), "qImageFns")
        out = {
            "whichSet": str(field("whichSet")),
            "db": db,
            "q": q,
            "utmDb": utm(field("utmDb"), len(db), "utmDb"),
            "utmQ": utm(field("utmQ"), len(q), "utmQ"),
            "posDistThr": float(field("posDistThr")),
            "nonTrivPosDistSqThr": float(field("nonTrivPosDistSqThr")),
        }
        counts = (int(field("numImages", "numDb")), int(field("numQueries", "numQ")))
    except (TypeError, ValueError) as e:
        raise GroundTruthError(f"Pittsburgh file {path}: a field is not of the expected type: {e}") from None
    if counts != (len(db), len(q)):
        raise GroundTruthError(
            f"Pittsburgh file {path}: numImages / numQueries say {counts}, but it lists {len(db)} database and "
            f"{len(q)} query images"
        )
    return out


def from_pittsburgh(
    root: str | Path,
    split: str = PITTS_SPLIT,
    *,
    pos_radius: float | None = None,
    neg_radius: float | None = None,
) -> TrainingSet:
    """NetVLAD's Pittsburgh layout (see the module doc): images = database then query images.

    split: the .mat file's name under ROOT/datasets/ (or ROOT/), e.g. ``pitts30k_train``, ``pitts250k_train``,
    or a path to a .mat file. Radii in metres; None = the file's (``sqrt(nonTrivPosDistSqThr)``, ``posDistThr``).
    ConfigError for a missing file or image; GroundTruthError (naming the file) for a .mat file that is not a
    NetVLAD dbStruct.
    """
    root = Path(root)
    candidates = (
        [Path(split)] if split.endswith(".mat") else [root / "datasets" / f"{split}.mat", root / f"{split}.mat"]
    )
    mat = next((p for p in candidates if p.is_file()), None)
    if mat is None:
        raise ConfigError(f"Pittsburgh split {split}: no {' or '.join(map(str, candidates))}")
    s = _db_struct(mat)
    pos_radius = math.sqrt(s["nonTrivPosDistSqThr"]) if pos_radius is None else pos_radius
    neg_radius = s["posDistThr"] if neg_radius is None else neg_radius
    _check_rule(pos_radius, neg_radius)
    db_paths = [root / n for n in s["db"]]
    q_paths = [root / "queries_real" / n for n in s["q"]]
    _missing_files(db_paths + q_paths, root, "Pittsburgh root")
    pos, neg = _radius_pairs(s["utmDb"], s["utmQ"], pos_radius, neg_radius)
    source = {
        "kind": "pittsburgh",
        "root": str(root),
        "mat": str(mat),
        "whichSet": s["whichSet"],
        "pos_radius": pos_radius,
        "neg_radius": neg_radius,
    }
    return _assemble(
        db_paths + q_paths,
        np.arange(len(db_paths)),
        len(db_paths) + np.arange(len(q_paths)),
        pos,
        neg,
        f"Pittsburgh {mat.stem} ({root})",
        source,
        lambda: GroundTruthError(f"Pittsburgh file {mat}: no query has a database image within {pos_radius:g} m"),
    )


# -- one entry point ------------------------------------------------------------------------------------------


def load_training_set(
    *,
    pairs: tuple[str | Path, str | Path] | None = None,
    gt: str | Path | None = None,
    images: str | Path | None = None,
    positions: str | Path | None = None,
    bag: str | Path | None = None,
    topic: str | None = None,
    msls: str | Path | None = None,
    pittsburgh: str | Path | None = None,
    pos_radius: float = POS_RADIUS,
    neg_radius: float = NEG_RADIUS,
    min_gap: int = MIN_GAP,
    min_gap_s: float | None = None,
    neg_margin: int = NEG_MARGIN,
    msls_cities: Sequence[str] | str | None = None,
    pittsburgh_split: str = PITTS_SPLIT,
) -> TrainingSet:
    """The training set of exactly one layout (see the module doc): ``pairs=(REF_DIR, QUERY_DIR)`` with ``gt``;
    ``images`` with ``positions``; ``bag`` (``topic``, ``min_gap_s``); ``msls`` (``msls_cities``); ``pittsburgh``
    (``pittsburgh_split``). The radii (metres) go to every layout that uses them (for Pittsburgh they replace
    the file's, which are the same 10 and 25 m by default); ``min_gap`` to the positions and bag layouts.
    ConfigError for none or several layouts, or an option of another layout; the loaders' errors otherwise.
    """
    given = [
        k
        for k, v in (("pairs", pairs), ("images", images), ("bag", bag), ("msls", msls), ("pittsburgh", pittsburgh))
        if v is not None
    ]
    if len(given) != 1:
        raise ConfigError(f"give exactly one training data layout ({_FORMS}); got {', '.join(given) or 'none'}")
    kind = given[0]
    stray = [
        k
        for k, v, own in (
            ("gt", gt, "pairs"),
            ("positions", positions, "images"),
            ("topic", topic, "bag"),
            ("min_gap_s", min_gap_s, "bag"),
            ("msls_cities", msls_cities, "msls"),
        )
        if v is not None and own != kind
    ]
    if stray:
        raise ConfigError(f"{', '.join(stray)} do(es) not apply to the {kind} layout ({_FORMS})")
    if kind == "pairs":
        if gt is None or isinstance(pairs, (str, Path)) or len(pairs) != 2:
            raise ConfigError(f"pairs needs two folders (reference, query) and gt=FILE ({_FORMS})")
        return from_pairs(pairs[0], pairs[1], gt, pos_radius=pos_radius, neg_radius=neg_radius, neg_margin=neg_margin)
    if kind == "images":
        if positions is None:
            raise ConfigError(f"images needs positions=CSV (name,x,y[,z] in metres) ({_FORMS})")
        return from_positions(images, positions, pos_radius, neg_radius, min_gap)
    if kind == "bag":
        return from_bag(bag, topic, pos_radius, neg_radius, min_gap, min_gap_s=min_gap_s)
    if kind == "msls":
        return from_msls(msls, msls_cities, pos_radius, neg_radius)
    return from_pittsburgh(pittsburgh, pittsburgh_split, pos_radius=pos_radius, neg_radius=neg_radius)
