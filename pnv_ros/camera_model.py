"""A camera as camera_info describes it: pinhole matrix, lens distortion, image size. No ROS.

Keypoints are found in the image as it arrives. A raw image (``image_raw``, fr1/desk's JPEGs, many robots'
drivers) is distorted: its pixels follow camera_info's K and D (``distortion_model``). A rectified image
(``image_rect``, from image_proc) follows P's left 3 x 3 and has no distortion. :meth:`CameraModel.undistort`
maps keypoints of either to *ideal pixels*: where a distortion-free pinhole camera with ``matrix`` would see
them, which is what every pose solver here takes.

Distortion models (camera_info's ``distortion_model``, the names of ROS's
``sensor_msgs/distortion_models.hpp``): ``plumb_bob`` (k1 k2 t1 t2 k3) and ``rational_polynomial``
(k1 k2 t1 t2 k3 k4 k5 k6) through ``cv2.undistortPoints``; ``equidistant`` (k1 k2 k3 k4, the Kannala-Brandt
fisheye model) through ``cv2.fisheye.undistortPoints``. An empty D, or all zeros, is no distortion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnv_ros.errors import ConfigError

#: camera_info distortion models this module applies, with the number of coefficients each takes (D may be
#: longer for plumb_bob / rational_polynomial: OpenCV reads 4, 5, 8, 12 or 14; shorter is padded with zeros)
DISTORTION_MODELS = {"plumb_bob": 5, "rational_polynomial": 8, "equidistant": 4}
#: OpenCV's iterative undistortion: cv2.undistortPoints' default stops after 5 iterations, which leaves
#: ~0.5 px at fr1/desk's corners (k1 0.26, k3 1.16); 20 iterations or 1e-9 change is below 1e-3 px there
UNDISTORT_CRITERIA = (3, 20, 1e-9)  # cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, max iterations, epsilon


def is_camera_matrix(m: np.ndarray) -> bool:
    """A 3 x 3 pinhole camera matrix: finite, fx and fy > 0, last row 0 0 1."""
    m = np.asarray(m, dtype=np.float64)
    return bool(
        m.shape == (3, 3)
        and np.isfinite(m).all()
        and m[0, 0] > 0
        and m[1, 1] > 0
        and abs(m[2, 2] - 1.0) < 1e-6
        and not m[2, :2].any()
    )


def _camera_matrix(m, what: str) -> np.ndarray:
    k = np.asarray(m, dtype=np.float64).reshape(3, 3)
    if not is_camera_matrix(k):
        raise ConfigError(f"{what} is not a camera matrix (finite, fx, fy > 0, last row 0 0 1): {k.ravel().tolist()}")
    return k


@dataclass(frozen=True, eq=False)
class CameraModel:
    """The pixels of one camera's images: ``matrix`` (3, 3), ``distortion`` (n,), its model, the image size.

    Attributes:
        matrix: (3, 3) float64 pinhole camera matrix K (pixels).
        distortion: (n,) float64 coefficients D in camera_info's order; empty = none.
        distortion_model: one of :data:`DISTORTION_MODELS` (ignored when D is empty or all zero).
        size: (width, height) of the images this camera describes, or None (any size).

    Raises:
        ConfigError: a matrix that is not a camera matrix, a non-finite D, a distortion model this module
            does not apply while D is not zero.
    """

    matrix: np.ndarray
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(0))
    distortion_model: str = "plumb_bob"
    size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        k = _camera_matrix(self.matrix, "the camera matrix")
        d = np.asarray(self.distortion, dtype=np.float64).ravel()
        if not np.isfinite(d).all():
            raise ConfigError(f"distortion coefficients must be finite: {d.tolist()}")
        if d.any() and self.distortion_model not in DISTORTION_MODELS:
            raise ConfigError(
                f"distortion model {self.distortion_model!r} is not applied here (one of "
                f"{', '.join(DISTORTION_MODELS)}); rectify the images (image_proc) and give image_rect"
            )
        for name, a in (("matrix", k), ("distortion", d)):
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        if self.size is not None:
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    @property
    def distorted(self) -> bool:
        """Whether D moves any pixel."""
        return bool(self.distortion.any())

    @classmethod
    def from_camera_info(
        cls,
        k,
        d,
        distortion_model: str,
        p,
        width: int = 0,
        height: int = 0,
        rectified: bool = False,
    ) -> CameraModel:
        """From camera_info's fields: K (9,), D (n,), distortion_model, P (12,), size (0 = not given).

        rectified: the images are image_proc's ``image_rect`` (P's left 3 x 3, no distortion); otherwise
        they are raw (K and D), as camera_info describes the camera.

        Raises:
            ConfigError: as the class.
        """
        size = (int(width), int(height)) if width and height else None
        if rectified:
            return cls(np.asarray(p, np.float64).reshape(3, 4)[:, :3], np.zeros(0), "plumb_bob", size)
        return cls(np.asarray(k, np.float64).reshape(3, 3), np.asarray(d, np.float64), distortion_model, size)

    @classmethod
    def load_yaml(cls, path: str | Path, rectified: bool = False) -> CameraModel:
        """A camera_info YAML as ``camera_calibration`` writes it (``camera_matrix``, ``distortion_model``,
        ``distortion_coefficients``, ``projection_matrix``, ``image_width``, ``image_height``).

        Raises:
            ConfigError: an unreadable file, missing fields, or as the class.
        """
        import yaml

        try:
            y = yaml.safe_load(Path(path).read_text())
            k = y["camera_matrix"]["data"]
            d = (y.get("distortion_coefficients") or {}).get("data") or []
            p = (y.get("projection_matrix") or {}).get("data") or [*k[:3], 0.0, *k[3:6], 0.0, *k[6:9], 0.0]
            model = y.get("distortion_model") or "plumb_bob"
            w, h = int(y.get("image_width") or 0), int(y.get("image_height") or 0)
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: not a camera_info YAML ({type(e).__name__}: {e})") from e
        return cls.from_camera_info(k, d, model, p, w, h, rectified=rectified)

    def undistort(self, pixels) -> np.ndarray:
        """(N, 2) image pixels (x, y) -> (N, 2) float64 ideal pixels of ``matrix`` (no distortion)."""
        import cv2

        pts = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
        if not self.distorted or len(pts) == 0:
            return pts.copy()
        src = pts.reshape(-1, 1, 2)
        if self.distortion_model == "equidistant":
            d = np.zeros(4)
            d[: min(4, self.distortion.size)] = self.distortion[:4]
            out = cv2.fisheye.undistortPoints(src, self.matrix, d, P=self.matrix, criteria=UNDISTORT_CRITERIA)
        else:
            n = DISTORTION_MODELS[self.distortion_model]
            d = np.zeros(max(n, self.distortion.size))
            d[: self.distortion.size] = self.distortion
            out = cv2.undistortPointsIter(src, self.matrix, d, None, self.matrix, UNDISTORT_CRITERIA)
        return out.reshape(-1, 2).astype(np.float64)

    def rays(self, pixels) -> np.ndarray:
        """(N, 2) image pixels -> (N, 3) float64 unit bearing vectors in the camera's optical frame."""
        ideal = self.undistort(pixels)
        h = np.column_stack([ideal, np.ones(len(ideal))]) @ np.linalg.inv(self.matrix).T
        return h / np.linalg.norm(h, axis=1, keepdims=True)
