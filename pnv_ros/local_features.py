"""Local features of a keyframe, for the relative pose of its loops. No ROS.

Patch-NetVLAD finds the place; its patch centres sit on a 16-pixel grid and cannot measure a pose (issue 28:
16 px median error against ground truth on fr1/desk). Each keyframe therefore also keeps OpenCV SIFT
keypoints (Lowe, IJCV 2004) with their descriptors, their bearing rays (distortion applied, when a camera
is known) and, with a registered depth image, their 3-D points: what :mod:`pnv_ros.loop_pose` needs to
measure the pose later, when this keyframe is the match of a newer one and its image is long gone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pnv_ros.camera_model import CameraModel
from pnv_ros.errors import ImageError

#: SIFT keypoints kept per keyframe (strongest first): OpenCV's ``nfeatures``. 1000 x (128 B descriptor +
#: 28 B geometry) = 156 KB a keyframe. Measured on fr1/desk's 69 revisits (benchmarks/loop_poses.py): 500 ->
#: 3 (depth) / 13 (no depth) without a pose, monocular rotation 1.1 deg median; 1000 -> 0 / 3, 0.75 deg; 2000
#: -> 0 / 2, 0.70 deg at 2.5x the pose time (105 ms vs 41) and twice the extraction (~200 ms vs ~100)
MAX_KEYPOINTS = 1000
#: depth units of a ``16UC1`` image per metre (REP 118: millimetres; TUM's PNGs use 5000)
MM_PER_M = 1000.0
#: depths outside [MIN_DEPTH_M, MAX_DEPTH_M] are no measurement (structured-light and ToF sensors report
#: 0.3-10 m; a Kinect v1, fr1/desk's sensor, 0.5-5 m)
MIN_DEPTH_M, MAX_DEPTH_M = 0.1, 20.0
#: depth edges: a keypoint's depth is the median of the valid depths in a DEPTH_WINDOW x DEPTH_WINDOW window,
#: kept only when at least half the window is valid and the window's depths lie within DEPTH_EDGE_REL of that
#: median (a keypoint on an object's silhouette mixes foreground and background: no 3-D point)
DEPTH_WINDOW = 5
DEPTH_EDGE_REL = 0.05


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """One keyframe's local features.

    Attributes:
        keypoints: (N, 2) float32 image pixels (x, y), as found (distorted, if the image is raw).
        descriptors: (N, 128) uint8 SIFT descriptors.
        rays: (N, 3) float32 unit bearing vectors in the camera's optical frame (distortion applied), or None
            when no camera was known at extraction.
        points: (N, 3) float32 metres in the camera's optical frame, NaN rows where depth is missing or
            unreliable, or None without depth.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    rays: np.ndarray | None = None
    points: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def has_depth(self) -> bool:
        """Whether any keypoint has a 3-D point."""
        return self.points is not None and bool(np.isfinite(self.points).all(axis=1).any())


def depth_in_metres(depth: np.ndarray, encoding: str, scale: float = MM_PER_M) -> np.ndarray:
    """A depth image (H, W) to float32 metres, NaN where there is no measurement.

    encoding: ``16UC1`` (units of 1/scale m; 0 = none; ``mono16`` is taken alike) or ``32FC1`` (metres; 0,
    NaN or inf = none).

    Raises:
        ImageError: another encoding, a shape that is not (H, W), or a dtype that does not fit the encoding.
    """
    d = np.asarray(depth)
    if d.ndim != 2 or d.size == 0:
        raise ImageError(f"a depth image is (H, W); got shape {d.shape}")
    if encoding in ("16UC1", "mono16"):
        if d.dtype != np.uint16:
            raise ImageError(f"{encoding} depth must be uint16, got {d.dtype}")
        m = d.astype(np.float32) / np.float32(scale)
    elif encoding == "32FC1":
        if d.dtype != np.float32:
            raise ImageError(f"32FC1 depth must be float32, got {d.dtype}")
        m = d.astype(np.float32, copy=True)
    else:
        raise ImageError(f"depth encoding {encoding!r} is not 16UC1 (millimetres) or 32FC1 (metres)")
    m[~np.isfinite(m) | (m < MIN_DEPTH_M) | (m > MAX_DEPTH_M)] = np.nan
    return m


def _grey(image: np.ndarray) -> np.ndarray:
    import cv2

    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2 or a.size == 0:
        raise ImageError(f"an image is (H, W) or (H, W, 3); got shape {np.asarray(image).shape}")
    if a.dtype != np.uint8:
        raise ImageError(f"local features need an 8-bit image, got {a.dtype}")
    return a


def depth_at(depth_m: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """(N,) float32 metres at keypoints (N, 2) of a depth image in metres (NaN = none), robust to holes and
    depth edges (``DEPTH_WINDOW``, ``DEPTH_EDGE_REL``); NaN where no reliable depth."""
    h, w = depth_m.shape
    r = DEPTH_WINDOW // 2
    pad = np.pad(depth_m, r, constant_values=np.nan)
    xs = np.clip(np.rint(keypoints[:, 0]).astype(int), 0, w - 1)
    ys = np.clip(np.rint(keypoints[:, 1]).astype(int), 0, h - 1)
    oy, ox = np.mgrid[0:DEPTH_WINDOW, 0:DEPTH_WINDOW]
    win = pad[ys[:, None] + oy.ravel()[None], xs[:, None] + ox.ravel()[None]]  # (N, W*W)
    valid = np.isfinite(win)
    enough = valid.sum(axis=1) >= (DEPTH_WINDOW * DEPTH_WINDOW + 1) // 2
    out = np.full(len(keypoints), np.nan, np.float32)
    if not enough.any():
        return out
    med = np.nanmedian(win[enough], axis=1)
    spread = np.nanmax(np.abs(win[enough] - med[:, None]), axis=1)
    good = spread <= DEPTH_EDGE_REL * med
    idx = np.flatnonzero(enough)[good]
    out[idx] = med[good]
    return out


def extract_local_features(
    image: np.ndarray,
    camera: CameraModel | None = None,
    depth_m: np.ndarray | None = None,
    max_keypoints: int = MAX_KEYPOINTS,
) -> LocalFeatures:
    """SIFT keypoints, descriptors, rays and 3-D points of one image.

    Args:
        image: (H, W, 3) RGB or (H, W) grey uint8.
        camera: the camera of the image's pixels (for rays and points), or None.
        depth_m: (H, W) float32 metres registered to the image (NaN = none, see :func:`depth_in_metres`), or
            None. Needs ``camera``.

    Raises:
        ImageError: an image that is not 8-bit (H, W[, 3]), a depth image of another size than the image.
    """
    import cv2

    grey = _grey(image)
    sift = cv2.SIFT_create(nfeatures=int(max_keypoints))
    kps, desc = sift.detectAndCompute(grey, None)
    n = len(kps)
    keypoints = np.array([k.pt for k in kps], np.float32).reshape(n, 2)
    descriptors = (
        np.zeros((0, 128), np.uint8) if desc is None else np.clip(np.rint(desc), 0, 255).astype(np.uint8)
    ).reshape(n, 128)
    rays = points = None
    if camera is not None:
        rays = camera.rays(keypoints).astype(np.float32)
    if depth_m is not None:
        if depth_m.shape != grey.shape:
            raise ImageError(f"the depth image is {depth_m.shape[::-1]} (W, H), the image {grey.shape[::-1]}")
        if rays is not None:
            z = depth_at(depth_m, keypoints)
            points = (rays / rays[:, 2:3] * z[:, None]).astype(np.float32)  # z is depth along the optical axis
    return LocalFeatures(keypoints, descriptors, rays, points)
