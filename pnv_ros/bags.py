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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pnv_ros.camera_model import CameraModel
from pnv_ros.errors import PnvError
from pnv_ros.images import decode_bytes, list_images, load_image
from pnv_ros.trajectory import DriftModel, Trajectory


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
    orientation: np.ndarray | None = None  # (4,) quaternion x, y, z, w of the odometry, with ``position``


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


def _image_poses(paths: list[Path], poses: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(position, quaternion) by image stem from ``poses``: a CSV ``name,x,y[,z]`` (no orientation), or a TUM
    trajectory file (any other suffix) for images named by their stamps in seconds (TUM's ``rgb/<stamp>.png``),
    interpolated there.

    Raises:
        BagError: an image without a pose, or not named by a stamp for a TUM file; TumError, TrajectoryError: as
            read_trajectory and Trajectory.at.
    """
    if poses.suffix.lower() == ".csv":
        pos = read_poses(poses)
        missing = [p.stem for p in paths if p.stem not in pos]
        if missing:
            raise BagError(f"poses file {poses} has no pose for {len(missing)} image(s), e.g. {missing[:3]}")
        return pos, {}
    from pnv_ros.tum import read_trajectory

    try:
        stamps = {p.stem: float(p.stem) for p in paths}
    except ValueError:
        raise BagError(
            f"poses {poses} is a TUM trajectory (not .csv): the images must be named by their stamps in seconds "
            f"(e.g. 1305031453.359684.png), not {paths[0].name}"
        ) from None
    keys = sorted(set(stamps.values()))
    at = read_trajectory(poses).at(keys)
    k = {t: i for i, t in enumerate(keys)}
    return {s: at.positions[k[t]] for s, t in stamps.items()}, {s: at.quaternions[k[t]] for s, t in stamps.items()}


def _check_topics(*names: str) -> None:
    for name in names:
        if not _TOPIC.fullmatch(name):
            raise BagError(
                f"topic {name!r} is not a ROS topic name (e.g. /camera/image: letters, digits and _, "
                f"separated by /, no part starting with a digit)"
            )


@contextmanager
def _staged_writer(out: Path, fmt: str) -> Iterator:
    """A rosbags Writer on a temp folder beside ``out``, renamed to ``out`` when the block ends without an error:
    a failure (a bad image, a full disk) leaves no half bag behind."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    if fmt not in ("mcap", "sqlite3"):
        raise BagError(f"format {fmt!r}: use mcap or sqlite3")
    if out.exists():
        raise BagError(f"{out} exists: choose a new bag path")
    plugin = StoragePlugin.MCAP if fmt == "mcap" else StoragePlugin.SQLITE3
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with Writer(staging / out.name, version=8, storage_plugin=plugin) as w:
            yield w
        (staging / out.name).rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _image_msg(T, header, p: Path, compressed: bool):  # noqa: N803
    """sensor_msgs/Image (rgb8) or CompressedImage (jpeg) of the image file ``p``."""
    if compressed:
        if p.suffix.lower() in (".jpg", ".jpeg"):
            data = p.read_bytes()  # as it is (EXIF included), once the one decoder reads it
            decode_bytes(data, str(p))
        else:
            data = _jpeg(p)
        return T[IMAGE_TYPES[1]](header=header, format="jpeg", data=np.frombuffer(data, np.uint8))
    rgb = np.asarray(load_image(p))
    return T[IMAGE_TYPES[0]](
        header=header,
        height=rgb.shape[0],
        width=rgb.shape[1],
        encoding="rgb8",
        is_bigendian=0,
        step=rgb.shape[1] * 3,
        data=rgb.reshape(-1),
    )


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
    if rate <= 0:
        raise BagError(f"rate {rate} must be positive")
    _check_topics(topic, odom_topic)
    if fmt not in ("mcap", "sqlite3"):
        raise BagError(f"format {fmt!r}: use mcap or sqlite3")
    paths = list_images(images_dir if isinstance(images_dir, list) else [images_dir])
    pos, ori = _image_poses(paths, poses) if poses else (None, {})
    if out.exists():
        raise BagError(f"{out} exists: choose a new bag path")
    ts = _typestore()
    T = ts.types  # noqa: N806
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]  # noqa: N806
    count = 0
    with _staged_writer(out, fmt) as w:
        itype = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]
        conn = w.add_connection(topic, itype, typestore=ts)
        oconn = w.add_connection(odom_topic, ODOM_TYPE, typestore=ts) if pos is not None else None
        for i, p in enumerate(paths):
            t = T0_NS + int(round(i * 1e9 / rate))
            header = Header(stamp=Time(sec=t // 1_000_000_000, nanosec=t % 1_000_000_000), frame_id=frame_id)
            w.write(conn, t, ts.serialize_cdr(_image_msg(T, header, p, compressed), itype))
            count += 1
            if oconn is not None and pos is not None:
                o = _odom(T, header, pos[p.stem], ori.get(p.stem, (0.0, 0.0, 0.0, 1.0)))
                w.write(oconn, t, ts.serialize_cdr(o, ODOM_TYPE))
                count += 1
    return count


#: topics of a TUM bag: the colour, its registered depth and the camera, as a RealSense driver names them
TUM_TOPICS = {"image": "/camera/image", "depth": "/camera/depth", "camera_info": "/camera/camera_info"}
DEPTH_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"


@dataclass
class TumBag:
    """What :func:`make_tum_bag` wrote: message count, frames, colour images left out (no depth within
    ``max_dt``), and the odometry written (None without poses)."""

    messages: int
    frames: int
    unpaired: int
    odometry: Trajectory | None = None


def _ns(stamp_s: float) -> int:
    """TUM stamps (6 decimals) to integer nanoseconds, exactly."""
    return int(round(stamp_s * 1e6)) * 1000


def _camera_info(T, header, yaml_path: Path, size: tuple[int, int]):  # noqa: N803
    """sensor_msgs/CameraInfo of a camera_calibration YAML; BagError when its size is not the images'."""
    import yaml

    cam = CameraModel.load_yaml(yaml_path)  # ConfigError for a file that is not one
    if cam.size is not None and cam.size != size:
        raise BagError(
            f"camera {yaml_path} is for {cam.size[0]}x{cam.size[1]} images, the colour images are {size[0]}x{size[1]}"
        )
    y = yaml.safe_load(Path(yaml_path).read_text())
    r = (y.get("rectification_matrix") or {}).get("data") or [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    p = (y.get("projection_matrix") or {}).get("data") or [
        *cam.matrix[0],
        0.0,
        *cam.matrix[1],
        0.0,
        *cam.matrix[2],
        0.0,
    ]
    roi = T["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return T[INFO_TYPE](
        header=header,
        height=size[1],
        width=size[0],
        distortion_model=cam.distortion_model,
        d=np.array(cam.distortion, np.float64),
        k=np.array(cam.matrix, np.float64).reshape(9),
        r=np.asarray(r, np.float64).reshape(9),
        p=np.asarray(p, np.float64).reshape(12),
        binning_x=0,
        binning_y=0,
        roi=roi,
    )


def _depth_msg(T, header, path: Path):  # noqa: N803
    """sensor_msgs/Image 16UC1 millimetres (REP 118) of a TUM depth PNG (5000 units per metre)."""
    from pnv_ros.tum import load_depth_mm

    mm = load_depth_mm(path).astype("<u2")
    h, w = mm.shape
    return T[DEPTH_TYPE](
        header=header,
        height=h,
        width=w,
        encoding="16UC1",
        is_bigendian=0,
        step=w * 2,
        data=mm.view(np.uint8).reshape(-1),
    )


def make_tum_bag(
    folder: Path,
    out: Path,
    camera: Path,
    *,
    poses: Path | None = None,
    drift: DriftModel | None = None,
    fmt: str = "mcap",
    compressed: bool = False,
    topics: dict[str, str] | None = None,
    odom_topic: str = "/odom",
    frame_id: str = "camera_color_optical_frame",
) -> TumBag:
    """A TUM RGB-D folder (:func:`pnv_ros.tum.read_sequence`) as a ROS 2 bag at its own stamps.

    Per frame (colour and depth paired as TUM's associate.py): the colour image (``rgb8`` Image, or the JPEG as
    CompressedImage), its depth as ``16UC1`` millimetres (REP 118; TUM's 5000 units per metre rounded to 1 mm, the
    encoding the node reads by default; ``32FC1`` would double the size for 0.2 mm), camera_info from the
    camera_calibration YAML ``camera``, all in ``frame_id``; with ``poses`` (a TUM trajectory file), odometry of
    the camera itself (``odom`` -> ``frame_id``) at each colour stamp, interpolated, and with ``drift`` made from
    them by the drift model (:class:`pnv_ros.trajectory.DriftModel`). Bag times are the header stamps.

    Raises:
        TumError: as read_sequence / read_trajectory; TrajectoryError: poses that do not cover the frames;
        ConfigError: a camera file that is not a camera_info YAML; BagError: a camera for another image size,
        an existing ``out``, a bad topic name or format.
    """
    from pnv_ros.tum import read_sequence, read_trajectory

    topics = {**TUM_TOPICS, **(topics or {})}
    _check_topics(*topics.values(), odom_topic)
    seq = read_sequence(folder)
    odom = None
    if poses is not None:
        odom = read_trajectory(poses).at([f.stamp for f in seq.frames])
        odom = drift.apply(odom) if drift is not None else odom
    if out.exists():
        raise BagError(f"{out} exists: choose a new bag path")
    ts = _typestore()
    T = ts.types  # noqa: N806
    Time, Header = T["builtin_interfaces/msg/Time"], T["std_msgs/msg/Header"]  # noqa: N806

    def header(t: int, frame: str = frame_id):
        return Header(stamp=Time(sec=t // 1_000_000_000, nanosec=t % 1_000_000_000), frame_id=frame)

    first = np.asarray(load_image(seq.frames[0].rgb))
    info = None
    count = 0
    with _staged_writer(out, fmt) as w:
        itype = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]
        conns = {
            "image": w.add_connection(topics["image"], itype, typestore=ts),
            "depth": w.add_connection(topics["depth"], DEPTH_TYPE, typestore=ts),
            "camera_info": w.add_connection(topics["camera_info"], INFO_TYPE, typestore=ts),
        }
        oconn = w.add_connection(odom_topic, ODOM_TYPE, typestore=ts) if odom is not None else None
        for k, f in enumerate(seq.frames):
            t, td = _ns(f.stamp), _ns(f.depth_stamp)
            h = header(t)
            info = (
                _camera_info(T, h, camera, (first.shape[1], first.shape[0]))
                if info is None
                else replace(info, header=h)
            )
            msgs = [
                (t, conns["image"], ts.serialize_cdr(_image_msg(T, h, f.rgb, compressed), itype)),
                (t, conns["camera_info"], ts.serialize_cdr(info, INFO_TYPE)),
                (td, conns["depth"], ts.serialize_cdr(_depth_msg(T, header(td), f.depth), DEPTH_TYPE)),
            ]
            if oconn is not None and odom is not None:
                o = _odom(T, header(t, "odom"), odom.positions[k], odom.quaternions[k], frame_id)
                msgs.append((t, oconn, ts.serialize_cdr(o, ODOM_TYPE)))
            for when, conn, data in sorted(msgs, key=lambda m: m[0]):
                w.write(conn, when, data)
                count += 1
    return TumBag(count, len(seq.frames), len(seq.unpaired), odom)


def _jpeg(p: Path) -> bytes:
    import io

    buf = io.BytesIO()
    load_image(p).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _odom(T, header, xyz: np.ndarray, quat=(0.0, 0.0, 0.0, 1.0), child_frame_id: str = "base_link"):  # noqa: N803
    """nav_msgs/Odometry at ``header``'s stamp in frame ``odom``: position (3,) m, quaternion x, y, z, w."""
    P = T["geometry_msgs/msg/Point"]  # noqa: N806
    Q = T["geometry_msgs/msg/Quaternion"]  # noqa: N806
    qx, qy, qz, qw = (float(v) for v in quat)
    pose = T["geometry_msgs/msg/Pose"](
        position=P(x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2])), orientation=Q(x=qx, y=qy, z=qz, w=qw)
    )
    pwc = T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36))
    V = T["geometry_msgs/msg/Vector3"]  # noqa: N806
    tw = T["geometry_msgs/msg/Twist"](linear=V(x=0.0, y=0.0, z=0.0), angular=V(x=0.0, y=0.0, z=0.0))
    twc = T["geometry_msgs/msg/TwistWithCovariance"](twist=tw, covariance=np.zeros(36))
    return T[ODOM_TYPE](
        header=T["std_msgs/msg/Header"](stamp=header.stamp, frame_id="odom"),
        child_frame_id=child_frame_id,
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


def read_messages(
    reader, connections: list, path: Path, start: int | None = None, stop: int | None = None
) -> Iterator[tuple]:
    """(connection, bag time ns, raw bytes) of ``reader`` in time order (bag times in [start, stop) when given);
    a file that breaks part-way raises BagError, not rosbags' own error."""
    if not connections:  # an empty selection would mean every connection
        return
    it = reader.messages(connections=connections, start=start, stop=stop)
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
    message that cannot be decoded is a Frame with ``error`` (see ``frames``).

    Depth (REP 118: an Image topic of ``16UC1`` millimetres or ``32FC1`` metres) is not an image topic when the
    topic is chosen: a bag with colour and depth has one image topic. ``depth_topic`` is that depth topic (the
    first by name when several), ``depth_at`` its image at a stamp, ``camera_model`` the first camera_info's
    camera."""

    def __init__(self, path: Path, topic: str | None = None, *, bit_depth: int | None = None) -> None:
        self.path = Path(path)
        self.bit_depth = bit_depth  # of 16-bit images; None = the package's rule (images.to_uint8)
        self._reader = open_bag(self.path)
        #: decodes the CDR bytes of raw_messages (for ROS 1 bags: after conversion)
        self.ts, self._to_cdr = cdr_converter(self._reader, self.path)
        topics = self.topics()
        images = [t for t, ty in topics.items() if ty in IMAGE_TYPES]
        depths = sorted(t for t in images if t != topic and self._is_depth(t)) if len(images) > 1 else []
        self.depth_topic = depths[0] if depths else None
        self._depth_index: list[tuple[int, int]] | None = None  # (header stamp, bag time) of the depth images
        if topic is None and len(images) > 1:
            images = [t for t in images if t not in depths]
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
        return [(s, p) for s, p, _ in self.odometry_poses()]

    def odometry_poses(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(header stamp ns, position (3,) m, quaternion (4,) x, y, z, w) of every nav_msgs/Odometry message."""
        out: list[tuple[int, np.ndarray, np.ndarray]] = []
        for i, (c, _, raw) in enumerate(read_messages(self._reader, self._odom, self.path)):
            m = self._decode(raw, c.msgtype, f"odometry message {i} on {c.topic}")
            p, q = m.pose.pose.position, m.pose.pose.orientation
            stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
            out.append((stamp, np.array([p.x, p.y, p.z]), np.array([q.x, q.y, q.z, q.w])))
        return out

    def _is_depth(self, topic: str) -> bool:
        """Whether the first message of an Image topic is depth (16UC1 / 32FC1)."""
        conns = [c for c in self._reader.connections if c.topic == topic and c.msgtype == IMAGE_TYPES[0]]
        for c, _, raw in read_messages(self._reader, conns, self.path):
            try:
                return str(self._reader.deserialize(raw, c.msgtype).encoding) in DEPTH_ENCODINGS
            except Exception:  # noqa: BLE001 - as in _decode: an undecodable first message is not depth
                return False
        return False

    def camera_model(self) -> CameraModel | None:
        """The camera of the bag's first sensor_msgs/CameraInfo message (raw images: K and D), or None.

        Raises:
            BagError: a camera_info that cannot be decoded; ConfigError: one that is not a camera.
        """
        conns = [c for c in self._reader.connections if c.msgtype == INFO_TYPE]
        for c, _, raw in read_messages(self._reader, conns, self.path):
            m = self._decode(raw, c.msgtype, f"camera_info on {c.topic}")
            return CameraModel.from_camera_info(m.k, m.d, m.distortion_model, m.p, m.width, m.height)
        return None

    def depth_at(self, stamp_ns: int, tolerance_ns: int) -> np.ndarray | None:
        """The depth image nearest ``stamp_ns`` within ``tolerance_ns`` as (H, W) float32 metres (NaN = none), or
        None (no depth topic, none that close, or one that cannot be decoded: the frame goes without, as the
        node's)."""
        from pnv_ros.image_msgs import depth_to_array
        from pnv_ros.local_features import depth_in_metres

        if self.depth_topic is None:
            return None
        conns = [c for c in self._reader.connections if c.topic == self.depth_topic]
        if self._depth_index is None:
            self._depth_index = []
            for c, t, raw in read_messages(self._reader, conns, self.path):
                try:
                    st = self._reader.deserialize(raw, c.msgtype).header.stamp
                except Exception:  # noqa: BLE001 - as in frames: a bad message is left out
                    continue
                self._depth_index.append((st.sec * 1_000_000_000 + st.nanosec, int(t)))
            self._depth_index.sort()
        if not self._depth_index:
            return None
        j = int(np.argmin(np.abs(np.array([s for s, _ in self._depth_index], np.int64) - int(stamp_ns))))
        stamp, t = self._depth_index[j]
        if abs(stamp - stamp_ns) > tolerance_ns:
            return None
        for c, _, raw in read_messages(self._reader, conns, self.path, start=t, stop=t + 1):
            try:
                m = self._reader.deserialize(raw, c.msgtype)
                if m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec != stamp:
                    continue
                return depth_in_metres(*depth_to_array(m))
            except PnvError:  # ImageError: an encoding or a buffer that does not fit
                return None
        return None

    def frames(self, only: Container[int] | None = None) -> Iterator[Frame]:
        """Every image in bag order (with ``only``: the frames of those indices, the others are
        neither deserialised nor decoded), with the odometry position within 0.1 s of its stamp.

        A message that cannot be deserialised or decoded does not end the iteration (the
        node skips such frames too): it comes as a Frame with ``rgb=None`` and ``error``,
        keeping its index, so frame indices stay those of the bag."""
        from pnv_ros.image_msgs import decode_image

        odom = self.odometry_poses()
        ostamps = np.array([s for s, _, _ in odom]) if odom else None
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
            pos = ori = None
            if ostamps is not None:
                j = int(np.argmin(np.abs(ostamps - stamp)))
                if abs(int(ostamps[j]) - stamp) <= 100_000_000:
                    pos, ori = odom[j][1], odom[j][2]
            yield Frame(i, stamp, rgb, m.header.frame_id, pos, error, ori)

    def stamps(self) -> list[int]:
        """Header stamps (ns) of every image message in bag order, without decoding the images (the bag time of a
        message that cannot be deserialised, as in ``frames``)."""
        out = []
        for c, t, raw in read_messages(self._reader, self._conns, self.path):
            try:
                st = self._reader.deserialize(raw, c.msgtype).header.stamp
                out.append(st.sec * 1_000_000_000 + st.nanosec)
            except Exception:  # noqa: BLE001 - as in frames
                out.append(int(t))
        return out

    def raw_messages(self, topics: list[str] | None = None) -> Iterator[tuple[str, str, int, bytes]]:
        """(topic, msgtype, bag time ns, ROS 2 CDR bytes) of every message, in time order."""
        conns = [c for c in self._reader.connections if topics is None or c.topic in topics]
        for c, t, raw in read_messages(self._reader, conns, self.path):
            yield c.topic, c.msgtype, t, self._to_cdr(raw, c.msgtype)

    def topics(self) -> dict[str, str]:
        """Topic -> message type (``pkg/msg/Name``, also for ROS 1 bags)."""
        return {c.topic: c.msgtype for c in self._reader.connections}


#: encodings that make an Image topic a depth topic (REP 118: 16UC1 millimetres, 32FC1 metres; not mono16, which a
#: camera also publishes); decoded by :func:`pnv_ros.image_msgs.depth_to_array`
DEPTH_ENCODINGS = ("16UC1", "32FC1")


def _fmt(topics: dict[str, str]) -> str:
    return ", ".join(f"{t} ({ty})" for t, ty in topics.items()) or "none"
