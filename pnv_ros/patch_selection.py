"""Patch selection: keep a fixed share of an image's patches (``Preset.patch_keep`` < 1).

Patch-NetVLAD matches every patch of the query against every patch of each candidate; repeated structure
(floor, ceiling, a tiled wall: "feature burstiness") makes many near-identical patches that cost matching
time and map bytes and mostly produce ambiguous matches. Selection runs after extraction, on the finished
(P_s, D) unit descriptors of one image, per scale, and keeps a FIXED count ``Preset.kept_patches(s)``
(``ceil(patch_keep * P_s)``) in grid order, so candidates still stack as (n, P'_s, D); the kept patches'
grid indices go with the features (:attr:`PlaceFeatures.patch_index`) for spatial scoring and RANSAC.

Criteria (lower score = kept first; ties broken by grid order):

- ``uniform`` (the default): an evenly spaced subset of the grid, whatever the content. Measured against the two
  content criteria below it kept the most Recall@1 (corridor set: 0.874 / 0.847 at keep 0.5 / 0.25, against
  burstiness 0.838 / 0.712 and typicality 0.721 / 0.532; every patch 0.847).
- ``burstiness``: a patch's highest cosine similarity to the image's patches that do not
  overlap it (the same patch seen again elsewhere in the image). Overlapping patches share feature cells, so
  they are always similar and are left out of the maximum.
- ``typicality``: a patch's mean cosine similarity to the image's non-overlapping patches (how close it is
  to the image's average look).

benchmarks/patch_selection.py measures them (docs/results/patch_selection.md).
"""

from __future__ import annotations

import numpy as np

from pnv_ros.config import Preset
from pnv_ros.errors import ConfigError
from pnv_ros.features import PlaceFeatures, patch_grid

CRITERIA = ("uniform", "burstiness", "typicality")
#: The criterion extraction uses: the best Recall@1 of the three on the shared sets (docs/results/patch_selection.md).
DEFAULT_CRITERION = "uniform"


def _overlap(preset: Preset, scale: int) -> np.ndarray:
    """(P, P) bool: patches of one scale that share a feature cell (the patch itself included)."""
    grid = patch_grid(preset, scale) * preset.strides[scale]  # top-left cell of each patch
    d = np.abs(grid[:, None, :] - grid[None, :, :])
    return (d < preset.patch_sizes[scale]).all(axis=2)


def distinctiveness(patches: np.ndarray, preset: Preset, scale: int, criterion: str = DEFAULT_CRITERION) -> np.ndarray:
    """Per-patch scores (P,) float64 of one image's scale-``scale`` patches (P, D), unit rows, in grid order;
    lower is more distinctive. Raises ConfigError for an unknown criterion."""
    p = np.asarray(patches, np.float32)
    n = p.shape[0]
    if criterion == "uniform":
        k = preset.kept_patches(scale)
        score = np.ones(n)
        score[np.unique(np.floor(np.arange(k) * n / k).astype(np.int64))] = 0.0
        return score
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown patch selection criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    sim = (p @ p.T).astype(np.float64)  # (P, P) cosine similarities
    far = ~_overlap(preset, scale)
    if not far.any():  # one patch covers the map: nothing to compare with, keep in grid order
        return np.zeros(n)
    if criterion == "burstiness":
        return np.where(far, sim, -np.inf).max(axis=1)
    return (sim * far).sum(axis=1) / np.maximum(far.sum(axis=1), 1)


def select_indices(patches: np.ndarray, preset: Preset, scale: int, criterion: str = DEFAULT_CRITERION) -> np.ndarray:
    """Grid indices (kept_patches(scale),) int16, ascending, of the patches one image keeps at one scale."""
    score = distinctiveness(patches, preset, scale, criterion)
    keep = np.argsort(score, kind="stable")[: preset.kept_patches(scale)]
    return np.sort(keep).astype(np.int16)


def select_patches(features: PlaceFeatures, preset: Preset, criterion: str = DEFAULT_CRITERION) -> PlaceFeatures:
    """The features with only the kept patches of each scale (C-contiguous copies) and their grid indices.

    features: one image's features with every patch (``patch_index`` None), per scale (P_s, D). With
    ``preset.patch_keep`` 1 the same object is returned, untouched. Raises ConfigError for an unknown
    criterion, ValueError when the features were already selected or do not have the preset's patch counts.
    """
    if not preset.selects_patches:
        return features
    if features.patch_index is not None:
        raise ValueError("these features already hold a selection of their patches")
    patches, index = [], []
    for s, p in enumerate(features.patches):
        if len(p) != preset.num_patches(s):
            raise ValueError(f"scale {s} has {len(p)} patches, the preset's grid {preset.num_patches(s)}")
        idx = select_indices(p, preset, s, criterion)
        patches.append(np.ascontiguousarray(p[idx]))
        index.append(idx)
    return PlaceFeatures(features.global_desc, patches, features.image_size, features.local, index)
