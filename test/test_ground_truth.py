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
