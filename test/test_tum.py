"""The TUM RGB-D reader (pnv_ros.tum) on data/tum_fr1_desk_pairs (16 real fr1/desk frames): the TUM layout
(rgb.txt + depth.txt, made here from the set's associations.txt), associate.py's pairing rule, trajectory files,
and the errors of malformed lists and missing depth frames, each naming its file and line."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pnv_ros.errors import PnvError
from pnv_ros.tum import (
    DEPTH_UNITS_PER_M,
    TumError,
    associate,
    load_depth_mm,
    read_associations,
    read_file_list,
    read_sequence,
    read_trajectory,
    write_trajectory,
)

PAIRS = Path(__file__).resolve().parents[1] / "data" / "tum_fr1_desk_pairs"


def tum_copy(dst: Path) -> Path:
    """A TUM layout of the 16 frames: rgb/ and depth/ copied, rgb.txt and depth.txt written from associations.txt
    (TUM's own files list colour and depth apart), no associations.txt."""
    shutil.copytree(PAIRS / "rgb", dst / "rgb")
    shutil.copytree(PAIRS / "depth", dst / "depth")
    shutil.copy(PAIRS / "groundtruth_at_rgb.txt", dst / "groundtruth.txt")
    rows = [ln.split() for ln in (PAIRS / "associations.txt").read_text().splitlines() if not ln.startswith("#")]
    (dst / "rgb.txt").write_text("# colour images\n# timestamp filename\n" + "".join(f"{r[0]} {r[1]}\n" for r in rows))
    (dst / "depth.txt").write_text("# depth images\n# timestamp filename\n" + "".join(f"{r[2]} {r[3]}\n" for r in rows))
    return dst


def test_tum_layout_pairs_colour_and_depth_as_the_association_file(tmp_path: Path) -> None:
    seq = read_sequence(tum_copy(tmp_path / "tum"))
    ref = read_associations(PAIRS / "associations.txt")
    assert len(seq.frames) == len(ref) == 16 and not seq.unpaired
    for f, r in zip(seq.frames, ref):
        assert (f.stamp, f.depth_stamp) == (r.stamp, r.depth_stamp)
        assert (f.rgb.name, f.depth.name) == (r.rgb.name, r.depth.name) and f.rgb.is_file() and f.depth.is_file()
        assert abs(f.stamp - f.depth_stamp) < 0.02
    assert [f.stamp for f in seq.frames] == sorted(f.stamp for f in seq.frames)
    assert len(read_sequence(PAIRS).frames) == 16  # no rgb.txt / depth.txt: associations.txt


def test_associate_takes_the_closest_pairs_first_each_image_once() -> None:
    # 0.010 and 0.012 are the closest pair, so 0.0 finds its only neighbour taken; 1.0-1.019 is inside 0.02,
    # 2.0-2.02 is not (associate.py: strictly closer than max_difference)
    assert associate([0.0, 0.010, 1.0, 2.0], [0.012, 0.5, 1.019, 2.02]) == [(1, 0), (2, 2)]
    assert associate([0.0, 1.0], [0.05, 1.05], max_dt=0.1) == [(0, 0), (1, 1)]
    assert associate([], [1.0]) == []


def test_colour_without_depth_is_left_out_and_reported(tmp_path: Path) -> None:
    d = tum_copy(tmp_path / "tum")
    lines = (d / "depth.txt").read_text().splitlines()
    dropped = lines.pop(5)  # the 4th image's depth line
    (d / "depth.txt").write_text("\n".join(lines) + "\n")
    seq = read_sequence(d)
    assert len(seq.frames) == 15 and len(seq.unpaired) == 1
    rgb_line = (d / "rgb.txt").read_text().splitlines()[5]
    assert seq.unpaired[0].stamp == float(rgb_line.split()[0]) and seq.unpaired[0].where.endswith("rgb.txt:6")
    assert float(dropped.split()[0]) not in {f.depth_stamp for f in seq.frames}


def test_missing_depth_frame_is_an_error_naming_the_line(tmp_path: Path) -> None:
    d = tum_copy(tmp_path / "tum")
    name = (d / "depth.txt").read_text().splitlines()[4].split()[1]
    (d / name).unlink()
    with pytest.raises(TumError, match=rf"depth\.txt:5: {name} does not exist \(a missing image"):
        read_sequence(d)
    a = tmp_path / "assoc"
    shutil.copytree(PAIRS, a)
    depth = (a / "associations.txt").read_text().splitlines()[3].split()[3]
    (a / depth).unlink()
    with pytest.raises(TumError, match=rf"associations\.txt:4: depth image {depth} does not exist"):
        read_sequence(a)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1305031470.0 rgb/x.jpg 1305031470.01", r"associations\.txt:18: need 'rgb_stamp rgb_file depth_stamp"),
        ("13050314x0.0 rgb/x.jpg 1305031470.01 depth/x.png", r"associations\.txt:18: colour timestamp '13050314x0"),
        ("1305031470.0 rgb/x.jpg nan depth/x.png", r"associations\.txt:18: depth timestamp 'nan' is not a number"),
    ],
)
def test_malformed_association_file(tmp_path: Path, line: str, message: str) -> None:
    a = tmp_path / "assoc"
    shutil.copytree(PAIRS, a)
    with open(a / "associations.txt", "a") as f:
        f.write(line + "\n")
    with pytest.raises(TumError, match=message):
        read_sequence(a)


def test_association_too_far_apart_or_twice(tmp_path: Path) -> None:
    a = tmp_path / "assoc"
    shutil.copytree(PAIRS, a)
    lines = (a / "associations.txt").read_text().splitlines()
    r = lines[1].split()
    (a / "associations.txt").write_text("\n".join([lines[0], f"{r[0]} {r[1]} {float(r[0]) + 0.05:.6f} {r[3]}"]))
    with pytest.raises(TumError, match=r"associations\.txt:2: colour and depth are 0\.050 s apart"):
        read_associations(a / "associations.txt")
    (a / "associations.txt").write_text("\n".join([lines[0], lines[1], lines[1]]))
    with pytest.raises(TumError, match=r"associations\.txt:3: colour stamp .* listed twice"):
        read_associations(a / "associations.txt")


def test_malformed_lists_and_folders(tmp_path: Path) -> None:
    d = tum_copy(tmp_path / "tum")
    text = (d / "rgb.txt").read_text()
    (d / "rgb.txt").write_text(text + "1305031999.5\n")
    with pytest.raises(TumError, match=r"rgb\.txt:19: need 'timestamp filename', got '1305031999\.5'"):
        read_file_list(d / "rgb.txt")
    first = text.splitlines()[2]
    (d / "rgb.txt").write_text(text + first + "\n")
    with pytest.raises(TumError, match=r"rgb\.txt:19: stamp .* listed twice \(first at .*rgb\.txt:3\)"):
        read_sequence(d)
    (d / "rgb.txt").write_text("# nothing\n")
    with pytest.raises(TumError, match="lists no image"):
        read_sequence(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TumError, match="not a TUM RGB-D folder: it needs rgb.txt and depth.txt"):
        read_sequence(tmp_path / "empty")
    with pytest.raises(TumError, match="does not exist"):
        read_sequence(tmp_path / "nowhere")
    assert issubclass(TumError, PnvError)


def test_trajectory_file_reads_writes_and_fits_the_colour_stamps(tmp_path: Path) -> None:
    gt = read_trajectory(PAIRS / "groundtruth_at_rgb.txt")
    frames = read_associations(PAIRS / "associations.txt")
    assert len(gt) == 16 and np.array_equal(gt.stamps, [f.stamp for f in frames])
    assert np.allclose(np.linalg.norm(gt.quaternions, axis=1), 1.0)
    row = (PAIRS / "groundtruth_at_rgb.txt").read_text().splitlines()[1].split()
    assert np.allclose(gt.positions[0], [float(v) for v in row[1:4]])
    write_trajectory(tmp_path / "t.txt", gt, "a copy")
    back = read_trajectory(tmp_path / "t.txt")
    assert np.allclose(back.stamps, gt.stamps, atol=1e-6) and np.allclose(back.positions, gt.positions, atol=1e-6)
    assert np.allclose(back.quaternions, gt.quaternions, atol=2e-6)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1305031470.5 1 2 3 0 0 0", r"t\.txt:3: a TUM trajectory line is .* \(8 numbers\), got 7"),
        ("1305031470.5 1 2 3 0 0 0 2", r"t\.txt:3: quaternion qx qy qz qw = \[0\.0, 0\.0, 0\.0, 2\.0\] has norm 2"),
        ("1305031400.5 1 2 3 0 0 0 1", r"t\.txt:3: stamp 1305031400\.5 does not come after .*t\.txt:2"),
        ("1305031470.5 1 2 x 0 0 0 1", r"t\.txt:3: value 'x' is not a number"),
    ],
)
def test_malformed_trajectory_file(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "t.txt").write_text("# t tx ty tz qx qy qz qw\n1305031460.0 0 0 0 0 0 0 1\n" + row + "\n")
    with pytest.raises(TumError, match=message):
        read_trajectory(tmp_path / "t.txt")
    (tmp_path / "t.txt").write_text("# only a comment\n")
    with pytest.raises(TumError, match="holds no pose"):
        read_trajectory(tmp_path / "t.txt")


def test_depth_png_to_millimetres() -> None:
    f = read_associations(PAIRS / "associations.txt")[0]
    raw = cv2.imread(str(f.depth), cv2.IMREAD_UNCHANGED)
    mm = load_depth_mm(f.depth)
    assert mm.dtype == np.uint16 and mm.shape == raw.shape == (480, 640)
    valid = raw > 0
    assert valid.mean() > 0.5 and np.array_equal(mm == 0, ~valid)
    # 5000 units per metre -> millimetres: within half a millimetre, median desk distance about 1-2 m
    assert np.abs(mm[valid] - raw[valid] * 1000.0 / DEPTH_UNITS_PER_M).max() <= 0.5
    assert 500 < np.median(mm[valid]) < 3000
    with pytest.raises(TumError, match="16-bit single-channel PNG"):
        load_depth_mm(f.rgb)
