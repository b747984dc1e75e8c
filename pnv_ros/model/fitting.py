"""Fitting a NetVLAD vocabulary and whitening PCA on a backbone's feature maps, for every model family.

The authors' recipe, generic over backbones (VGG-16 conv5_3 grids, DINOv2 token grids): seeded k-means of
sampled L2-normalised local descriptors (their ``get_clusters``), the vladv1 assignment initialisation
(``init_params``), the whitening PCA of normalised VLAD vectors (``pca`` + ``add_pca``); and where the
default fitting set (the repository's corridor images) is found. The builders (``default_model``,
``dinov2_vlad``), ``pnv models refit``, training and the int8 calibration use it; it knows no family.
Everything is seeded: the same inputs on the same CPU give the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pnv_ros.errors import CheckpointError, ImageError
from pnv_ros.images import ImageSource
from pnv_ros.model.netvlad import PatchNetVLADModel, vlad_normalise

SEED = 0
DESCS_PER_IMAGE = 100  # local descriptors sampled per image for k-means (authors: 100)
PATCHES_PER_IMAGE = 8  # patch VLADs sampled per image and patch size for PCA
PCA_PATCH_SIZES = (2, 5, 8)

# The default fitting set: the corridor images, ref then query (the order the default model was built with).
FIT_SET = "corridor_vprbench"
FIT_PARTS = ("ref", "query")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository root when run from a checkout


def fitting_set_candidates() -> list[Path]:
    """Where the default fitting set is looked for, in order (each holds ``ref/`` and ``query/``).

    1. the source tree (a repository checkout, an editable install);
    2. ``<prefix>/share/pnv_ros/data/`` of a pip install (``sys.prefix``; the user base for ``--user``);
    3. the package's share folder in the ament index (a colcon or apt install), when ament is importable.
    """
    import site

    found = [_SOURCE_ROOT / "data" / FIT_SET]
    for prefix in (sys.prefix, site.USER_BASE):
        if prefix:
            found.append(Path(prefix) / "share" / "pnv_ros" / "data" / FIT_SET)
    try:
        from ament_index_python.packages import get_package_share_directory

        found.append(Path(get_package_share_directory("pnv_ros")) / "data" / FIT_SET)
    except Exception:  # not importable, or no pnv_ros in the index (PackageNotFoundError, ValueError)
        pass
    return list(dict.fromkeys(found))


def find_fitting_set(candidates: Sequence[Path] | None = None) -> list[Path]:
    """The default fitting set's folders (``ref``, ``query``) from the first candidate that has both."""
    roots = [Path(c) for c in (fitting_set_candidates() if candidates is None else candidates)]
    for root in roots:
        if all((root / part).is_dir() for part in FIT_PARTS):
            return [root / part for part in FIT_PARTS]
    looked = "; ".join(str(r) for r in roots) or "nowhere"
    raise CheckpointError(
        f"the default fitting set ({FIT_SET}/{{{','.join(FIT_PARTS)}}}) was not found; looked in: {looked}. "
        "Reinstall the package with its data files, or give fitting images: "
        "pnv models build-default --fit DIR [DIR ...]"
    )


def _kmeans(descs: np.ndarray, k: int, seed: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(descs.shape[1], k, niter=100, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(descs, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32)


def netvlad_init(centroids: np.ndarray, descs: np.ndarray) -> torch.Tensor:
    """The authors' vladv1 ``init_params``: conv weight = alpha * normalised centroids."""
    assign = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    dots = np.sort(assign @ descs.T, axis=0)[::-1]
    alpha = float(-np.log(0.01) / np.mean(dots[0] - dots[1]))
    return torch.from_numpy(alpha * assign).float()[:, :, None, None]


def whitening_pca(x: np.ndarray, num_pcs: int) -> tuple[np.ndarray, np.ndarray]:
    """The authors' ``pca`` (dual form) and ``add_pca``: y = W (v - mu), whitened.

    x: (N, D) rows. Returns weight (num_pcs, D) and bias (num_pcs,).
    """
    x = x.astype(np.float64)
    n = x.shape[0]
    if n <= num_pcs:
        raise CheckpointError(f"PCA to {num_pcs} dimensions needs more than {num_pcs} samples, got {n}")
    mu = x.mean(axis=0)
    xc = x - mu
    gram = xc @ xc.T / (n - 1)
    lams, u = np.linalg.eigh(gram)
    order = np.argsort(lams)[::-1][:num_pcs]
    lams, u = lams[order], u[:, order]
    u = xc.T @ (u / np.sqrt(np.maximum(lams, 1e-9))) / np.sqrt(n - 1)  # unit eigenvectors in D
    u = u / np.sqrt(lams + 1e-9)
    return u.T.astype(np.float32), (-(u.T @ mu)).astype(np.float32)


def window_sums(integral: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Sums over chosen size x size windows of a zero-padded integral image.

    integral: (D, h+1, w+1); top, left: (n,) window corners -> (n, D). The
    corners combine in the reference's order (tl - tr - bl + br), so each sum
    is bit-identical to the same window of a full box-sum map; the result is
    contiguous, as the normalisations after it sum in memory order.
    """
    bottom, right = top + size, left + size
    sums = integral[:, top, left] - integral[:, top, right] - integral[:, bottom, left] + integral[:, bottom, right]
    return sums.T.contiguous()


def backbone_maps(
    model: PatchNetVLADModel,
    images: Iterable[ImageSource],
    to_tensor: Callable[[ImageSource], torch.Tensor],
    *,
    total: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    on_error: Callable[[int, ImageError], None] | None = None,
) -> list[torch.Tensor]:
    """The backbone's feature maps (C, h, w) of the fitting images, for either family (the blocked CPU path
    for VGG-16: same values, ~1.4x sooner). An image that cannot be decoded raises ImageError, or, with
    ``on_error``, is skipped after ``on_error(index, error)`` (which may raise)."""
    maps: list[torch.Tensor] = []
    with torch.inference_mode():
        for i, img in enumerate(images):
            try:
                x = to_tensor(img)
            except ImageError as e:
                if on_error is None:
                    raise
                on_error(i, e)
            else:
                maps.append(model.backbone(x)[0])
            if progress:
                progress("backbone", i + 1, total)
    return maps


def sample_descriptors(maps: Iterable[torch.Tensor], rng: np.random.Generator, per_image: int) -> np.ndarray:
    """(N, C): ``per_image`` L2-normalised local descriptors drawn (seeded, without replacement) from each
    feature map (C, h, w), in map order (the authors' ``get_clusters`` sampling)."""
    samples = []
    for fm in maps:
        d = F.normalize(fm.flatten(1).T, dim=1).numpy()  # (h*w, C)
        samples.append(d[rng.choice(d.shape[0], min(per_image, d.shape[0]), replace=False)])
    return np.concatenate(samples)


def set_clusters(model: PatchNetVLADModel, descs: np.ndarray, num_clusters: int, seed: int = SEED) -> None:
    """k-means (seeded with ``seed``, 100 iterations) of ``descs`` (N, C) as ``model.pool``'s words, with the
    authors' vladv1 assignment initialisation (a vladv2 bias is zeroed)."""
    threads = torch.get_num_threads()
    centroids = _kmeans(descs, num_clusters, seed)
    torch.set_num_threads(threads)  # faiss's OpenMP setting must not change torch's
    with torch.no_grad():
        model.pool.centroids.copy_(torch.from_numpy(centroids))
        model.pool.conv.weight.copy_(netvlad_init(centroids, descs))
        if model.pool.conv.bias is not None:
            model.pool.conv.bias.zero_()


@dataclass
class VocabularyFit:
    """What :func:`fit_vocabulary` fitted and from how much: descs (N, C) sampled local descriptors,
    vecs (list of (n, K*C) VLAD vectors) the PCA was fitted on, and the WPCA (D, K*C), (D,)."""

    descs: np.ndarray
    vecs: list[np.ndarray]
    wpca_weight: np.ndarray
    wpca_bias: np.ndarray


def fit_vocabulary(
    model: PatchNetVLADModel,
    maps: Sequence[torch.Tensor],
    rng: np.random.Generator,
    num_clusters: int,
    num_pcs: int,
    *,
    descs_per_image: int = DESCS_PER_IMAGE,
    patch_sizes: Sequence[int] = PCA_PATCH_SIZES,
    patches_per_image: int = PATCHES_PER_IMAGE,
    progress: Callable[[str, int, int], None] | None = None,
    fit_clusters: bool = True,
    seed: int = SEED,
) -> VocabularyFit:
    """The NetVLAD vocabulary and WPCA of a model from its backbone's feature maps (C, h, w) of the
    fitting images, for any backbone: k-means (seeded) of sampled L2-normalised local descriptors,
    the authors' vladv1 assignment initialisation, then the whitening PCA of normalised VLAD vectors
    (global and sampled patches of ``patch_sizes`` cells; ``patches_per_image=0``: global ones only, the
    authors' ``add_pca.py`` rule). Sets ``model.pool`` in place.

    ``fit_clusters=False`` keeps ``model.pool`` (``pnv add-pca``): the descriptors are still drawn, so the
    seeded stream that picks the PCA's patches is the builder's and the same inputs give the same WPCA.
    ``seed`` seeds the k-means (``rng`` draws the samples)."""
    descs = sample_descriptors(maps, rng, descs_per_image)
    if fit_clusters:
        if progress:
            progress("k-means", 0, 1)
        set_clusters(model, descs, num_clusters, seed)
    vecs = []
    with torch.inference_mode():
        for i, fm in enumerate(maps):
            res = model.pool.residuals(fm[None])  # (1, K, C, h, w)
            _, k, c, h, w = res.shape
            vecs.append(vlad_normalise(res.sum(dim=(-2, -1))).numpy())
            integral = F.pad(res.view(1, k * c, h, w).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
            for size in patch_sizes if patches_per_image > 0 else ():  # only the sampled windows' sums
                if size > min(h, w):
                    continue
                cols = w - size + 1
                n = min(patches_per_image, (h - size + 1) * cols)
                pick = torch.from_numpy(rng.choice((h - size + 1) * cols, n, replace=False))
                sums = window_sums(integral[0], pick // cols, pick % cols, size)  # (n, K*C)
                vecs.append(vlad_normalise(sums.reshape(-1, k, c)).numpy())
            if progress:
                progress("vlad", i + 1, len(maps))
    if progress:
        progress("pca", 0, 1)
    weight, bias = whitening_pca(np.concatenate(vecs), num_pcs)
    return VocabularyFit(descs, vecs, weight, bias)
