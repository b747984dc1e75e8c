"""ROS bags through ``rosbags`` (pure Python; no rosbag2 needed).

Writes image sequences as real ROS 2 bags (mcap or sqlite3) with
sensor_msgs/Image or CompressedImage and, with poses, nav_msgs/Odometry, and
reads ROS 1 and ROS 2 bags back as frames, with the message definitions the
bag carries. ROS 2 CDR bytes equal rclpy's, so a bag can be replayed by
publishing the raw bytes; a ROS 1 bag's are converted to CDR first.
"""

from __future__ import annotations

import csv
import re
import shutil
import tempfile
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnv_ros.errors import PnvError
from pnv_ros.images import decode_bytes, list_images, load_image


class BagError(PnvError):
    """A bag cannot be written or read, or lacks what is asked of it."""


IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
ODOM_TYPE = "nav_msgs/msg/Odometry"
#: Bags start at this wall-clock time (2023-11-14) so stamps look like a robot's.
T0_NS = 1_700_000_000_000_000_000


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


@dataclass
class Frame:
    """One image from a bag. rgb: (H, W, 3) uint8, or None for a message that cannot be
    decoded (``error`` says why; stamp_ns is then the header's, or the bag time when
    the message itself cannot be deserialised); position: (3,) or None."""

    index: int
    stamp_ns: int
    rgb: np.ndarray | None
    frame_id: str
    position: np.ndarray | None = None
    error: str | None = None


def read_poses(path: Path) -> dict[str, np.ndarray]:
    """Poses CSV ``name,x,y[,z]`` (name = image file stem) to positions."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {r["name"]: np.array([float(r["x"]), float(r["y"]), float(r.get("z") or 0.0)]) for r in rows}
    except (OSError, KeyError, ValueError) as e:
        raise BagError(f"poses file {path}: need columns name,x,y[,z] ({e})") from None


#: A ROS 2 topic name (absolute or relative), without substitutions (rcl's rules, simplified).
_TOPIC = re.compile(r"/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")


def make_bag(
    images_dir: Path | list[Path],
    out: Path,
    *,
    fmt: str = "mcap",
    rate: float = 1.0,
    compressed: bool = False,
    topic: str = "/camera/image",
    poses: Path | None = None,
    frame_id: str = "camera",
    odom_topic: str = "/odom",
) -> int:
    """Write images (in frame order) as a ROS 2 bag; returns the message count."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    if rate <= 0:
        raise BagError(f"rate {rate} must be positive")
    for name in (topic, odom_topic):
        if not _TOPIC.fullmatch(name):
            raise BagError(
                f"topic {name!r} is not a ROS topic name (e.g. /camera/image: letters, digits and _, "
                f"separated by /, no part starting with a digit)"
            )
    if fmt not in ("mcap", "sqlite3"):
        raise BagError(f"format {fmt!r}: use mcap or sqlite3")
    paths = list_images(images_dir if isinstance(images_dir, list) else [images_dir])
    pos = read_poses(poses) if poses else None
    if pos is not None:
        missing = [p.stem for p in paths if p.stem not in pos]
        if missing:
            raise BagError(f"poses file {poses} has no pose for {len(missing)} image(s), e.g. {missing[:3]}")
    if out.exists():
        raise BagError(f"{out} exists: choose a new bag path")
    ts = _typestore()
    T = ts.types  # noqa: N806
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]  # noqa: N806
    plugin = StoragePlugin.MCAP if fmt == "mcap" else StoragePlugin.SQLITE3
    # Written in a temp folder beside ``out`` and renamed at the end: a failure (a bad image, a full
    # disk) leaves no half bag behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        count = 0
        with Writer(staging / out.name, version=8, storage_plugin=plugin) as w:
            itype = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]
            conn = w.add_connection(topic, itype, typestore=ts)
            oconn = w.add_connection(odom_topic, ODOM_TYPE, typestore=ts) if pos is not None else None
            for i, p in enumerate(paths):
                t = T0_NS + int(round(i * 1e9 / rate))
                stamp = Time(sec=t // 1_000_000_000, nanosec=t % 1_000_000_000)
                header = Header(stamp=stamp, frame_id=frame_id)
                if compressed:
                    if p.suffix.lower() in (".jpg", ".jpeg"):
                        data = p.read_bytes()  # as it is (EXIF included), once the one decoder reads it
                        decode_bytes(data, str(p))
                    else:
                        data = _jpeg(p)
                    msg = T[itype](header=header, format="jpeg", data=np.frombuffer(data, np.uint8))
                else:
                    rgb = np.asarray(load_image(p))
                    msg = T[itype](
                        header=header,
                        height=rgb.shape[0],
                        width=rgb.shape[1],
                        encoding="rgb8",
                        is_bigendian=0,
                        step=rgb.shape[1] * 3,
                        data=rgb.reshape(-1),
                    )
                w.write(conn, t, ts.serialize_cdr(msg, itype))
                count += 1
                if oconn is not None and pos is not None:
                    w.write(oconn, t, ts.serialize_cdr(_odom(T, header, pos[p.stem]), ODOM_TYPE))
                    count += 1
        (staging / out.name).rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count


def _jpeg(p: Path) -> bytes:
    import io

    buf = io.BytesIO()
    load_image(p).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _odom(T, header, xyz: np.ndarray):  # noqa: N803
    P = T["geometry_msgs/msg/Point"]  # noqa: N806
    Q = T["geometry_msgs/msg/Quaternion"]  # noqa: N806
    pose = T["geometry_msgs/msg/Pose"](
        position=P(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])), orientation=Q(x=0.0, y=0.0, z=0.0, w=1.0)
    )
    pwc = T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36))
    V = T["geometry_msgs/msg/Vector3"]  # noqa: N806
    tw = T["geometry_msgs/msg/Twist"](linear=V(x=0.0, y=0.0, z=0.0), angular=V(x=0.0, y=0.0, z=0.0))
    twc = T["geometry_msgs/msg/TwistWithCovariance"](twist=tw, covariance=np.zeros(36))
    return T[ODOM_TYPE](
        header=T["std_msgs/msg/Header"](stamp=header.stamp, frame_id="odom"),
        child_frame_id="base_link",
        pose=pwc,
        twist=twc,
    )


def open_bag(path: Path):
    """An opened rosbags ``AnyReader`` on a ROS 1 bag (a ``.bag`` file) or a
    ROS 2 bag (a folder with metadata.yaml, or an ``.mcap`` / ``.db3`` file).
    Messages decode with the definitions stored in the bag; bags without any
    (older rosbags writers) with Humble's. BagError says why a bag cannot be read."""
    from rosbags.highlevel import AnyReader

    path = Path(path)
    if not path.exists():
        raise BagError(f"bag {path} does not exist")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"bag {path} cannot be read: a ROS 2 bag folder needs metadata.yaml (or give its .mcap/.db3)")
    if path.is_file() and path.suffix != ".bag":
        with open(path, "rb") as f:
            if f.read(8) == b"#ROSBAG ":
                raise BagError(f"bag {path} cannot be read: it is a ROS 1 bag, which must be named *.bag")
    try:
        reader = AnyReader([path], default_typestore=_typestore())
        if path.is_dir() and not reader.is2:  # a ROS 2 bag folder named *.bag: AnyReader goes by the suffix
            from rosbags.rosbag2 import Reader

            reader.is2, reader.readers = True, [Reader(path)]
        reader.open()
    except Exception as e:  # noqa: BLE001 - AnyReaderError, rosbag1/2 ReaderError, sqlite, yaml ... for bad files
        raise BagError(f"bag {path} cannot be read: {type(e).__name__}: {e}") from None
    return reader


def read_messages(reader, connections: list, path: Path) -> Iterator[tuple]:
    """(connection, bag time ns, raw bytes) of ``reader`` in time order; a file
    that breaks part-way raises BagError, not rosbags' own error."""
    if not connections:  # an empty selection would mean every connection
        return
    it = reader.messages(connections=connections)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - as in open_bag
            raise BagError(f"bag {path} cannot be read: {type(e).__name__}: {e}") from None
        yield item


def cdr_converter(reader, path: Path):
    """(typestore, convert) for ROS 2 CDR: ``convert(raw, msgtype) -> bytes``
    copies a ROS 2 bag's bytes and turns a ROS 1 bag's into CDR (the bag's own
    definitions with ROS 2's std_msgs/Header, which has no ``seq``); the
    typestore decodes the result."""
    if reader.is2:
        return reader.typestore, lambda raw, msgtype: bytes(raw)
    from rosbags.typesys import Stores, get_typestore

    header = "std_msgs/msg/Header"
    ts = get_typestore(Stores.EMPTY)
    ts.register({**reader.typestore.fielddefs, header: _typestore().fielddefs[header]})

    def convert(raw: bytes, msgtype: str) -> bytes:
        try:
            return bytes(ts.ros1_to_cdr(raw, msgtype))
        except Exception as e:  # noqa: BLE001 - SerdeError, struct.error on a bad message
            raise BagError(f"bag {path}: a ROS 1 {msgtype} message cannot be converted to ROS 2: {e}") from None

    return ts, convert


class BagReader:
    """Frames (and odometry) of one image topic of a ROS 1 or ROS 2 bag (see
    ``open_bag``); a context manager. BagError for unreadable bags, a missing
    or ambiguous image topic, and odometry that cannot be decoded; an image
    message that cannot be decoded is a Frame with ``error`` (see ``frames``)."""

    def __init__(self, path: Path, topic: str | None = None, *, bit_depth: int | None = None) -> None:
        self.path = Path(path)
        self.bit_depth = bit_depth  # of 16-bit images; None = the package's rule (images.to_uint8)
        self._reader = open_bag(self.path)
        #: decodes the CDR bytes of raw_messages (for ROS 1 bags: after conversion)
        self.ts, self._to_cdr = cdr_converter(self._reader, self.path)
        topics = self.topics()
        images = [t for t, ty in topics.items() if ty in IMAGE_TYPES]
        if topic is None:
            if len(images) != 1:
                self.close()
                raise BagError(
                    f"bag {self.path}: give --topic, image topics are {images or 'none'}; all topics: {_fmt(topics)}"
                )
            topic = images[0]
        if topic not in topics or topics[topic] not in IMAGE_TYPES:
            self.close()
            raise BagError(f"bag {self.path} has no image topic {topic!r}; its topics: {_fmt(topics)}")
        self.topic, self.msgtype = topic, topics[topic]
        self._conns = [c for c in self._reader.connections if c.topic == topic]
        self._odom = [c for c in self._reader.connections if c.msgtype == ODOM_TYPE]
        self.count = sum(c.msgcount for c in self._conns)

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._reader.close()
        except Exception:  # noqa: BLE001, S110 - closing a closed reader
            pass

    def _decode(self, raw: bytes, msgtype: str, what: str):
        try:
            return self._reader.deserialize(raw, msgtype)
        except Exception as e:  # noqa: BLE001 - AnyReaderError, struct.error on a bad message
            raise BagError(f"bag {self.path}: {what} cannot be decoded: {e}") from None

    def odometry(self) -> list[tuple[int, np.ndarray]]:
        """(header stamp ns, position (3,) m) of every nav_msgs/Odometry message."""
        out: list[tuple[int, np.ndarray]] = []
        for i, (c, _, raw) in enumerate(read_messages(self._reader, self._odom, self.path)):
            m = self._decode(raw, c.msgtype, f"odometry message {i} on {c.topic}")
            p = m.pose.pose.position
            out.append((m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec, np.array([p.x, p.y, p.z])))
        return out

    def frames(self, only: Container[int] | None = None) -> Iterator[Frame]:
        """Every image in bag order (with ``only``: the frames of those indices, the others are
        neither deserialised nor decoded), with the odometry position within 0.1 s of its stamp.

        A message that cannot be deserialised or decoded does not end the iteration (the
        node skips such frames too): it comes as a Frame with ``rgb=None`` and ``error``,
        keeping its index, so frame indices stay those of the bag."""
        from pnv_ros.image_msgs import decode_image

        odom = self.odometry()
        ostamps = np.array([s for s, _ in odom]) if odom else None
        for i, (c, t, raw) in enumerate(read_messages(self._reader, self._conns, self.path)):
            if only is not None and i not in only:
                continue
            try:
                m = self._reader.deserialize(raw, c.msgtype)
            except Exception as e:  # noqa: BLE001 - as in _decode: rosbags' errors, struct.error on bad bytes
                yield Frame(i, int(t), None, "", None, f"{c.msgtype} message cannot be deserialised: {e}")
                continue
            stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
            rgb, error = None, None
            try:
                rgb = decode_image(m, compressed=c.msgtype == IMAGE_TYPES[1], bit_depth=self.bit_depth)
            except (PnvError, ValueError) as e:  # ImageError; whatever a decoder raises on bad bytes
                error = str(e)
            pos = None
            if ostamps is not None:
                j = int(np.argmin(np.abs(ostamps - stamp)))
                if abs(int(ostamps[j]) - stamp) <= 100_000_000:
                    pos = odom[j][1]
            yield Frame(i, stamp, rgb, m.header.frame_id, pos, error)

    def raw_messages(self, topics: list[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, msgtype, bag time ns, ROS 2 CDR bytes) of every message, in time order."""
        conns = [c for c in self._reader.connections if topics is None or c.topic in topics]
        for c, t, raw in read_messages(self._reader, conns, self.path):
            yield c.topic, c.msgtype, t, self._to_cdr(raw, c.msgtype)

    def topics(self) -> dict[str, str]:
        """Topic -> message type (``pkg/msg/Name``, also for ROS 1 bags)."""
        return {c.topic: c.msgtype for c in self._reader.connections}


def _fmt(topics: dict[str, str]) -> str:
    return ", ".join(f"{t} ({ty})" for t, ty in topics.items()) or "none"
