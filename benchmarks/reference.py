"""The reference implementation (patchnetvlad==0.1.8), called as its own scripts call it, for the side-by-side
benchmark (compare_reference.py): the model as ``get_model`` builds it, extraction as ``feature_extract.py``,
the PatchMatcher and the fusion as ``local_matcher.py``. The tests' oracle (test/oracle.py) is this module:
benchmarks do not import test modules, tests import this one (pytest's ``pythonpath`` is the repository
root). Imports patchnetvlad (a benchmark and test dependency) inside each function.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import Any

import numpy as np
import torch


def reference_model(ckpt: Path, patch_sizes: Any, strides: Any) -> tuple[Any, int]:
    """The reference's Patch-NetVLAD model of a checkpoint (eval mode) and its dimension D."""
    from patchnetvlad.models.models_generic import get_model
    from torch import nn
    from torchvision.models import vgg16

    st = torch.load(ckpt, weights_only=True)["state_dict"]
    k, d = st["pool.centroids"].shape[0], st["WPCA.0.bias"].shape[0]
    enc = nn.Sequential(*list(vgg16(weights=None).features.children())[:-2])
    cfg = configparser.ConfigParser()
    cfg["global_params"] = {
        "pooling": "patchnetvlad",
        "num_clusters": str(k),
        "vladv2": "False",
        "num_pcs": str(d),
        "patch_sizes": ",".join(map(str, patch_sizes)),
        "strides": ",".join(map(str, strides)),
    }
    m = get_model(enc, 512, cfg["global_params"], append_pca_layer=True)
    m.load_state_dict(st)
    return m.eval(), d


@torch.no_grad()
def reference_extract(model: Any, dim: int, image_path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    """Global (D,) and per-scale patch descriptors (D, P) as the reference's feature_extract.py computes them."""
    from patchnetvlad.models.models_generic import get_pca_encoding
    from patchnetvlad.tools.datasets import input_transform
    from PIL import Image

    x = input_transform((480, 640))(Image.open(image_path)).unsqueeze(0)
    loc, glob = model.pool(model.encoder(x))
    g = get_pca_encoding(model, glob).numpy()[0]
    patches = []
    for t in loc:
        pca = get_pca_encoding(model, t.permute(2, 0, 1).reshape(-1, t.size(1)))
        patches.append(pca.reshape(t.size(2), t.size(0), dim).permute(1, 2, 0).numpy()[0])
    return g, patches


def reference_matcher(matcher: str, preset: Any) -> Any:
    """The reference PatchMatcher with its keypoints, built once as local_matcher.py does."""
    from patchnetvlad.models.local_matcher import calc_keypoint_centers_from_patches
    from patchnetvlad.tools.patch_matcher import PatchMatcher

    cfg = {"imageresizeH": str(preset.image_height), "imageresizeW": str(preset.image_width)}
    kps, idx = [], []
    for p, s in zip(preset.patch_sizes, preset.strides):
        k, i = calc_keypoint_centers_from_patches(cfg, p, p, s, s)
        kps.append(k)
        idx.append(i)
    name = {"ransac": "RANSAC", "rapid": "spatialApproximator"}[matcher]
    return PatchMatcher(name, list(preset.patch_sizes), list(preset.strides), kps, idx)


def reference_raw_scores(
    matcher: str, preset: Any, query_patches: Any, db_patches_list: Any, pm: Any = None
) -> np.ndarray:
    """(N, S) raw scores from the reference PatchMatcher (``pm``: one built by :func:`reference_matcher`, else
    built here); patches as (D, P) arrays."""
    pm = pm or reference_matcher(matcher, preset)
    q = [torch.tensor(a).T for a in query_patches]
    return np.array([pm.match(q, [torch.tensor(a) for a in db])[0] for db in db_patches_list], dtype=np.float64)


def reference_fused(raw: np.ndarray, weights: Any) -> np.ndarray:
    """(N,) fused scores as local_matcher.py fuses the (N, S) raw scores (``normalise_func``)."""
    from patchnetvlad.models.local_matcher import normalise_func

    return normalise_func(raw, raw.shape[1], np.asarray(weights, float))


def reference_order(raw: np.ndarray, weights: Any) -> np.ndarray:
    """(N,) candidate order as local_matcher.py sorts it: ``np.argsort`` of the fused scores."""
    return np.argsort(reference_fused(raw, weights))
