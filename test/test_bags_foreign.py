"""Bags not written by make_bag: ROS 1 bags, ROS 2 bags with other distros' or
custom types, bags without stored definitions, and broken files. All real
bags written with rosbags' own writers."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import RTAB, rtab_frame
from PIL import Image

from pnv_ros.bags import T0_NS, BagError, BagReader, make_bag

PNV = str(Path(sys.executable).parent / "pnv")
FRAMES = [1, 2, 3, 10]


def rgb(i: int) -> np.ndarray:
    return np.asarray(Image.open(rtab_frame(i)).convert("RGB"))


def stamp(k: int) -> int:
    return T0_NS + k * 500_000_000  # 2 Hz


def header(T, k: int, **seq: int):  # noqa: N803
    t = stamp(k)
    return T["std_msgs/msg/Header"](
        **seq, stamp=T["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=t % 10**9), frame_id="cam"
    )


def write_ros1(path: Path, frames: list[int], compressed: bool = False, rosout: bool = False) -> Path:
    """A ROS 1 bag: frames as Image (rgb8) or CompressedImage (the jpg bytes) on
    /cam/image, Odometry at (k, 2k, 0) on /odom, optionally a rosgraph_msgs/Log."""
    from rosbags.convert.converter import default_message
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS1_NOETIC)
    T = ts.types  # noqa: N806
    itype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    with Writer(path) as w:
        ci = w.add_connection("/cam/image", itype, typestore=ts)
        co = w.add_connection("/odom", "nav_msgs/msg/Odometry", typestore=ts)
        cl = w.add_connection("/rosout", "rosgraph_msgs/msg/Log", typestore=ts) if rosout else None
        for k, f in enumerate(frames):
            t, hdr = stamp(k), header(T, k, seq=k)
            if compressed:
                msg = T[itype](header=hdr, format="jpeg", data=np.frombuffer(rtab_frame(f).read_bytes(), np.uint8))
            else:
                a = rgb(f)
                msg = T[itype](
                    header=hdr,
                    height=a.shape[0],
                    width=a.shape[1],
                    encoding="rgb8",
                    is_bigendian=0,
                    step=a.shape[1] * 3,
                    data=a.reshape(-1),
                )
            w.write(ci, t, ts.serialize_ros1(msg, itype))
            odom = default_message(ts, "nav_msgs/msg/Odometry")
            odom.header.stamp, odom.pose.pose.position.x, odom.pose.pose.position.y = hdr.stamp, float(k), 2.0 * k
            w.write(co, t, ts.serialize_ros1(odom, "nav_msgs/msg/Odometry"))
            if cl is not None:
                log = T["rosgraph_msgs/msg/Log"](
                    header=hdr, level=2, name="/x", msg="hi", file="f", function="g", line=1, topics=[]
                )
                w.write(cl, t, ts.serialize_ros1(log, "rosgraph_msgs/msg/Log"))
    return path


@pytest.mark.parametrize("compressed", [False, True])
def test_ros1_bag(tmp_path: Path, compressed: bool) -> None:
    bag = write_ros1(tmp_path / "r1.bag", FRAMES, compressed)
    with BagReader(bag) as r:
        assert (r.topic, r.count) == ("/cam/image", 4)
        assert r.topics()["/odom"] == "nav_msgs/msg/Odometry"
        assert r.msgtype == ("sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image")
        fr = list(r.frames())
    assert [f.stamp_ns for f in fr] == [stamp(k) for k in range(4)]
    assert {f.frame_id for f in fr} == {"cam"}
    for k, f in enumerate(FRAMES):
        want = cv2.imread(str(rtab_frame(f)))[:, :, ::-1] if compressed else rgb(f)
        np.testing.assert_array_equal(fr[k].rgb, want)
        np.testing.assert_allclose(fr[k].position, [k, 2 * k, 0])


def test_ros1_raw_messages_are_ros2_cdr(tmp_path: Path) -> None:
    """raw_messages of a ROS 1 bag are ROS 2 CDR (Header without seq): rclpy reads them."""
    from nav_msgs.msg import Odometry
    from rclpy.serialization import deserialize_message
    from sensor_msgs.msg import Image as RosImage

    bag = write_ros1(tmp_path / "r1.bag", FRAMES[:2])
    with BagReader(bag) as r:
        msgs = list(r.raw_messages())
        assert [m[0] for m in msgs] == ["/cam/image", "/odom"] * 2
        assert r.ts.deserialize_cdr(msgs[2][3], "sensor_msgs/msg/Image").header.frame_id == "cam"
    img = deserialize_message(msgs[2][3], RosImage)
    assert (img.header.stamp.sec * 10**9 + img.header.stamp.nanosec, img.header.frame_id) == (stamp(1), "cam")
    assert bytes(img.data) == rgb(FRAMES[1]).tobytes()
    assert deserialize_message(msgs[3][3], Odometry).pose.pose.position.y == 2.0


@pytest.fixture
def ros_context():
    rclpy = pytest.importorskip("rclpy")
    rclpy.init()
    yield rclpy
    rclpy.try_shutdown()


def test_player_converts_ros1_bag(tmp_path: Path, ros_context) -> None:
    """BagPlayer publishes a ROS 1 bag as ROS 2 CDR; a type ROS 2 lacks is skipped unless asked for."""
    from rclpy.serialization import deserialize_message

    from pnv_ros.ros.player import BagPlayer

    bag = write_ros1(tmp_path / "r1.bag", FRAMES, compressed=True, rosout=True)
    player = BagPlayer(bag)
    try:
        assert set(player.pubs) == {"/cam/image", "/odom"}
        assert player.skipped == {"/rosout": "rosgraph_msgs/msg/Log"}
        msgs = list(player.messages())
        cls = player.pubs["/cam/image"].msg_type
        imgs = [deserialize_message(raw, cls) for topic, _, _, raw in msgs if topic == "/cam/image"]
    finally:
        player.close()
    assert len(msgs) == 8 and [i.header.stamp.nanosec for i in imgs] == [0, 500_000_000] * 2
    assert [i.format for i in imgs] == ["jpeg"] * 4
    assert bytes(imgs[3].data) == rtab_frame(FRAMES[3]).read_bytes()
    with pytest.raises(BagError, match="rosgraph_msgs/msg/Log is not available"):
        BagPlayer(bag, topics=["/rosout"])


def test_ros2_bag_with_jazzy_and_custom_types(tmp_path: Path) -> None:
    """A ROS 2 bag recorded with Jazzy's types (sensor_msgs/Range gained ``variance``)
    and a custom type reads with the definitions it stores, not Humble's."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    ts.register(get_types_from_msg("string label\nfloat64[3] xyz", "pnv_test/msg/Tag"))
    T = ts.types  # noqa: N806
    bag = tmp_path / "jazzy"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        ci = w.add_connection("/cam/image", "sensor_msgs/msg/Image", typestore=ts)
        cr = w.add_connection("/range", "sensor_msgs/msg/Range", typestore=ts)
        ct = w.add_connection("/tag", "pnv_test/msg/Tag", typestore=ts)
        for k, f in enumerate(FRAMES[:2]):
            t, hdr = stamp(k), header(T, k)
            a = rgb(f)
            img = T["sensor_msgs/msg/Image"](
                header=hdr,
                height=a.shape[0],
                width=a.shape[1],
                encoding="rgb8",
                is_bigendian=0,
                step=a.shape[1] * 3,
                data=a.reshape(-1),
            )
            w.write(ci, t, ts.serialize_cdr(img, "sensor_msgs/msg/Image"))
            rng = T["sensor_msgs/msg/Range"](
                header=hdr,
                radiation_type=0,
                field_of_view=0.5,
                min_range=0.1,
                max_range=4.0,
                range=1.5 + k,
                variance=0.25,
            )
            w.write(cr, t, ts.serialize_cdr(rng, "sensor_msgs/msg/Range"))
            w.write(
                ct,
                t,
                ts.serialize_cdr(T["pnv_test/msg/Tag"](label=f"t{k}", xyz=np.array([k, 0, 1.0])), "pnv_test/msg/Tag"),
            )
    with BagReader(bag) as r:
        assert r.topics() == {
            "/cam/image": "sensor_msgs/msg/Image",
            "/range": "sensor_msgs/msg/Range",
            "/tag": "pnv_test/msg/Tag",
        }
        fr = list(r.frames())
        raw = {(topic, t): b for topic, _, t, b in r.raw_messages(["/range", "/tag"])}
        ranges = [r.ts.deserialize_cdr(raw["/range", stamp(k)], "sensor_msgs/msg/Range") for k in range(2)]
        tag = r.ts.deserialize_cdr(raw["/tag", stamp(1)], "pnv_test/msg/Tag")
    assert [f.stamp_ns for f in fr] == [stamp(0), stamp(1)]
    np.testing.assert_array_equal(fr[1].rgb, rgb(FRAMES[1]))
    assert [(m.range, m.variance) for m in ranges] == [(1.5, 0.25), (2.5, 0.25)]
    assert tag.label == "t1" and list(tag.xyz) == [1, 0, 1]


def test_bag_without_definitions_uses_humble(tmp_path: Path) -> None:
    """Older rosbags writers stored no definitions: Humble's types decode them."""
    bag = tmp_path / "old"
    make_bag([rtab_frame(f) for f in FRAMES[:2]], bag, fmt="sqlite3")
    db = next(bag.glob("*.db3"))
    with sqlite3.connect(db) as c:
        c.execute("DELETE FROM message_definitions")
    with BagReader(bag) as r:
        fr = list(r.frames())
    np.testing.assert_array_equal(fr[1].rgb, rgb(FRAMES[1]))


def test_ros2_folder_named_like_ros1(tmp_path: Path) -> None:
    """AnyReader takes a path ending in .bag for ROS 1; a ROS 2 bag folder may be named so too."""
    make_bag([rtab_frame(f) for f in FRAMES[:2]], tmp_path / "b.bag", fmt="sqlite3")
    assert len(_read(tmp_path / "b.bag")) == 2


def _read(path: Path) -> list:
    with BagReader(path) as r:
        return list(r.frames())


def test_broken_bags(tmp_path: Path) -> None:
    good = write_ros1(tmp_path / "good.bag", FRAMES)
    cases = {
        "empty.bag": (b"", r"empty.bag cannot be read: AnyReaderError: .*seems to be empty"),
        "junk.bag": (b"#ROSBAG V2.0\n" + b"x" * 200, r"junk.bag cannot be read: AnyReaderError: Header"),
        "cut.bag": (good.read_bytes()[: good.stat().st_size // 2], r"cut.bag cannot be read: "),
        "junk.mcap": (b"not an mcap", r"junk.mcap cannot be read: AnyReaderError: File magic is invalid"),
        "junk.db3": (b"not a db", r"junk.db3 cannot be read: .*not a database"),
        "notes.txt": (b"hi", r"notes.txt cannot be read: .*Unrecognized storage format '.txt'"),
    }
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BagError, match=msg):
            _read(tmp_path / name)
    (tmp_path / "nometa").mkdir()
    with pytest.raises(BagError, match=r"nometa cannot be read: a ROS 2 bag folder needs metadata.yaml"):
        _read(tmp_path / "nometa")
    (tmp_path / "r1.bag.active").write_bytes(good.read_bytes())
    with pytest.raises(BagError, match=r"r1.bag.active cannot be read: it is a ROS 1 bag, which must be named \*\.bag"):
        _read(tmp_path / "r1.bag.active")
    with pytest.raises(BagError, match=r"missing.bag does not exist"):
        _read(tmp_path / "missing.bag")
    # a real mcap cut part-way: an error on open or while reading, never a rosbags traceback
    make_bag([rtab_frame(f) for f in FRAMES], tmp_path / "m")
    mcap = next((tmp_path / "m").glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    with pytest.raises(BagError, match=r"m\.mcap cannot be read: "):
        _read(mcap)
    assert len(_read(good)) == 4


@pytest.mark.slow
def test_eval_on_ros1_bag(tmp_path: Path) -> None:
    """pnv eval runs end to end on a ROS 1 bag: every frame, at its stamp, becomes a keyframe."""
    frames = [1, 2, 3, 4, 41, 42, 43, 44]  # a lap's start and its revisit (GT: 41 ~ 1, 2, 3)
    bag = write_ros1(tmp_path / "seq.bag", frames)
    idx = np.array(frames) - 1
    gt = tmp_path / "gt.npy"
    np.save(gt, np.load(RTAB.parent / "gt_matrix.npy")[np.ix_(idx, idx)])
    out = tmp_path / "run"
    args = [
        PNV,
        "eval",
        str(bag),
        "--gt",
        str(gt),
        "--out",
        str(out),
        "-q",
        "--exclude-recent",
        "1.5",
        "--exclude-recent-keyframes",
        "1",
    ]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["mode"], m["topic"], m["frames"], m["keyframes"]) == ("in-process", "/cam/image", 8, 8)
    assert m["at_threshold"]["positives"] == 4  # the revisits, all findable outside the exclusion windows
    assert m["at_threshold"]["true_positives"] >= 3
    with open(out / "loop_closures.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(x["stamp_ns"]) for x in rows] == [stamp(k) for k in range(8)]
