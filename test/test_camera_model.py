"""CameraModel: undistortion against OpenCV's own projection (round trip), rays, camera_info inputs, errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pnv_ros.camera_model import CameraModel
from pnv_ros.errors import ConfigError

DATA = Path(__file__).resolve().parents[1] / "data" / "tum_fr1_desk_pairs"
K = np.array([[517.3, 0.0, 318.6], [0.0, 516.5, 255.3], [0.0, 0.0, 1.0]])
#: fr1's published plumb_bob D; a rational_polynomial D of a wide lens (OpenCV's calibration sample order:
#: k1 k2 p1 p2 k3 k4 k5 k6); an equidistant (Kannala-Brandt) D of a fisheye
DISTORTIONS = {
    "plumb_bob": [0.2624, -0.9531, -0.0054, 0.0026, 1.1633],
    "rational_polynomial": [-0.28, 0.07, 0.001, -0.0005, 0.0, 0.05, -0.02, 0.01],
    "equidistant": [-0.013, 0.02, -0.008, 0.001],
}


def _ideal_grid(margin: int = 40) -> np.ndarray:
    xs, ys = np.meshgrid(np.linspace(margin, 640 - margin, 12), np.linspace(margin, 480 - margin, 9))
    return np.column_stack([xs.ravel(), ys.ravel()])


def _distort(ideal: np.ndarray, model: str, d) -> np.ndarray:
    """Image pixels OpenCV's projection gives for points seen at ``ideal`` pixels of a pinhole K."""
    rays = np.column_stack([ideal, np.ones(len(ideal))]) @ np.linalg.inv(K).T
    obj = rays.reshape(-1, 1, 3)
    if model == "equidistant":
        px, _ = cv2.fisheye.projectPoints(obj, np.zeros((3, 1)), np.zeros((3, 1)), K, np.asarray(d, float))
    else:
        px, _ = cv2.projectPoints(obj, np.zeros(3), np.zeros(3), K, np.asarray(d, float))
    return px.reshape(-1, 2)


@pytest.mark.parametrize("model", list(DISTORTIONS))
def test_undistort_inverts_opencv_projection(model: str) -> None:
    cam = CameraModel(K, np.array(DISTORTIONS[model]), model, (640, 480))
    ideal = _ideal_grid()
    raw = _distort(ideal, model, DISTORTIONS[model])
    assert np.abs(raw - ideal).max() > 2.0  # the distortion moves pixels: the check means something
    back = cam.undistort(raw)
    assert back.shape == ideal.shape
    np.testing.assert_allclose(back, ideal, atol=1e-3)
    rays = cam.rays(raw)
    np.testing.assert_allclose(np.linalg.norm(rays, axis=1), 1.0, atol=1e-12)
    want = np.column_stack([ideal, np.ones(len(ideal))]) @ np.linalg.inv(K).T
    np.testing.assert_allclose(rays, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)


def test_no_distortion_is_identity_and_rectified_uses_p() -> None:
    cam = CameraModel(K)
    px = _ideal_grid()
    np.testing.assert_array_equal(cam.undistort(px), px)
    assert not cam.distorted
    p = [500.0, 0.0, 320.0, 0.0, 0.0, 500.0, 240.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    rect = CameraModel.from_camera_info(K.ravel(), DISTORTIONS["plumb_bob"], "plumb_bob", p, 640, 480, rectified=True)
    np.testing.assert_array_equal(rect.matrix, np.array(p).reshape(3, 4)[:, :3])
    assert not rect.distorted and rect.size == (640, 480)
    raw = CameraModel.from_camera_info(K.ravel(), DISTORTIONS["plumb_bob"], "plumb_bob", p, 640, 480)
    np.testing.assert_array_equal(raw.matrix, K)
    assert raw.distorted


def test_load_fr1_yaml() -> None:
    cam = CameraModel.load_yaml(DATA / "camera.yaml")
    np.testing.assert_array_equal(cam.matrix, K)
    np.testing.assert_array_equal(cam.distortion, DISTORTIONS["plumb_bob"])
    assert cam.distortion_model == "plumb_bob" and cam.size == (640, 480)
    # a corner pixel moves by several pixels once D applies (fr1's k1 = 0.26)
    assert np.linalg.norm(cam.undistort([[5.0, 5.0]]) - [5.0, 5.0]) > 3.0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.eye(3) * [1, 1, 0],), "not a camera matrix"),
        ((np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]]),), "not a camera matrix"),
        ((K, np.array([np.nan, 0, 0, 0, 0])), "finite"),
        ((K, np.array([0.1, 0, 0, 0, 0]), "fov"), "not applied"),
    ],
)
def test_bad_cameras_raise(args, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CameraModel(*args)


def test_bad_yaml_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a camera_info YAML"):
        CameraModel.load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_width: 640\n")
    with pytest.raises(ConfigError, match="not a camera_info YAML"):
        CameraModel.load_yaml(bad)
