"""Training data for NetVLAD triplet training (pnv_ros.training.datasets): the pairs, positions and bag layouts
on the repo's real corridor images (and real bags written with make_bag), tiny fake MSLS and Pittsburgh trees,
malformed inputs, and the place-disjoint train / validation split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CORRIDOR
from scipy.io import savemat

from pnv_ros.bags import BagError, make_bag
from pnv_ros.errors import ConfigError, GroundTruthError
from pnv_ros.images import list_images, load_image
from pnv_ros.training.datasets import (
    BagImages,
    TrainingSet,
    from_bag,
    from_msls,
    from_pairs,
    from_pittsburgh,
    from_positions,
    load_training_set,
)

REF, QUERY, GT_CSV = CORRIDOR / "ref", CORRIDOR / "query", CORRIDOR / "gt.csv"
N = 111  # images per corridor traversal


def _sets(a: np.ndarray) -> set[int]:
    return {int(x) for x in a}


def _check_invariants(ts: TrainingSet) -> None:
    db = _sets(ts.db)
    assert ts.db.dtype == ts.queries.dtype == np.int64
    assert len(ts.queries) == len(ts.positives) == len(ts.non_negatives) > 0
    for p, n in zip(ts.positives, ts.non_negatives):
        assert len(p) and _sets(p) <= _sets(n) <= db
    json.dumps(ts.source)  # metadata-ready


@pytest.fixture(scope="module")
def corridor_pairs() -> TrainingSet:
    return from_pairs(REF, QUERY, GT_CSV)


@pytest.fixture
def sequence(tmp_path: Path) -> tuple[Path, Path]:
    """Corridor ref 0..110 then query 0..110 as one sequence 0000.jpg .. 0221.jpg; x = index within its pass."""
    d = tmp_path / "seq"
    d.mkdir()
    rows = ["name,x,y"]
    for k, src in enumerate(list_images([REF]) + list_images([QUERY])):
        (d / f"{k:04d}.jpg").symlink_to(src)
        rows.append(f"{k:04d}.jpg,{k % N},0")
    csv = tmp_path / "positions.csv"
    csv.write_text("\n".join(rows) + "\n")
    return d, csv


# -- pairs ----------------------------------------------------------------------------------------------------


def test_pairs_corridor(corridor_pairs: TrainingSet) -> None:
    ts = corridor_pairs
    _check_invariants(ts)
    assert len(ts.images) == 2 * N and len(ts.db) == N and len(ts.queries) == N and ts.dropped == 0
    assert list(ts.db) == list(range(N)) and list(ts.queries) == list(range(N, 2 * N))
    assert Path(ts.images[0]) == REF / "0000000.jpg" and Path(ts.images[N + 50]) == QUERY / "0000050.jpg"
    assert _sets(ts.positives[50]) == set(range(48, 53))  # gt.csv: |i - j| <= 2
    assert _sets(ts.non_negatives[50]) == set(range(47, 54))  # the neg_margin band of 1
    assert _sets(ts.positives[0]) == {0, 1, 2}
    assert ts.source["kind"] == "pairs" and ts.source["gt_kind"] == "positives"


def test_pairs_matrix_band_ignore_and_dropped(tmp_path: Path) -> None:
    i = np.arange(N)
    m = (np.abs(i[:, None] - i[None, :]) <= 2).astype(np.int8)
    m[10] = 0  # query 10 has no positive: dropped
    m[20, 30] = -1  # an ignored cell is a non-negative
    np.save(tmp_path / "gt.npy", m)
    ts = from_pairs(REF, QUERY, tmp_path / "gt.npy", neg_margin=3)
    _check_invariants(ts)
    assert len(ts.queries) == N - 1 and ts.dropped == 1 and N + 10 not in _sets(ts.queries)
    k = list(ts.queries).index(N + 20)
    assert _sets(ts.positives[k]) == set(range(18, 23))
    assert _sets(ts.non_negatives[k]) == set(range(15, 26)) | {30}
    assert ts.source["gt_kind"] == "matrix" and ts.source["neg_margin"] == 3
    zero = from_pairs(REF, QUERY, tmp_path / "gt.npy", neg_margin=0)
    assert _sets(zero.non_negatives[k]) == set(range(18, 23)) | {30}


def test_pairs_positions_gt_uses_the_radii(tmp_path: Path) -> None:
    rows = ["name,x,y"] + [f"{side}/{k:07d}.jpg,{k},0" for side in ("ref", "query") for k in range(N)]
    (tmp_path / "pos.csv").write_text("\n".join(rows) + "\n")
    ts = from_pairs(REF, QUERY, tmp_path / "pos.csv", pos_radius=2.5, neg_radius=4.5)
    assert _sets(ts.positives[50]) == set(range(48, 53))
    assert _sets(ts.non_negatives[50]) == set(range(46, 55))
    assert ts.source["gt_kind"] == "positions"
    with pytest.raises(ConfigError, match="neg_radius"):
        from_pairs(REF, QUERY, tmp_path / "pos.csv", pos_radius=5, neg_radius=2)


def test_pairs_malformed(tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.ones((5, 7)))
    with pytest.raises(GroundTruthError, match=r"wrong\.npy.*\(5, 7\)"):
        from_pairs(REF, QUERY, tmp_path / "wrong.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        from_pairs(tmp_path / "empty", QUERY, GT_CSV)
    with pytest.raises(GroundTruthError, match="nothere.csv"):
        from_pairs(REF, QUERY, tmp_path / "nothere.csv")
    with pytest.raises(ConfigError, match="same image"):
        from_pairs(REF, REF, GT_CSV)


# -- positions ------------------------------------------------------------------------------------------------


def test_positions_sequence(sequence: tuple[Path, Path]) -> None:
    d, csv = sequence
    ts = from_positions(d, csv, pos_radius=2.5, neg_radius=5.0)
    _check_invariants(ts)
    assert len(ts.images) == 2 * N and list(ts.db) == list(range(2 * N)) and ts.dropped == 0
    assert list(ts.queries) == list(range(2 * N))  # every frame revisits (the other pass)
    # frame 111 + 50: positives in the first pass only, not its own temporal neighbours 159..163
    assert _sets(ts.positives[N + 50]) == set(range(48, 53))
    assert _sets(ts.non_negatives[N + 50]) == set(range(45, 56)) | set(range(N + 50 - 9, N + 50 + 10))
    assert _sets(ts.positives[50]) == set(range(N + 48, N + 53))
    with_neighbours = from_positions(d, csv, pos_radius=2.5, neg_radius=5.0, min_gap=1)
    assert _sets(with_neighbours.positives[N + 50]) == set(range(48, 53)) | {159, 160, 162, 163}
    with pytest.raises(GroundTruthError, match="never revisits"):
        from_positions(d, csv, pos_radius=2.5, neg_radius=5.0, min_gap=500)


def test_positions_rule_errors(sequence: tuple[Path, Path]) -> None:
    d, csv = sequence
    with pytest.raises(ConfigError, match="neg_radius 5.0 is smaller than pos_radius 10"):
        from_positions(d, csv, pos_radius=10.0, neg_radius=5.0)
    with pytest.raises(ConfigError, match="min_gap"):
        from_positions(d, csv, min_gap=0)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda rows: [r for r in rows if not r.startswith("0007.jpg")], r"no position for 1 of the 222.*0007\.jpg"),
        (lambda rows: [r.replace("0007.jpg,7,0", "0007.jpg,seven,0") for r in rows], r"row 9 \(0007\.jpg\)"),
        (lambda rows: [r.replace("0007.jpg,7,0", "0007.jpg,nan,0") for r in rows], r"row 9"),
        (lambda rows: ["file,x,y"] + rows[1:], r"needs the columns name,x,y"),
        (lambda rows: rows + ["0007,1,1"], r"rows 9 and 224 both give a position for 0007\.jpg"),
        (lambda rows: rows[:1], r"has no rows"),
    ],
)
def test_positions_malformed(sequence: tuple[Path, Path], tmp_path: Path, edit, match: str) -> None:
    d, csv = sequence
    bad = tmp_path / "bad_positions.csv"
    bad.write_text("\n".join(edit(csv.read_text().splitlines())) + "\n")
    with pytest.raises(GroundTruthError, match=match) as e:
        from_positions(d, bad)
    assert "bad_positions.csv" in str(e.value)


def test_positions_stems_and_extra_rows(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    for k in range(24):
        (d / f"{k}.jpg").symlink_to(REF / f"{k % 12:07d}.jpg")
    rows = ["name,x,y,z", "other.jpg,0,0,0"]  # a row for a file not in the folder is ignored
    for k in range(24):  # a path ending in the file name, or the stem, binds
        rows.append(f"{f'images/{k}.jpg' if k % 2 else k},{k % 12},0,1")
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    ts = from_positions(d, tmp_path / "p.csv", pos_radius=1.5, neg_radius=2.5)
    assert [Path(p).name for p in ts.images[:3]] == ["0.jpg", "1.jpg", "2.jpg"]  # natural frame order
    assert _sets(ts.positives[15]) == {2, 3, 4}


# -- bags -----------------------------------------------------------------------------------------------------


def _bag_frames(tmp_path: Path, n: int) -> tuple[Path, Path]:
    """Corridor ref 0..n-1 then query 0..n-1 as frames 0000 .. and a poses CSV (x = index within the pass)."""
    d = tmp_path / f"frames{n}"
    d.mkdir()
    rows = ["name,x,y"]
    for k in range(2 * n):
        (d / f"{k:04d}.jpg").symlink_to((REF if k < n else QUERY) / f"{k % n:07d}.jpg")
        rows.append(f"{k:04d},{k % n},0")
    poses = tmp_path / f"poses{n}.csv"
    poses.write_text("\n".join(rows) + "\n")
    return d, poses


def test_bag_with_odometry(tmp_path: Path) -> None:
    d, poses = _bag_frames(tmp_path, 20)
    bag = tmp_path / "run.mcap"
    make_bag(d, bag, poses=poses)  # 1 Hz: frames 1 s apart
    ts = from_bag(bag, pos_radius=2.5, neg_radius=5.0)
    _check_invariants(ts)
    assert isinstance(ts.images, BagImages) and len(ts.images) == 40 and ts.dropped == 0
    assert _sets(ts.positives[30]) == set(range(8, 13))  # frame 20 + 10: the first pass, not 28..32
    assert _sets(ts.positives[10]) == set(range(28, 33))
    assert _sets(ts.non_negatives[30]) == set(range(5, 16)) | set(range(21, 40))
    assert ts.source["kind"] == "bag" and ts.source["topic"] == "/camera/image" and ts.source["kept"] == 40
    frames = list(ts.images)  # decoded lazily, in order
    assert len(frames) == 40 and frames[0].shape == (120, 160, 3)
    np.testing.assert_array_equal(frames[25], np.asarray(load_image(QUERY / "0000005.jpg")))
    # seconds too: frames fewer than 19.5 s apart are the same pass
    ts_s = from_bag(bag, "/camera/image", pos_radius=2.5, neg_radius=5.0, min_gap_s=19.5)
    assert _sets(ts_s.positives[30]) == {8, 9, 10}
    same = load_training_set(bag=bag, pos_radius=2.5, neg_radius=5.0)
    assert [list(p) for p in same.positives] == [list(p) for p in ts.positives]


def test_bag_drops_undecodable_and_unplaced_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pnv_ros.bags as bags

    d, poses = _bag_frames(tmp_path, 20)
    bag = tmp_path / "run.mcap"
    make_bag(d, bag, poses=poses)
    frames = bags.BagReader.frames

    def damaged(self, only=None):  # frame 3 undecodable, frame 5 without odometry
        for fr in frames(self, only):
            if fr.index == 3:
                fr.rgb, fr.error = None, "broken"
            if fr.index == 5:
                fr.position = None
            yield fr

    monkeypatch.setattr(bags.BagReader, "frames", damaged)
    ts = from_bag(bag, pos_radius=2.5, neg_radius=5.0)
    assert len(ts.images) == 38 and ts.images.frames[:6] == [0, 1, 2, 4, 6, 7]
    assert ts.source["undecodable"] == 1 and ts.source["no_position"] == 1 and ts.source["kept"] == 38
    # bag frame 30 is image 28; its positives, bag frames 8..12, are images 6..10; gaps count in bag frames
    assert _sets(ts.positives[28]) == set(range(6, 11))
    assert len(list(ts.images)) == 38


def test_bag_errors(tmp_path: Path) -> None:
    d, poses = _bag_frames(tmp_path, 20)
    bare = tmp_path / "bare.mcap"
    make_bag(d, bare)  # images only
    with pytest.raises(BagError, match=r"bare\.mcap has no nav_msgs/Odometry.*record odometry with the images"):
        from_bag(bare)
    d4, poses4 = _bag_frames(tmp_path, 4)
    short = tmp_path / "short.mcap"
    make_bag(d4, short, poses=poses4)
    with pytest.raises(BagError, match=r"only 8 of its 8 frames.*at least 10"):
        from_bag(short)
    with pytest.raises(BagError, match="does not exist"):
        from_bag(tmp_path / "nothere.mcap")


# -- split ----------------------------------------------------------------------------------------------------


def _assert_disjoint(train: TrainingSet, valid: TrainingSet) -> None:
    _check_invariants(train)
    _check_invariants(valid)
    places = _sets(valid.queries)
    for p, n in zip(valid.positives, valid.non_negatives):
        places |= _sets(p) | _sets(n)
    assert not places & _sets(train.db)
    assert not places & _sets(train.queries)
    for p, n in zip(train.positives, train.non_negatives):
        assert not places & (_sets(p) | _sets(n))


def test_split_pairs(corridor_pairs: TrainingSet) -> None:
    train, valid = corridor_pairs.split()
    _assert_disjoint(train, valid)
    assert len(valid.queries) == 22 and list(valid.queries) == list(corridor_pairs.queries[-22:])
    assert list(valid.db) == list(corridor_pairs.db)  # the validation side keeps the full database
    assert len(train.queries) + train.dropped == N - 22 and train.dropped >= 1
    assert valid.source["split"]["side"] == "validation" and train.source["split"]["db_taken_out"] > 0
    train_gap, _ = corridor_pairs.split(holdout=0.2, gap=10)
    assert max(train_gap.queries) < max(train.queries) - 5


def test_split_sequence(sequence: tuple[Path, Path]) -> None:
    ts = from_positions(*sequence, pos_radius=2.5, neg_radius=5.0)
    train, valid = ts.split(0.25)
    _assert_disjoint(train, valid)  # frames are queries and database images at once
    assert len(valid.queries) == round(0.25 * 2 * N)


def test_split_errors(corridor_pairs: TrainingSet) -> None:
    for holdout in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="holdout"):
            corridor_pairs.split(holdout)
    with pytest.raises(ConfigError, match="no training query keeps a positive"):
        corridor_pairs.split(0.99)  # the validation queries cover every place
    with pytest.raises(ConfigError, match="cannot be split"):
        corridor_pairs.split(0.5, gap=N)
    with pytest.raises(ConfigError, match="gap"):
        corridor_pairs.split(0.2, gap=-1)


# -- MSLS and Pittsburgh (tiny fakes) ---------------------------------------------------------------------------


def _msls_side(d: Path, rows: list[tuple[str, float, float, bool]], first: int) -> None:
    (d / "images").mkdir(parents=True)
    pp = [",key,easting,northing,unique_cluster,control_panel,night,view_direction"]
    raw = [",key,lon,lat,ca,captured_at,pano"]
    for n, (key, e, no, pano) in enumerate(rows):
        shutil.copy(REF / f"{first + n:07d}.jpg", d / "images" / f"{key}.jpg")
        pp.append(f"{n},{key},{e},{no},0,0,False,Forward")
        raw.append(f"{n},{key},0.0,0.0,0.0,0,{pano}")
    (d / "postprocessed.csv").write_text("\n".join(pp) + "\n")
    (d / "raw.csv").write_text("\n".join(raw) + "\n")


def test_msls_fake(tmp_path: Path) -> None:
    tv = tmp_path / "msls" / "train_val"
    # city a: database at easting 0, 5, 10 (a panorama), 30; queries at 1, 31 and 200 (no positive)
    _msls_side(
        tv / "a" / "database", [("d0", 0, 0, False), ("d1", 5, 0, False), ("dp", 10, 0, True), ("d3", 30, 0, False)], 0
    )
    _msls_side(tv / "a" / "query", [("q0", 1, 0, False), ("q1", 31, 0, False), ("q2", 200, 0, False)], 10)
    # city b: the same coordinates, another UTM zone: never mixed with a
    _msls_side(tv / "b" / "database", [("e0", 0, 0, False)], 20)
    _msls_side(tv / "b" / "query", [("r0", 2, 0, False)], 30)
    ts = from_msls(tmp_path / "msls")
    _check_invariants(ts)
    names = [Path(p).stem for p in ts.images]
    assert names == ["d0", "d1", "d3", "q0", "q1", "q2", "e0", "r0"]  # the panorama is left out
    assert list(ts.db) == [0, 1, 2, 6] and list(ts.queries) == [3, 4, 7] and ts.dropped == 1
    assert [_sets(p) for p in ts.positives] == [{0, 1}, {2}, {6}]
    assert [_sets(n) for n in ts.non_negatives] == [{0, 1}, {2}, {6}]
    assert ts.source["panoramas_left_out"] == 1 and ts.source["cities"]["a"] == {"db": 3, "queries": 3}
    only_b = from_msls(tmp_path / "msls" / "train_val", cities="b", pos_radius=2.5, neg_radius=3.0)
    assert len(only_b.images) == 2 and list(only_b.positives[0]) == [0] and only_b.dropped == 0
    with pytest.raises(GroundTruthError, match="within 1 m"):
        from_msls(tmp_path / "msls", cities=["b"], pos_radius=1.0)
    with pytest.raises(ConfigError, match=r"no city x .*cities there: a, b"):
        from_msls(tmp_path / "msls", cities=["x"])
    (tv / "a" / "query" / "images" / "q1.jpg").unlink()
    with pytest.raises(ConfigError, match=r"1 of its 3 images are missing.*q1\.jpg"):
        from_msls(tmp_path / "msls")
    (tv / "b" / "query" / "postprocessed.csv").write_text(",key,easting,northing\n0,r0,east,0\n")
    with pytest.raises(GroundTruthError, match=r"postprocessed\.csv: row 2"):
        from_msls(tmp_path / "msls", cities="b")


def _pitts(root: Path, **override: object) -> Path:
    db = ["000/000000_pitch1_yaw1.jpg", "000/000001_pitch1_yaw1.jpg", "000/000002_pitch1_yaw1.jpg"]
    q = ["000/000000_pitch1_yaw1.jpg", "000/000001_pitch1_yaw2.jpg"]
    for k, n in enumerate(db):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REF / f"{k:07d}.jpg", root / n)
    for k, n in enumerate(q):
        (root / "queries_real" / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(QUERY / f"{k:07d}.jpg", root / "queries_real" / n)
    cells = lambda names: np.array(names, dtype=object).reshape(-1, 1)  # noqa: E731 - MATLAB cell arrays (N x 1)
    s = {
        "whichSet": "train",
        "dbImageFns": cells(db),
        "utmDb": np.array([[0.0, 8.0, 40.0], [0.0, 0.0, 0.0]]),
        "qImageFns": cells(q),
        "utmQ": np.array([[3.0, 100.0], [0.0, 0.0]]),
        "numImages": 3,
        "numQueries": 2,
        "posDistThr": 25.0,
        "posDistSqThr": 625.0,
        "nonTrivPosDistSqThr": 100.0,
    }
    s.update(override)
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    mat = root / "datasets" / "pitts30k_train.mat"
    savemat(mat, {"dbStruct": {k: v for k, v in s.items() if v is not None}})
    return mat


def test_pittsburgh_fake(tmp_path: Path) -> None:
    root = tmp_path / "pitts"
    _pitts(root)
    ts = from_pittsburgh(root)
    _check_invariants(ts)
    assert len(ts.images) == 5 and list(ts.db) == [0, 1, 2] and list(ts.queries) == [3] and ts.dropped == 1
    assert Path(ts.images[3]) == root / "queries_real" / "000" / "000000_pitch1_yaw1.jpg"
    assert _sets(ts.positives[0]) == {0, 1}  # within sqrt(nonTrivPosDistSqThr) = 10 m
    assert _sets(ts.non_negatives[0]) == {0, 1}  # 40 m is beyond posDistThr = 25 m
    assert ts.source["pos_radius"] == 10.0 and ts.source["neg_radius"] == 25.0
    narrow = from_pittsburgh(root, "pitts30k_train", pos_radius=4.0, neg_radius=40.0)
    assert _sets(narrow.positives[0]) == {0} and _sets(narrow.non_negatives[0]) == {0, 1, 2}
    same = load_training_set(pittsburgh=root)
    assert [list(p) for p in same.positives] == [list(p) for p in ts.positives]
    with pytest.raises(ConfigError, match="pitts30k_val"):
        from_pittsburgh(root, "pitts30k_val")


@pytest.mark.parametrize(
    "override, match",
    [
        ({"utmQ": None}, "no field utmQ"),
        ({"numImages": 4}, "numImages / numQueries say"),
        ({"utmDb": np.zeros((3, 3))}, r"utmDb of shape \(3, 3\)"),
    ],
)
def test_pittsburgh_malformed(tmp_path: Path, override: dict, match: str) -> None:
    mat = _pitts(tmp_path / "pitts", **override)
    with pytest.raises(GroundTruthError, match=match) as e:
        from_pittsburgh(tmp_path / "pitts")
    assert str(mat) in str(e.value)


def test_pittsburgh_not_a_mat_file(tmp_path: Path) -> None:
    (tmp_path / "x.mat").write_text("not a mat file")
    with pytest.raises(GroundTruthError, match=r"x\.mat cannot be read"):
        from_pittsburgh(tmp_path, str(tmp_path / "x.mat"))


# -- the dispatcher -------------------------------------------------------------------------------------------


def test_load_training_set(sequence: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match=r"exactly one training data layout.*pairs=.*got none"):
        load_training_set()
    with pytest.raises(ConfigError, match="got pairs, bag"):
        load_training_set(pairs=(REF, QUERY), gt=GT_CSV, bag="x.mcap")
    with pytest.raises(ConfigError, match="gt=FILE"):
        load_training_set(pairs=(REF, QUERY))
    with pytest.raises(ConfigError, match="positions=CSV"):
        load_training_set(images=sequence[0])
    with pytest.raises(ConfigError, match="gt do.*images layout"):
        load_training_set(images=sequence[0], positions=sequence[1], gt=GT_CSV)
    with pytest.raises(ConfigError, match="topic"):
        load_training_set(pairs=(REF, QUERY), gt=GT_CSV, topic="/cam")
    ts = load_training_set(pairs=(REF, QUERY), gt=GT_CSV)
    assert _sets(ts.positives[50]) == set(range(48, 53))
    seq = load_training_set(images=sequence[0], positions=sequence[1], pos_radius=2.5, neg_radius=5.0)
    assert _sets(seq.positives[N + 50]) == set(range(48, 53))
