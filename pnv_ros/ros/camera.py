"""camera_info as a :class:`~pnv_ros.camera_model.CameraModel`, for the relative poses of loops. No rclpy: the
node passes the message's fields.

The ``image_rectified`` parameter says which pixels the images have. False (the default): raw images
(``image_raw``, what most drivers publish and fr1/desk's are), whose pixels follow camera_info's K and D
(``distortion_model``): D is applied to the keypoints before any pose is estimated. True: rectified images
(``image_rect``, from image_proc), whose pixels follow P's left 3 x 3, D ignored, as image_proc and RTAB-Map
read them; K when P is not a camera matrix (a camera_info with K alone). Raw images with a K that is no
camera matrix take P when D is zero (a camera without distortion: P's pixels are K's).
A camera is for the image size camera_info gives: an image of another size (a full-resolution camera_info
beside a resized or binned image) gets no camera, and its loops go without a relative pose.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pnv_ros.camera_model import CameraModel, is_camera_matrix
from pnv_ros.errors import ConfigError


def camera_from_info(
    p: Sequence[float],
    k: Sequence[float],
    width: int,
    height: int,
    d: Sequence[float] = (),
    distortion_model: str = "",
    rectified: bool = False,
) -> CameraModel:
    """The camera of camera_info's P (12,), K (9,), size (0 = not given), D (n,) and model, for raw images
    (K and D) or rectified ones (P, else K; no D): see the module docstring.

    Raises:
        ConfigError: no camera matrix where one is needed, a non-finite D, or a distortion model that is not
            applied (:data:`pnv_ros.camera_model.DISTORTION_MODELS`) while D is not zero.
    """
    p3 = np.array(p, dtype=np.float64).reshape(3, 4)[:, :3]
    k3 = np.array(k, dtype=np.float64).reshape(3, 3)
    dist = np.array(d, dtype=np.float64).ravel()
    zero_d = bool(np.isfinite(dist).all() and not dist.any())
    if rectified or (zero_d and not is_camera_matrix(k3) and is_camera_matrix(p3)):
        m = p3 if is_camera_matrix(p3) else k3
        dist, model = np.zeros(0), "plumb_bob"
    else:
        m, model = k3, distortion_model or "plumb_bob"
    if not is_camera_matrix(m):
        raise ConfigError(
            f"{m.ravel().tolist()} ({'P, or K when P is empty' if rectified else 'K'}) is not a camera matrix "
            "(finite, fx, fy > 0, last row 0 0 1)"
        )
    size = (int(width), int(height)) if width and height else None
    return CameraModel(m, dist, model, size)


class CameraMatrix:
    """The last camera_info's camera (a CameraModel, with the image size it is for), or nothing.

    :meth:`update` from one thread, :meth:`for_sizes` from any: the camera is kept as one reference. Each
    answers, besides, a warning to log, once per trouble: the first camera_info that gives no camera (and
    the first after a good one), the first image of a size other than camera_info's (and of each new size).
    """

    def __init__(self) -> None:
        self._camera: CameraModel | None = None
        self._warned_info = False
        self._warned_size: tuple[int, int] | None = None

    def update(
        self,
        p: Sequence[float],
        k: Sequence[float],
        width: int,
        height: int,
        d: Sequence[float] = (),
        distortion_model: str = "",
        rectified: bool = False,
    ) -> tuple[bool, str | None]:
        """Take camera_info's P (12,), K (9,), size (0 = not given), D and distortion model (see
        :func:`camera_from_info`): (taken, a warning or None). A camera_info that is not taken forgets the
        camera before: no camera until a good one."""
        try:
            self._camera = camera_from_info(p, k, width, height, d, distortion_model, rectified)
            return True, None
        except ConfigError as e:
            reason = str(e)
        warn = self._camera is not None or not self._warned_info
        self._camera, self._warned_info = None, True
        if not warn:
            return False, None
        return False, f"camera_info ignored: {reason}; loops go without a relative pose"

    def for_sizes(self, *sizes: tuple[int, int]) -> tuple[CameraModel | None, bool, str | None]:
        """(the camera or None, whether an image is of another size than camera_info's, a warning or None) for
        the image sizes given ((width, height) each): the camera when it is for every one of them."""
        cam = self._camera  # one read: the camera with its size
        if cam is None:
            return None, False, None
        size = cam.size
        other = next((im for im in sizes if size is not None and tuple(im) != size), None)
        if other is None or size is None:
            return cam, False, None
        if self._warned_size == size:
            return None, True, None
        self._warned_size = size
        warning = (
            f"camera_info is for {size[0]} x {size[1]} images but the image is {other[0]} x {other[1]}: "
            "loops go without a relative pose until they agree"
        )
        return None, True, warning
