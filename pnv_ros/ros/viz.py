"""What the node shows people: match images (from kept thumbnails) and RViz loop markers.

Bounded: thumbnails in an LRU of ``capacity`` keyframes, keyed by the map
generation (a reset or load starts a new one, so old pictures never stand
for new ids); markers are sent one loop at a time (a new id each), with a
DELETEALL when the map changes, never the whole history again.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
from geometry_msgs.msg import Point
from visualization_msgs.msg import Marker, MarkerArray

from pnv_ros.config import Preset
from pnv_ros.images import load_image
from pnv_ros.matching import ScaleMatch


class Thumbnails:
    """Small JPEGs of recent keyframes, for match images; at most ``capacity`` kept."""

    def __init__(self, capacity: int = 500, width: int = 320) -> None:
        self.capacity, self.width = capacity, width
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, generation: int, kf_id: int, rgb: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        im = load_image(rgb)
        im = im.resize((self.width, max(1, round(im.height * self.width / im.width))))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        self._items[(generation, kf_id)] = buf.getvalue()
        self._items.move_to_end((generation, kf_id))
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, generation: int, kf_id: int, size: tuple[int, int]):
        """The thumbnail as a PIL image resized to ``size`` (width, height), or None."""
        from PIL import Image as PILImage

        data = self._items.get((generation, kf_id))
        return None if data is None else PILImage.open(io.BytesIO(data)).resize(size)


def match_picture(
    thumbs: Thumbnails, generation: int, loop, preset: Preset, query_size, match_size
) -> np.ndarray | None:  # noqa: E501
    """Side-by-side picture of a loop's patch matches, or None when a thumbnail is missing."""
    from pnv_ros.viz import match_image

    qi = thumbs.get(generation, loop.query_id, query_size)
    mi = thumbs.get(generation, loop.match_id, match_size)
    details: list[ScaleMatch] | None = loop.details
    if qi is None or mi is None or not details:
        return None
    return match_image(qi, mi, preset, details, loop.score, title=f"kf {loop.query_id} -> {loop.match_id}")


def loop_marker(marker_id: int, frame_id: str, a: np.ndarray, b: np.ndarray, stamp) -> MarkerArray:
    """One loop edge between two keyframe positions (odometry frame) as a new marker."""
    m = Marker()
    m.header.frame_id, m.header.stamp = frame_id or "odom", stamp
    m.ns, m.id, m.type, m.action = "loops", int(marker_id), Marker.LINE_LIST, Marker.ADD
    m.scale.x = 0.05
    m.color.r, m.color.g, m.color.a = 1.0, 0.2, 1.0
    m.pose.orientation.w = 1.0
    m.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in (a, b)]
    return MarkerArray(markers=[m])


def clear_markers(frame_id: str, stamp) -> MarkerArray:
    m = Marker()
    m.header.frame_id, m.header.stamp, m.ns, m.action = frame_id or "odom", stamp, "loops", Marker.DELETEALL
    return MarkerArray(markers=[m])
