from pathlib import Path

import numpy as np
import pytest

from pnv_ros.errors import GroundTruthError
from pnv_ros.eval.ground_truth import load_ground_truth, recall_at_n

RT = Path(__file__).resolve().parent.parent / "data" / "rtabmap_samples_loop84"
CO = Path(__file__).resolve().parent.parent / "data" / "corridor_vprbench"
Q = [str(i) for i in range(41, 85)]
DB = [str(i) for i in range(1, 41)]


def test_rtabmap_formats_agree() -> None:
    a = load_ground_truth(RT / "gt.csv", Q, DB)
    b = load_ground_truth(RT / "gt_matrix.npy", Q, DB)
    c = load_ground_truth(RT / "samples_GT.bmp", Q, DB)
    assert a.positives == b.positives == c.positives
    assert a.positives[0] == {0, 1, 2}  # frame 41 -> frames 1, 2, 3
    assert a.positives[-1] == {2, 3, 4}  # frame 84 -> 3, 4, 5 (42-46 are not in this database)


def test_corridor_csv_indices() -> None:
    names = [f"{i:07d}" for i in range(111)]
    gt = load_ground_truth(CO / "gt.csv", names, names)
    assert gt.positives[0] == {0, 1, 2} and gt.positives[50] == {48, 49, 50, 51, 52}


def test_positions_and_radius(tmp_path: Path) -> None:
    p = tmp_path / "pos.csv"
    p.write_text("name,x,y\nq0,0,0\nq1,10,0\nd0,1,0\nd1,10,1\nd2,30,0\n")
    gt = load_ground_truth(p, ["q0", "q1"], ["d0", "d1", "d2"], radius=2.0)
    assert gt.positives == [{0}, {1}]
    with pytest.raises(GroundTruthError, match="give a radius"):
        load_ground_truth(p, ["q0"], ["d0"])


def test_recall() -> None:
    gt = load_ground_truth(RT / "gt.csv", Q, DB)
    perfect = [sorted(p) + [39] for p in gt.positives]
    assert recall_at_n(perfect, gt, (1,)) == {1: 1.0}
    wrong = [[next(i for i in range(40) if i not in p)] for p in gt.positives]
    assert recall_at_n(wrong, gt, (1,))[1] == 0.0


def test_bad_ground_truth(tmp_path: Path) -> None:
    with pytest.raises(GroundTruthError, match=r"matrix of shape \(3, 3\) does not fit 2 queries x 2"):
        np.save(tmp_path / "m.npy", np.eye(3))
        load_ground_truth(tmp_path / "m.npy", ["a", "b"], ["c", "d"])
    obj = tmp_path / "o.npy"
    np.save(obj, np.array([[0, [1, 2]]], dtype=object), allow_pickle=True)
    with pytest.raises(GroundTruthError, match="never loaded"):
        load_ground_truth(obj, ["a"], ["b"])
    with pytest.raises(GroundTruthError, match="none of its"):
        load_ground_truth(RT / "gt.csv", ["x"], ["y"])


# -- explicit formats (issue #15, kind 6) -------------------------------------------------------------------------

OLD_DB, NEW_DB = ["1", "2", "3"], ["1.jpg", "2.jpg", "3.jpg"]  # feature-set names: stems, or file identities


@pytest.mark.parametrize("db", [OLD_DB, NEW_DB])
def test_zero_based_positives_with_number_names(tmp_path: Path, db: list[str]) -> None:
    """6a: 0-based positives while the database names are numbers: read as indices, not shifted names."""
    q = ["q1", "q2", "q3"]
    p = tmp_path / "gt.csv"
    p.write_text("query_file,positives\nq1.jpg,0\nq2.jpg,1\nq3.jpg,2\n")
    gt = load_ground_truth(p, q, db)
    assert gt.positives == [{0}, {1}, {2}]
    assert recall_at_n([[0], [1], [2]], gt, (1,)) == {1: 1.0}  # was 0.0 (names "1", "2": shifted, "0" dropped)
    p.write_text("query_file,positive_indices\nq1.jpg,0\nq2.jpg,1\nq3.jpg,2\n")
    assert load_ground_truth(p, q, db).positives == [{0}, {1}, {2}]
    p.write_text("query_file,positive_names\nq1.jpg,1\nq2.jpg,2\nq3.jpg,3\n")
    assert load_ground_truth(p, q, db).positives == [{0}, {1}, {2}]
    p.write_text("query_file,positives\nq1.jpg,1\nq2.jpg,2\nq3.jpg,1\n")  # fits names and indices alike
    with pytest.raises(GroundTruthError, match="reads both as names and as indices: say which with --gt-positives"):
        load_ground_truth(p, q, db)
    assert load_ground_truth(p, q, db, positives_as="names").positives == [{0}, {1}, {0}]
    assert load_ground_truth(p, q, db, positives_as="indices").positives == [{1}, {2}, {1}]
    assert load_ground_truth(p, q, db, positives_as="indices", index_base=1).positives == [{0}, {1}, {0}]
    p.write_text("query_file,positive_names\nq1.jpg,0\n")
    with pytest.raises(GroundTruthError, match=r"row 2, positive '0' names no database image"):
        load_ground_truth(p, q, db)  # an unknown name is an error, not dropped
    p.write_text("query_file,positive_indices\nq1.jpg,3\n")
    with pytest.raises(GroundTruthError, match=r"row 2, positive '3' is outside 0..2 \(0-based indices\)"):
        load_ground_truth(p, q, db)


def test_real_files_read_as_their_readmes_say() -> None:
    """rtabmap gt.csv: 1-based frame numbers = file numbers; corridor: 0-based = file numbers; old and new names."""
    for q, db in (
        (Q, DB),
        ([f"{i}.jpg" for i in range(41, 85)], [f"{i}.jpg" for i in range(1, 41)]),
        ([f"images/{i}.jpg" for i in range(41, 85)], [f"images/{i}.jpg" for i in range(1, 41)]),
    ):
        a, b, c = (load_ground_truth(RT / f, q, db) for f in ("gt.csv", "gt_matrix.npy", "samples_GT.bmp"))
        assert a.positives == b.positives == c.positives
        assert a.positives[0] == {0, 1, 2} and a.positives[-1] == {2, 3, 4}
    new = ([f"query/{i:07d}.jpg" for i in range(111)], [f"ref/{i:07d}.jpg" for i in range(111)])
    for qn, dbn in (([f"{i:07d}" for i in range(111)],) * 2, ([f"{i:07d}.jpg" for i in range(111)],) * 2, new):
        gt = load_ground_truth(CO / "gt.csv", qn, dbn)
        assert gt.positives[0] == {0, 1, 2} and gt.positives[50] == {48, 49, 50, 51, 52}
        assert gt.positives[110] == {108, 109, 110}


def test_sequence_csv_numbering_is_stated(tmp_path: Path) -> None:
    """load_sequence_gt no longer guesses 1-based from keys running 1..N."""
    from pnv_ros.eval.ground_truth import load_sequence_gt

    rt = load_sequence_gt(RT / "gt.csv", 84)  # query_file states it: index k is images/k.jpg
    assert rt == load_sequence_gt(RT / "samples_GT.bmp", 84) and rt[40] == {0, 1, 2}
    p = tmp_path / "seq.csv"
    p.write_text("query_index,positive_indices\n1,\n2,\n3,1\n")
    with pytest.raises(GroundTruthError, match=r"row 4, query_index 3 is outside 0..2 .*--gt-index-base"):
        load_sequence_gt(p, 3)
    assert load_sequence_gt(p, 3, index_base=1) == [set(), set(), {0}]
    p.write_text("query_index,positive_indices\n0,\n1,\n2,1\n")
    assert load_sequence_gt(p, 3) == [set(), set(), {1}]
    p.write_text("query_index,query_file,positive_names\n1,a/1.jpg,\n2,a/2.jpg,\n3,a/3.jpg,1.jpg 2\n")
    assert load_sequence_gt(p, 3) == [set(), set(), {0, 1}]


def test_names_bind_to_identities(tmp_path: Path) -> None:
    """Kind 5: exact identity, then without suffix, then unique stem / trailing path; ambiguity is an error."""
    p = tmp_path / "gt.csv"
    db = ["ref/1.jpg", "query/1.jpg", "ref/2.jpg"]
    for tok, want in (("ref/1.jpg", 0), ("query/1", 1), ("2", 2), ("2.jpg", 2), ("data/ref/2.jpg", 2)):
        p.write_text(f"query_file,positive_names\nq.jpg,{tok}\n")
        assert load_ground_truth(p, ["q.jpg"], db).positives == [{want}], tok
    p.write_text("query_file,positive_names\nq.jpg,1\n")
    with pytest.raises(GroundTruthError, match=r"ambiguous: 1 names ref/1.jpg and query/1.jpg"):
        load_ground_truth(p, ["q.jpg"], db)
    p.write_text("query_file,positive_names\nq.jpg,7\n")
    with pytest.raises(GroundTruthError, match="'7' names no database image"):
        load_ground_truth(p, ["q.jpg"], db)
    pos = tmp_path / "pos.csv"
    pos.write_text("name,x,y\nq0,0,0\nd0,1,0\nd1,10,1\n")
    assert load_ground_truth(pos, ["q0.jpg"], ["d0.jpg", "d1.jpg"], radius=2.0).positives == [{0}]


def _gt24(tmp_path: Path, grey: int) -> np.ndarray:
    """24 frames: frames 12..23 close a loop with frame i-12 (255); frames 1..11 mark their neighbour grey."""
    g = np.zeros((24, 24), np.uint8)
    for i in range(12, 24):
        g[i, i - 12] = 255
    for i in range(1, 12):
        g[i, i - 1] = grey
    return g


def test_grey_is_ignore_24_frames(tmp_path: Path) -> None:
    """6b: RTAB-Map's grey = ignore. Keyframes 12..22 find i-12 (11 true), 23 finds 5 (false), 3 reports 2 (grey):
    recall 11/12 = 0.917 and precision 11/12; binarised with != 0 it was 12/23 (grey rows became positives)."""
    from PIL import Image

    from pnv_ros.eval.ground_truth import load_sequence_gt
    from pnv_ros.eval.replay import KeyframeRecord, ReplayResult
    from pnv_ros.eval.report import compute_metrics

    g = _gt24(tmp_path, 128)
    Image.fromarray(g).save(tmp_path / "gt.bmp")
    npy = np.where(g == 255, 1, np.where(g == 128, -1, 0)).astype(np.int8)
    np.save(tmp_path / "gt.npy", npy)
    f = npy.astype(float)
    f[f == -1] = np.nan
    np.save(tmp_path / "gt_nan.npy", f)
    gts = [load_sequence_gt(tmp_path / n, 24) for n in ("gt.bmp", "gt.npy", "gt_nan.npy")]
    assert gts[0] == gts[1] == gts[2] and gts[0].ignore == gts[1].ignore == gts[2].ignore
    assert gts[0][5] == set() and gts[0].ignore[5] == {4} and gts[0][13] == {1}

    def rec(i: int, m: int, s: float) -> KeyframeRecord:
        return KeyframeRecord(i, i * 10**9, m, s, 0.0, 0, 0, [m] if m >= 0 else [])

    match = {i: i - 12 for i in range(12, 23)} | {23: 5, 3: 2}
    score = {23: 0.4, 3: 0.6}  # the false positive ranks last, the loop into grey first
    records = [rec(i, match.get(i, -1), score.get(i, 0.5) if i in match else 0.0) for i in range(24)]
    result = ReplayResult(records, 24, [r.stamp_ns for r in records], 1.0, 0.0, 0.0, {})
    m = compute_metrics(result, gts[0], 0.3)
    at = m["at_threshold"]
    assert (at["reported"], at["true_positives"], at["positives"]) == (12, 11, 12)
    assert at["recall"] == 11 / 12 and round(at["recall"], 3) == 0.917 and at["precision"] == 11 / 12
    assert m["ground_truth"]["ignored_loops_at_threshold"] == 1
    assert m["recall_at_100_precision"] == 11 / 12 and m["average_precision"] == 11 / 12  # grey 0.6 is no FP
    with pytest.raises(GroundTruthError, match=r"value 2 at row 0, column 1: a .npy matrix holds 1 \(loop\)"):
        bad = np.zeros((3, 3), np.uint8)
        bad[0, 1] = 2
        np.save(tmp_path / "bad.npy", bad)
        load_sequence_gt(tmp_path / "bad.npy", 3)


def test_query_db_ignore(tmp_path: Path) -> None:
    """A (Q, DB) image with grey: a query marked only grey has no positive; grey predictions are passed over."""
    from PIL import Image

    Image.fromarray(np.array([[255, 128, 0], [0, 128, 0]], np.uint8)).save(tmp_path / "m.png")
    gt = load_ground_truth(tmp_path / "m.png", ["a", "b"], ["x", "y", "z"])
    assert gt.positives == [{0}, set()] and gt.ignore == [{1}, {1}]
    assert recall_at_n([[1, 0], [1, 2]], gt, (1, 2)) == {1: 1.0, 2: 1.0}


def test_exclusion_window_positives_are_unfindable(tmp_path: Path) -> None:
    """A keyframe whose positives all lie in the exclusion window is not counted in recall, and is reported."""
    import json

    from pnv_ros.eval.ground_truth import SequenceGT
    from pnv_ros.eval.replay import KeyframeRecord, ReplayResult
    from pnv_ros.eval.report import write_run

    def rec(i: int, m: int, s: float) -> KeyframeRecord:
        return KeyframeRecord(i, i * 10**9, m, s, 0.0, 0, 0, [m] if m >= 0 else [])

    gt = SequenceGT([set(), set(), set(), {0}, set(), {4}])  # frame 5's only positive is 1 s old
    records = [rec(0, -1, 0), rec(1, -1, 0), rec(2, -1, 0), rec(3, 0, 0.5), rec(4, -1, 0), rec(5, -1, 0)]
    for window in (
        {"exclude_recent_s": 2.0, "exclude_recent_keyframes": 0},
        {"exclude_recent_s": 0.0, "exclude_recent_keyframes": 2},
    ):
        result = ReplayResult(records, 6, [r.stamp_ns for r in records], 1.0, 0.0, 0.0, {}, **window)
        out = tmp_path / str(window["exclude_recent_keyframes"])
        out.mkdir()
        m = write_run(out, result, gt, 0.3, {})
        assert m["at_threshold"]["recall"] == 1.0 and m["at_threshold"]["positives"] == 1  # was 0.5
        un = m["ground_truth"]["unfindable"]
        assert un["exclusion_window"] == {"count": 1, "frames": [5]} and un["not_keyframes"]["count"] == 0
        assert json.loads((out / "metrics.json").read_text())["ground_truth"]["unfindable"] == un
        report = (out / "report.md").read_text()
        assert "positives all lie in the exclusion window" in report and "frames 5." in report


# -- found by trying it out: ground truth that made every metric silently wrong -------------------------------------


def test_ground_truth_without_any_positive_is_an_error(tmp_path: Path) -> None:
    from PIL import Image

    from pnv_ros.eval.ground_truth import load_sequence_gt

    g = np.zeros((6, 6), np.uint8)
    g[4, 1] = g[5, 2] = 1
    np.save(tmp_path / "t.npy", g.T)  # transposed: loops above the diagonal
    with pytest.raises(GroundTruthError, match="its 2 loops lie above it.*transpose"):
        load_sequence_gt(tmp_path / "t.npy", 6)
    np.save(tmp_path / "g.npy", g)
    assert load_sequence_gt(tmp_path / "g.npy", 6)[4] == {1}
    Image.fromarray(g).save(tmp_path / "g01.png")  # cv2.imwrite(G) of a 0/1 matrix: every loop would be "ignore"
    with pytest.raises(GroundTruthError, match="only 0 and 1.*255"):
        load_sequence_gt(tmp_path / "g01.png", 6)
    with pytest.raises(GroundTruthError, match="only 0 and 1"):
        load_ground_truth(tmp_path / "g01.png", [str(i) for i in range(1, 7)], [str(i) for i in range(1, 7)])
    np.save(tmp_path / "z.npy", np.zeros((2, 3)))
    with pytest.raises(GroundTruthError, match="marks no loop"):
        load_ground_truth(tmp_path / "z.npy", ["a", "b"], ["c", "d", "e"])
    np.save(tmp_path / "v.npy", np.array([0, 2, 1]))  # 1-D: a traceback (IndexError) before
    with pytest.raises(GroundTruthError, match="not 2-D"):
        load_ground_truth(tmp_path / "v.npy", ["a"], ["b"])


def test_positions_must_be_finite_and_numbering_stated(tmp_path: Path) -> None:
    from pnv_ros.eval.ground_truth import load_sequence_gt

    p = tmp_path / "pos.csv"
    p.write_text("name,x,y\nq0,0,0\nd0,nan,0\nd1,0.5,0\n")
    with pytest.raises(GroundTruthError, match="row 3: position"):
        load_ground_truth(p, ["q0"], ["d0", "d1"], radius=2.0)
    # numbered files, no query_index: 0-based positions or file numbers? Not guessed.
    c = tmp_path / "seq.csv"
    c.write_text(
        "query_file,positive_indices\n" + "".join(f"images/{i}.jpg,{'1 2' if i == 4 else ''}\n" for i in range(1, 5))
    )
    with pytest.raises(GroundTruthError, match="--gt-index-base"):
        load_sequence_gt(c, 4)
    assert load_sequence_gt(c, 4, index_base=1)[3] == {0, 1}
    assert load_sequence_gt(c, 4, index_base=0)[3] == {1, 2}
