"""NetVLAD pooling, integral patch pooling (Patch-NetVLAD) and WPCA.

The computation is the reference's (``patchnetvlad==0.1.8``), done in one
pass without its per-cluster Python loop: soft-assign every location, form
the K x C residual map once, take the global VLAD as its sum and every
patch VLAD as a box sum of its integral image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pnv_ros.model.backbone import ENCODER_DIM, make_backbone


def vlad_normalise(v: torch.Tensor) -> torch.Tensor:
    """Intra-normalise per cluster, flatten and L2-normalise.

    v: (..., K, C) -> (..., K*C).
    """
    v = F.normalize(v, p=2, dim=-1)
    v = v.flatten(-2)
    return F.normalize(v, p=2, dim=-1)


def box_sums(integral: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Sums over every size x size window of a zero-padded integral image.

    integral: (B, D, h+1, w+1) -> (B, D, rows, cols), rows = (h - size)//stride + 1.
    Same values as the reference's dilated [[1, -1], [-1, 1]] convolution.
    """
    h1, w1 = integral.shape[-2:]
    rows = (h1 - 1 - size) // stride + 1
    cols = (w1 - 1 - size) // stride + 1
    r_end = (rows - 1) * stride + 1
    c_end = (cols - 1) * stride + 1
    tl = integral[..., 0:r_end:stride, 0:c_end:stride]
    tr = integral[..., 0:r_end:stride, size : size + c_end : stride]
    bl = integral[..., size : size + r_end : stride, 0:c_end:stride]
    br = integral[..., size : size + r_end : stride, size : size + c_end : stride]
    return tl - tr - bl + br


class NetVLADPooling(nn.Module):
    """NetVLAD (vladv1; vladv2 when the assignment conv has a bias).

    Parameters as in the checkpoint: ``conv.weight`` (K, C, 1, 1), optional
    ``conv.bias`` (K,), ``centroids`` (K, C).
    """

    def __init__(self, num_clusters: int = 64, dim: int = ENCODER_DIM, bias: bool = False) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.dim = dim
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=(1, 1), bias=bias)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    def residuals(self, feats: torch.Tensor) -> torch.Tensor:
        """Soft-assigned residual map.

        feats: (B, C, h, w) backbone output -> (B, K, C, h, w), r_k(i) = a_k(i)(x_i - c_k).
        """
        b, c, h, w = feats.shape
        x = F.normalize(feats, p=2, dim=1)
        assign = F.softmax(self.conv(x), dim=1)  # (B, K, h, w)
        res = x.unsqueeze(1) - self.centroids.view(1, self.num_clusters, c, 1, 1)
        res *= assign.unsqueeze(2)
        return res

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Global VLAD. feats: (B, C, h, w) -> (B, K*C), unit length."""
        return vlad_normalise(self.residuals(feats).sum(dim=(-2, -1)))


class PatchNetVLADModel(nn.Module):
    """Backbone, NetVLAD pooling and WPCA, with the checkpoint's module names.

    ``state_dict()`` keys are the authors': ``encoder.*``, ``pool.*``,
    ``WPCA.0.*``. ``num_pcs`` = 0 means no WPCA (descriptors of K*512 values).
    """

    def __init__(self, num_clusters: int = 64, num_pcs: int = 4096, vladv2: bool = False) -> None:
        super().__init__()
        self.encoder = make_backbone()
        self.pool = NetVLADPooling(num_clusters, ENCODER_DIM, bias=vladv2)
        self.num_pcs = num_pcs
        if num_pcs > 0:
            self.WPCA = nn.Sequential(nn.Conv2d(num_clusters * ENCODER_DIM, num_pcs, kernel_size=(1, 1)))

    @property
    def dim(self) -> int:
        """Dimension of the output descriptors."""
        return self.num_pcs if self.num_pcs > 0 else self.pool.num_clusters * ENCODER_DIM

    def project(self, vlad: torch.Tensor) -> torch.Tensor:
        """WPCA then L2 normalisation. vlad: (N, K*C) -> (N, D)."""
        if self.num_pcs <= 0:
            return vlad
        conv = self.WPCA[0]
        out = F.linear(vlad, conv.weight.flatten(1), conv.bias)
        return F.normalize(out, p=2, dim=-1)

    def forward(
        self, images: torch.Tensor, patch_sizes: tuple[int, ...] = (), strides: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global and patch descriptors.

        images: (B, 3, H, W) normalised RGB.
        Returns global (B, D) and, per patch size, (B, P, D) with patches in
        row-major order over the (row, col) patch grid.
        """
        feats = self.encoder(images)
        res = self.pool.residuals(feats)  # (B, K, C, h, w)
        b, k, c, h, w = res.shape
        global_desc = self.project(vlad_normalise(res.sum(dim=(-2, -1))))
        patches: list[torch.Tensor] = []
        if patch_sizes:
            flat = res.view(b, k * c, h, w)
            integral = flat.cumsum(dim=-1).cumsum(dim=-2)
            integral = F.pad(integral, (1, 0, 1, 0))
            del res, flat
            for size, stride in zip(patch_sizes, strides):
                sums = box_sums(integral, size, stride) / float(size * size)  # (B, K*C, r, c)
                sums = sums.flatten(2).transpose(1, 2).reshape(b, -1, k, c)  # (B, P, K, C)
                vlad = vlad_normalise(sums)  # (B, P, K*C)
                patches.append(self.project(vlad.reshape(-1, k * c)).view(b, -1, self.dim))
        return global_desc, patches
