"""A loop's relative pose from the local features of its two keyframes. No ROS.

Placeholder of the interface (issue 28); the pose helper implements it.
"""

from __future__ import annotations

import numpy as np

from pnv_ros.camera_model import CameraModel
from pnv_ros.geometry import RelativePose
from pnv_ros.local_features import LocalFeatures


def estimate_loop_pose(
    query: LocalFeatures,
    match: LocalFeatures,
    camera: CameraModel,
    patch_pairs: np.ndarray | None = None,
) -> RelativePose | None:
    """The matched (child) camera in the query (parent) camera, or None.

    Args:
        query, match: the two keyframes' local features (rays needed; ``match.points`` for METRIC).
        camera: the query's camera; its ``matrix`` scales pixel residuals (ideal pixels).
        patch_pairs: (M, 4) float image pixels (xq, yq, xm, ym) of the verified patch correspondences
            (inliers of the dominant scale), or None: local matches are kept only near them.
    """
    raise NotImplementedError
