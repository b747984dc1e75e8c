"""camera_info's camera matrix, for the relative poses of loops. No rclpy: the node passes the message's fields.

The node takes rectified images, so the matrix is the rectified camera P's left 3 x 3, as image_proc and
RTAB-Map read it; K when P is not a camera matrix (a camera_info with K alone, a camera without distortion).
A matrix is for the image size camera_info gives: an image of another size (a full-resolution camera_info
beside a resized or binned image) gets no matrix, and its loops go without a relative pose.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def is_camera_matrix(m: np.ndarray) -> bool:
    """A 3 x 3 pinhole camera matrix: finite, fx and fy > 0, last row 0 0 1."""
    return bool(
        np.isfinite(m).all() and m[0, 0] > 0 and m[1, 1] > 0 and abs(m[2, 2] - 1.0) < 1e-6 and not m[2, :2].any()
    )


class CameraMatrix:
    """The last camera_info's camera matrix and the (width, height) it is for (None: any size), or nothing.

    :meth:`update` from one thread, :meth:`for_sizes` from any: the two are kept as one reference. Each
    answers, besides, a warning to log, once per trouble: the first camera_info that is no camera matrix (and
    the first after a good one), the first image of a size other than camera_info's (and of each new size).
    """

    def __init__(self) -> None:
        self._camera: tuple[np.ndarray, tuple[int, int] | None] | None = None
        self._warned_info = False
        self._warned_size: tuple[int, int] | None = None

    def update(self, p: Sequence[float], k: Sequence[float], width: int, height: int) -> tuple[bool, str | None]:
        """Take camera_info's P (12,), K (9,) and size (0 = not given): (taken, a warning or None). A matrix
        that is not taken is forgotten with the one before: no matrix until a good one."""
        p3 = np.array(p, dtype=np.float64).reshape(3, 4)[:, :3]
        m = p3 if is_camera_matrix(p3) else np.array(k, np.float64).reshape(3, 3)
        if is_camera_matrix(m):
            self._camera = (m, (int(width), int(height)) if width and height else None)
            return True, None
        warn = self._camera is not None or not self._warned_info
        self._camera, self._warned_info = None, True
        if not warn:
            return False, None
        return False, (
            f"camera_info ignored: {m.ravel().tolist()} (P, or K when P is empty) is not a camera matrix "
            "(finite, fx, fy > 0, last row 0 0 1); loops go without a relative pose"
        )

    def for_sizes(self, *sizes: tuple[int, int]) -> tuple[np.ndarray | None, bool, str | None]:
        """(the matrix or None, whether an image is of another size than camera_info's, a warning or None) for
        the image sizes given ((width, height) each): the matrix when it is for every one of them."""
        cam = self._camera  # one read: the matrix and its size together
        if cam is None:
            return None, False, None
        m, size = cam
        other = next((im for im in sizes if size is not None and tuple(im) != size), None)
        if other is None or size is None:
            return m, False, None
        if self._warned_size == size:
            return None, True, None
        self._warned_size = size
        warning = (
            f"camera_info is for {size[0]} x {size[1]} images but the image is {other[0]} x {other[1]}: "
            "loops go without a relative pose until they agree"
        )
        return None, True, warning
