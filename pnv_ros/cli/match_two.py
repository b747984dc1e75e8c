"""``pnv match-two``: two images scored against each other, and the relative pose of their cameras.

With ``--camera`` (a camera_info YAML as ``camera_calibration`` writes it) the pose comes from the two images'
local features (:mod:`pnv_ros.local_features`, distortion applied); with ``--depth`` (a depth image per image,
registered to it) it is METRIC. Parent = IMAGE_A (the query), child = IMAGE_B (the match), as a loop's.
``--json`` prints one JSON object (:func:`pose_json` gives the pose's part); otherwise lines for a person.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pnv_ros.cli.common import POSITIVE, Number, add_common_options, open_extractor, preset_of
from pnv_ros.errors import ImageError

if TYPE_CHECKING:
    import numpy as np

    from pnv_ros.camera_model import CameraModel
    from pnv_ros.geometry import RelativePose

#: depth units a metre of a 16-bit depth PNG unless --depth-scale says otherwise (REP 118 millimetres; TUM's
#: PNGs are 5000 a metre)
DEFAULT_DEPTH_SCALE = 1000.0


def register(sub: Any) -> None:
    """Add ``match-two`` to the ``pnv`` subparsers ``sub``."""
    sp = sub.add_parser(
        "match-two",
        help="score two images, draw their matches, and give their cameras' relative pose",
        description=(
            "Scores IMAGE_A against IMAGE_B. With --camera, the relative pose of their cameras (parent = IMAGE_A, "
            "the query; child = IMAGE_B, the match): ROTATION_AND_DIRECTION or ROTATION_ONLY from one camera, "
            "METRIC (translation in metres) with --depth. No pose below --min-score (the detector's min_score, "
            "0.12: what the node would publish as a loop); --min-score 0 measures the pose of any pair, e.g. a loop "
            "proposed by odometry, its local features deciding (fewer than 15 / 30 consistent matches: NONE)."
        ),
    )
    add_common_options(sp)
    sp.add_argument("image_a", metavar="IMAGE_A")
    sp.add_argument("image_b", metavar="IMAGE_B")
    sp.add_argument("--matcher", choices=["ransac", "rapid"], default=None, help="override the preset's matcher")
    sp.add_argument("--out", default=None, help="side-by-side picture (.png) with matched patches joined")
    sp.add_argument(
        "--camera",
        default=None,
        metavar="CAMERA.yaml",
        help="camera_info YAML (camera_calibration's): K, D and distortion_model of the (raw) images",
    )
    sp.add_argument(
        "--rectified", action="store_true", help="the images are rectified: the YAML's projection_matrix, no D"
    )
    sp.add_argument(
        "--depth",
        nargs=2,
        default=None,
        metavar=("DEPTH_A", "DEPTH_B"),
        help="depth images registered to IMAGE_A and IMAGE_B: 16-bit PNG (units of 1/--depth-scale m, 0 = none) "
        "or 32-bit float TIFF (metres); needs --camera",
    )
    sp.add_argument(
        "--depth-scale",
        type=POSITIVE,
        default=DEFAULT_DEPTH_SCALE,
        help="units a metre of 16-bit depth (default 1000: millimetres; TUM RGB-D: 5000)",
    )
    sp.add_argument(
        "--min-score",
        type=Number(float, 0.0, 1.0),
        default=None,
        help="least patch score for a pose (default: the detector's min_score, 0.12); 0: the pose of any pair",
    )
    sp.add_argument("--json", action="store_true", help="print one JSON object: score, relative_pose, ...")
    sp.set_defaults(func=cmd_match_two)


def read_depth(path: str | Path, scale: float = DEFAULT_DEPTH_SCALE) -> np.ndarray:
    """A depth image file as (H, W) float32 metres, NaN = none: a 16-bit PNG (``scale`` units a metre, as
    ``16UC1``) or a 32-bit float image (metres, as ``32FC1``).

    Raises:
        ImageError: a missing or unreadable file, or one that is not single-channel 16-bit or 32-bit float.
    """
    import cv2

    from pnv_ros.local_features import depth_in_metres

    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such depth image")
    d = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if d is None:
        raise ImageError(f"{p}: cannot read it as an image (corrupt, or not a PNG / TIFF)")
    kinds = {"uint16": "16UC1", "float32": "32FC1"}
    if d.ndim != 2 or str(d.dtype) not in kinds:
        raise ImageError(
            f"{p}: a depth image is one channel of 16-bit integers or 32-bit floats; got {d.dtype} "
            f"{'x'.join(map(str, d.shape))}"
        )
    return depth_in_metres(d, kinds[str(d.dtype)], scale)


def pose_json(pose: RelativePose | None, reason: str = "") -> dict[str, Any]:
    """A relative pose as JSON: ``type`` (its name), ``rotation_xyzw``, ``translation`` (metres, METRIC) or
    ``direction`` (unit) and ``tangent_basis`` (3 x 2, the basis B of the covariance's direction angles) for
    ROTATION_AND_DIRECTION, ``rotation_covariance`` (3 x 3, rad^2), ``translation_covariance``
    (3 x 3, m^2, METRIC), ``covariance`` (row-major: 9 / 25 / 36 by type), ``inliers``, ``rms_error_px``;
    ``{"type": "NONE", "covariance": []}`` for no pose, with ``"reason"`` when one is given. Conventions:
    :class:`pnv_ros.geometry.RelativePose`."""
    from scipy.spatial.transform import Rotation

    from pnv_ros.geometry import PoseType

    if pose is None or pose.type == PoseType.NONE:
        return {"type": "NONE", "covariance": [], **({"reason": reason} if reason else {})}
    out: dict[str, Any] = {
        "type": pose.type.name,
        "rotation_xyzw": Rotation.from_matrix(pose.rotation).as_quat().tolist(),
    }
    if pose.type == PoseType.METRIC:
        out["translation"] = pose.translation.tolist()
    elif pose.type == PoseType.ROTATION_AND_DIRECTION:
        out["direction"] = pose.direction.tolist()
        out["tangent_basis"] = pose.tangent_basis.tolist()  # (3, 2): the covariance's a = its 2 coordinates
    out["rotation_covariance"] = pose.rotation_covariance.tolist()
    if pose.type == PoseType.METRIC:
        out["translation_covariance"] = pose.translation_covariance.tolist()
    out["covariance"] = pose.covariance.ravel().tolist()
    out["inliers"] = int(pose.inliers)
    out["rms_error_px"] = float(pose.rms_error_px)
    return out


def _inputs(args: argparse.Namespace) -> tuple[CameraModel | None, list[np.ndarray | None]]:
    """The camera and the two depth images (metres), checked before any model loads. Raises PnvError."""
    from pnv_ros.camera_model import CameraModel
    from pnv_ros.errors import ConfigError

    if args.depth and not args.camera:
        raise ConfigError("--depth needs --camera (the depth images' pixels become 3-D points through it)")
    camera = None
    if args.camera:
        try:
            camera = CameraModel.load_yaml(args.camera, rectified=args.rectified)
        except ValueError as e:  # a matrix of the wrong size (CameraModel.load_yaml checks the fields' presence)
            raise ConfigError(f"{args.camera}: not a camera_info YAML ({e})") from e
    depths = [read_depth(p, args.depth_scale) for p in args.depth] if args.depth else [None, None]
    return camera, depths


def _local(image: np.ndarray, name: str, camera: CameraModel, depth_m: np.ndarray | None):
    """The image's local features; an image of another size than the camera's or its depth is an error."""
    from pnv_ros.local_features import extract_local_features

    h, w = image.shape[:2]
    if camera.size is not None and camera.size != (w, h):
        raise ImageError(f"{name} is {w} x {h} but the camera is for {camera.size[0]} x {camera.size[1]} images")
    if depth_m is not None and depth_m.shape != (h, w):
        raise ImageError(f"{name} is {w} x {h} but its depth image is {depth_m.shape[1]} x {depth_m.shape[0]}")
    return extract_local_features(image, camera, depth_m)


def cmd_match_two(args: argparse.Namespace) -> int:
    """Score two images against each other; print the score per patch size (or one JSON object with --json), the
    relative pose with --camera; draw the matches with --out."""
    import dataclasses

    import numpy as np

    from pnv_ros.storage import check_output

    if args.out:
        check_output(args.out, what="--out", inputs=[args.image_a, args.image_b])
    camera, depths = _inputs(args)
    from pnv_ros.detector import DetectorParams, LoopClosureDetector, texture
    from pnv_ros.images import load_image
    from pnv_ros.viz import match_image, save_png

    pictures = [load_image(p, bit_depth=args.bit_depth) for p in (args.image_a, args.image_b)]  # PIL images
    images = [np.asarray(im) for im in pictures]
    ex = open_extractor(args, preset_of(args))
    preset = ex.preset  # the model's: a DINOv2 model brings its backbone and input size
    a, b = ex.extract(images)
    if camera is not None:
        a, b = (
            dataclasses.replace(f, local=_local(im, name, camera, d))
            for f, im, name, d in zip((a, b), images, (args.image_a, args.image_b), depths)
        )
    least = DetectorParams().min_score if args.min_score is None else args.min_score
    det = LoopClosureDetector(ex, DetectorParams(min_score=least))
    score, num_matches, num_inliers, pose = det.verify(a, b, args.matcher, camera)
    sc = det.matcher_for(args.matcher).score(a, [b], details=True)
    if args.json:
        out = {
            "image_a": str(args.image_a),
            "image_b": str(args.image_b),
            "score": score,
            "num_matches": num_matches,
            "num_inliers": num_inliers,
            "relative_pose": pose_json(pose, _none_reason(camera is not None, score, least) if pose is None else ""),
        }
        print(json.dumps(out))
    else:
        print(f"score {score:.4f} (0..1, higher is better); raw weighted {float(sc.raw[0] @ preset.patch_weights):.4f}")
        least = DetectorParams().min_texture
        for name, im in zip((args.image_a, args.image_b), images):
            t = texture(im)
            if t < least:
                print(
                    f"note: {name} has no information (texture {t:.1f} < {least:g} grey levels: a lens cap, darkness "
                    f"or a white-out); the detector never makes it a keyframe, so this score never closes a loop"
                )
        for s, size in enumerate(preset.patch_sizes):
            print(
                f"  patch {size}: raw {sc.raw[0, s]:.4f}, mutual matches {sc.num_matches[0, s]}, "
                f"inliers {sc.num_inliers[0, s]}"
            )
        print(_pose_text(pose, camera is not None, score, least))
    if args.out:
        title = f"{Path(args.image_a).name} | {Path(args.image_b).name}"
        save_png(match_image(pictures[0], pictures[1], preset, sc.details[0], score, title=title), args.out)
        print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)  # stdout: the JSON alone
    return 0


def _pose_text(pose: RelativePose | None, camera: bool, score: float, min_score: float) -> str:
    """The relative pose for a person: type, rotation angle, translation or direction, one-sigma errors."""
    import numpy as np

    head = "relative pose (parent = IMAGE_A, child = IMAGE_B)"
    if pose is None:
        return f"{head}: NONE ({_none_reason(camera, score, min_score)})"
    from scipy.spatial.transform import Rotation

    rv = Rotation.from_matrix(pose.rotation).as_rotvec()
    sig_r = np.degrees(np.sqrt(np.trace(pose.rotation_covariance)))
    text = f"{head}: {pose.type.name}, rotation {np.degrees(np.linalg.norm(rv)):.2f} deg (+-{sig_r:.2f})"
    if pose.translation is not None:
        sig_t = 100 * np.sqrt(np.trace(pose.translation_covariance))
        t = pose.translation
        text += f", translation [{t[0]:.3f} {t[1]:.3f} {t[2]:.3f}] m (+-{sig_t:.1f} cm)"
    elif pose.direction.any():
        d = pose.direction
        text += f", direction [{d[0]:.3f} {d[1]:.3f} {d[2]:.3f}]"
    return text + f", {pose.inliers} inliers"


def _none_reason(camera: bool, score: float, min_score: float) -> str:
    """Why a pair has no pose, in words."""
    if not camera:
        return "give --camera"
    if score < min_score:
        return f"score {score:.3f} below min_score {min_score:g} (--min-score 0 measures it anyway)"
    return "too few geometrically consistent local feature matches"
