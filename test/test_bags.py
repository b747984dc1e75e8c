"""Real ROS 2 bags written and read with rosbags; bad bags and bad GT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import RTAB, rtab_frame
from PIL import Image

from pnv_ros.bags import BagError, BagReader, make_bag
from pnv_ros.errors import GroundTruthError
from pnv_ros.eval.ground_truth import load_sequence_gt


@pytest.fixture
def frames_dir(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in (1, 2, 3, 10):  # numeric order: 1, 2, 3, 10
        (d / f"{i}.jpg").symlink_to(rtab_frame(i))
    return d


@pytest.mark.parametrize("fmt", ["mcap", "sqlite3"])
@pytest.mark.parametrize("compressed", [False, True])
def test_roundtrip(frames_dir: Path, tmp_path: Path, fmt: str, compressed: bool) -> None:
    bag = tmp_path / f"b_{fmt}_{compressed}"
    poses = tmp_path / "poses.csv"
    poses.write_text("name,x,y\n1,0,0\n2,1,0\n3,2,0\n10,3,1\n")
    n = make_bag(frames_dir, bag, fmt=fmt, rate=2.0, compressed=compressed, topic="/cam/img", poses=poses)
    assert n == 8
    with BagReader(bag) as r:
        assert r.topic == "/cam/img" and r.count == 4
        assert set(r.topics()) == {"/cam/img", "/odom"}
        fr = list(r.frames())
    assert [f.index for f in fr] == [0, 1, 2, 3]
    assert fr[1].stamp_ns - fr[0].stamp_ns == 500_000_000  # 2 Hz
    want = np.asarray(Image.open(rtab_frame(10)).convert("RGB")).astype(int)
    got = fr[3].rgb.astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < (3 if compressed else 0.001)  # jpeg bytes kept as they are
    np.testing.assert_allclose(fr[3].position, [3, 1, 0])


def test_cdr_equals_rclpy(frames_dir: Path, tmp_path: Path) -> None:
    """Bags are replayable by publishing raw bytes: rclpy reads rosbags' CDR
    (byte equality is not expected: rclpy leaves alignment padding uninitialised)."""
    rclpy_ser = pytest.importorskip("rclpy.serialization")
    from sensor_msgs.msg import Image as RosImage

    bag = tmp_path / "b"
    make_bag(frames_dir, bag)
    with BagReader(bag) as r:
        _, _, _, raw = next(r.raw_messages())
    msg = rclpy_ser.deserialize_message(raw, RosImage)
    assert (msg.width, msg.height, msg.encoding) == (512, 384, "rgb8")
    assert bytes(msg.data) == np.asarray(Image.open(rtab_frame(1)).convert("RGB")).tobytes()
    again = rclpy_ser.deserialize_message(rclpy_ser.serialize_message(msg), RosImage)
    assert again.header.stamp == msg.header.stamp and bytes(again.data) == bytes(msg.data)


def test_bad_bags(frames_dir: Path, tmp_path: Path) -> None:
    bag = tmp_path / "b"
    make_bag(frames_dir, bag, topic="/cam/img")
    with pytest.raises(BagError, match=r"no image topic '/other'; its topics: /cam/img \(sensor_msgs/msg/Image\)"):
        BagReader(bag, "/other")
    with pytest.raises(BagError, match="exists"):
        make_bag(frames_dir, bag)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 99}\n")
    with pytest.raises(BagError, match=r"broken cannot be read"):
        BagReader(broken)
    with pytest.raises(BagError, match="does not exist"):
        BagReader(tmp_path / "nope")
    with pytest.raises(BagError, match="no pose"):
        p = tmp_path / "p.csv"
        p.write_text("name,x,y\n1,0,0\n")
        make_bag(frames_dir, tmp_path / "b2", poses=p)


def test_sequence_ground_truth(tmp_path: Path) -> None:
    gt = load_sequence_gt(RTAB.parent / "gt_matrix.npy", 84)
    assert gt[40] == {0, 1, 2} and gt[10] == set()
    assert load_sequence_gt(RTAB.parent / "gt.csv", 84) == gt == load_sequence_gt(RTAB.parent / "samples_GT.bmp", 84)
    with pytest.raises(GroundTruthError, match=r"\(84, 84\) matrix but the sequence has 90 frames"):
        load_sequence_gt(RTAB.parent / "gt_matrix.npy", 90)
    pos = tmp_path / "pos.csv"
    pos.write_text("x,y\n0,0\n5,0\n0.5,0\n")
    assert load_sequence_gt(pos, 3, radius=1.0) == [set(), set(), {0}]
    with pytest.raises(GroundTruthError, match="marks no loop within 1 of an earlier frame"):
        load_sequence_gt(pos, 3, radius=1.0, min_gap_s=5.0)  # no positive at all: every recall undefined
