"""NetVLAD pooling, integral patch pooling (Patch-NetVLAD) and WPCA.

The computation is the reference's (``patchnetvlad==0.1.8``), done in one
pass without its per-cluster Python loop: soft-assign every location, form
the K x C residual map once, take the global VLAD as its sum and every
patch VLAD as a box sum of its integral image.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pnv_ros.model.backbone import ENCODER_DIM, BlockedBackbone, make_backbone


def vlad_normalise(v: torch.Tensor) -> torch.Tensor:
    """Intra-normalise per cluster, flatten and L2-normalise.

    v: (..., K, C) -> (..., K*C).
    """
    v = F.normalize(v, p=2, dim=-1)
    v = v.flatten(-2)
    return F.normalize(v, p=2, dim=-1)


def _column_norms(v: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``v.norm(2, 0, keepdim=True)`` with its very bits, ~7x sooner on CPU for a tall (K*C, P) matrix.

    v: (N, P) float32 contiguous; scratch: (N, P) float32 contiguous, overwritten. Returns (1, P).
    Off the CPU: torch's own norm.
    torch's norm over a strided dimension adds the squares in order, one row after another (a
    sequential float32 sum per column) but walks each column separately; numpy's reduction along a
    C-contiguous array's first axis adds whole rows in the same order (tested bit-identical:
    test_equivalence compares the descriptors with the reference's).
    """
    if v.device.type != "cpu":
        return v.norm(2, 0, keepdim=True)
    torch.mul(v, v, out=scratch)
    return torch.from_numpy(np.sqrt(np.add.reduce(scratch.numpy(), axis=0))).unsqueeze(0)


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

    #: the preset backbone (``config.BACKBONES``) whose feature grid this model pools
    backbone_name = "vgg16"

    def __init__(
        self,
        num_clusters: int = 64,
        num_pcs: int = 4096,
        vladv2: bool = False,
        *,
        encoder: nn.Module | None = None,
        channels: int = ENCODER_DIM,
    ) -> None:
        super().__init__()
        self.encoder = make_backbone() if encoder is None else encoder
        self.pool = NetVLADPooling(num_clusters, channels, bias=vladv2)
        self.num_pcs = num_pcs
        if num_pcs > 0:
            self.WPCA = nn.Sequential(nn.Conv2d(num_clusters * channels, num_pcs, kernel_size=(1, 1)))
        # Large work buffers (~160 MB at 640x480), kept per thread: allocating
        # them afresh costs more in page faults than the arithmetic on them.
        self._scratch = threading.local()
        self._blocked: dict[torch.dtype, BlockedBackbone] = {}

    def traceable_backbone(self) -> nn.Module:
        """The backbone as a plain module for the ONNX exporter (images -> (B, C, h, w)): VGG-16's encoder
        (:meth:`backbone` takes oneDNN's blocked-layout path on CPU, which does not trace)."""
        return self.encoder.eval()

    def backbone(self, images: torch.Tensor) -> torch.Tensor:
        """conv5_3 features. images: (B, 3, H, W) -> (B, 512, H//16, W//16).

        Inference on CPU takes the blocked-layout path: float32 (same values,
        sooner), or bfloat16 under bfloat16 autocast (autocast's arithmetic,
        sooner). Anything else (GPU, gradients, other autocast) the plain modules.
        """
        dtype = torch.float32
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        fast = (
            images.device.type == "cpu"
            and images.dtype == torch.float32
            and not torch.is_grad_enabled()
            and dtype in (torch.float32, torch.bfloat16)
            and BlockedBackbone.available(dtype)
        )
        if not fast:
            return self.encoder(images)
        blocked = self._blocked[dtype] = BlockedBackbone.for_module(self.encoder, self._blocked.get(dtype), dtype)
        return blocked(images)

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor, zero: bool = False) -> torch.Tensor:
        """A reusable tensor of this shape (zeroed when first made if ``zero``); not cached under autograd."""
        cache = self._scratch.__dict__.setdefault("cache", {})
        t = cache.get(name)
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device or torch.is_grad_enabled():
            t = like.new_zeros(shape) if zero else like.new_empty(shape)
            if not torch.is_grad_enabled():
                cache[name] = t
        return t

    def _bf16_wpca(self) -> torch.Tensor:
        """The WPCA weight as a (D, K*C) bfloat16 matrix, made once per weight tensor and version (an in-place
        ``load_state_dict`` bumps the version)."""
        w = self.WPCA[0].weight
        key = (id(w), w._version, w.device)
        cached = self._scratch.__dict__.get("wpca_bf16")
        if cached is None or cached[0] != key:
            cached = (key, w.detach().reshape(w.shape[0], -1).to(torch.bfloat16).contiguous())
            self._scratch.__dict__["wpca_bf16"] = cached
        return cached[1]

    @property
    def dim(self) -> int:
        """Dimension of the output descriptors."""
        return self.num_pcs if self.num_pcs > 0 else self.pool.num_clusters * self.pool.dim

    def project(self, vlad: torch.Tensor) -> torch.Tensor:
        """WPCA then L2 normalisation. vlad: (N, K*C) -> (N, D)."""
        if self.num_pcs <= 0:
            return vlad
        conv = self.WPCA[0]
        out = F.linear(vlad, conv.weight.flatten(1), conv.bias)
        return F.normalize(out, p=2, dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        patch_sizes: tuple[int, ...] = (),
        strides: tuple[int, ...] = (),
        projection: str = "exact",
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global and patch descriptors.

        images: (B, 3, H, W) normalised RGB.
        Returns global (B, D) and, per patch size, (B, P, D) with patches in
        row-major order over the (row, col) patch grid.

        The residual map r_k(i) is written once, straight into a zero-padded
        buffer that two in-place cumulative sums turn into its integral image;
        the global VLAD is the integral's last cell, every patch VLAD a box
        sum of it. Patch vectors stay in (K*C, P) layout, so WPCA is one
        (D, K*C) x (K*C, P) product per image with no large transpose.

        Under autocast only the backbone runs in reduced precision: pooling
        and WPCA always run in float32. A box sum is a small difference of
        large integral values, and a bfloat16 integral (8-bit mantissa) left
        patch descriptors at a median cosine of 0.73 to float32's.

        ``projection``: as :meth:`_pool`.
        """
        feats = self.backbone(images)
        with torch.autocast(images.device.type, enabled=False):
            return self._pool(feats.float(), patch_sizes, strides, projection)

    def _pool(
        self,
        feats: torch.Tensor,
        patch_sizes: tuple[int, ...],
        strides: tuple[int, ...],
        projection: str = "exact",
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feats: (B, C, h, w) float32 conv5_3 -> global (B, D) and patches, as ``forward``.

        ``projection``: how the patch descriptors' WPCA product runs. "exact" (default, every float32 path):
        as the reference rounds it. "bf16": one bfloat16 matrix product (float32 accumulation; AMX or AVX-512
        BF16), ~4-8x sooner on such CPUs; for the int8 engines, whose descriptors are a variant of the model's
        anyway (``pnv_ros.engines.variant``). Integral, box sums and normalisations stay float32 either way.
        "reference": the reference's arithmetic step for step (:meth:`_pool_reference`): global and patch
        descriptors bit-identical to ``patchnetvlad==0.1.8``'s on CPU float32, at a cost (see
        docs/results/pooling_exact.md); "exact" agrees with it to ~2e-6.

        Pooled one image at a time: oneDNN picks its product kernels by batch size, and a box sum
        (a small difference of large integral values) turns their last-bit differences into patch
        descriptors moved by up to 0.004, enough to change RANSAC inlier counts. Per image, a
        descriptor is the same whatever the batch it came in (tested); the backbone's convolutions
        are already batch-independent on CPU (bit-identical, tested)."""
        if feats.shape[0] > 1:
            parts = [self._pool(feats[i : i + 1], patch_sizes, strides, projection) for i in range(feats.shape[0])]
            return torch.cat([g for g, _ in parts]), [torch.cat(ps) for ps in zip(*(p for _, p in parts))]
        if projection == "reference":
            return self._pool_reference(feats, patch_sizes, strides)
        b, c, h, w = feats.shape
        k = self.pool.num_clusters
        x = F.normalize(feats, p=2, dim=1)
        assign = F.softmax(self.pool.conv(x), dim=1)  # (B, K, h, w)
        # The pad row and column are zeroed once and stay zero: cumsums of zeros.
        integral = self._buffer("integral", (b, k, c, h + 1, w + 1), x, zero=True)
        inner = integral[..., 1:, 1:]
        torch.sub(x.unsqueeze(1), self.pool.centroids.view(1, k, c, 1, 1), out=inner)
        inner.mul_(assign.unsqueeze(2))
        integral.cumsum_(dim=-1).cumsum_(dim=-2)
        global_desc = self.project(vlad_normalise(integral[..., -1, -1].clone()))
        patches: list[torch.Tensor] = []
        flat = integral.view(b, k * c, h + 1, w + 1)
        for size, stride in zip(patch_sizes, strides):
            patches.append(self._patch_descriptors(flat, size, stride, k, c, projection))
        return global_desc, patches

    def _patch_descriptors(
        self, integral: torch.Tensor, size: int, stride: int, k: int, c: int, projection: str = "exact"
    ) -> torch.Tensor:
        """integral: (B, K*C, h+1, w+1) -> (B, P, D) normalised, projected patch descriptors."""
        b = integral.shape[0]
        h1, w1 = integral.shape[-2:]
        rows, cols = (h1 - 1 - size) // stride + 1, (w1 - 1 - size) // stride + 1
        r_end, c_end = (rows - 1) * stride + 1, (cols - 1) * stride + 1
        v = self._buffer(f"box{size}_{stride}", (b, k * c, rows, cols), integral)
        # Corners in the reference's order (tl - tr - bl + br): for a cluster
        # with little mass in a window the box sum is a small difference of
        # large integral values, so rounding decides its direction and the
        # order must be the same to reproduce the reference's descriptors.
        torch.sub(
            integral[..., 0:r_end:stride, 0:c_end:stride],
            integral[..., 0:r_end:stride, size : size + c_end : stride],
            out=v,
        )
        v -= integral[..., size : size + r_end : stride, 0:c_end:stride]
        v += integral[..., size : size + r_end : stride, size : size + c_end : stride]
        v = v.view(b, k, c, rows * cols)  # (B, K, C, P): box sums, not yet divided by p^2
        # Intra-normalisation then L2 over K*C, in one pass: after the first,
        # cluster k has norm n_k / max(n_k, eps), so the total norm follows
        # from the (B, K, P) cluster norms alone. The reference normalises the
        # mean (sum / p^2) with eps = 1e-12; clamping the sum's norm at
        # 1e-12 * p^2 is the same, and it matters: a trained model's sharp
        # assignments leave clusters with norms near 1e-11.
        norms = v.norm(dim=2)  # (B, K, P)
        inv = 1.0 / norms.clamp(min=1e-12 * size * size)
        total = (norms * inv).square_().sum(dim=1, keepdim=True).sqrt_().clamp_(min=1e-12)  # (B, 1, P)
        v.mul_((inv / total).unsqueeze(2))
        v = v.view(b, k * c, -1)
        if self.num_pcs <= 0:
            return v.transpose(1, 2)
        conv = self.WPCA[0]
        if projection == "bf16":
            w16 = self._bf16_wpca()
            out = torch.matmul(w16, v.to(torch.bfloat16)).float()  # (B, D, P)
            out += conv.bias.view(1, -1, 1)
        elif v.device.type == "cpu":
            # The WPCA as the 1x1 convolution it is, over P "pixels": oneDNN's
            # product, ~20% sooner than MKL's matmul on the AMD EPYC we measure on.
            out = F.conv2d(v.unsqueeze(-1), conv.weight, conv.bias).squeeze(-1)  # (B, D, P)
        else:
            out = torch.matmul(conv.weight.view(self.num_pcs, k * c), v)  # (B, D, P)
            out += conv.bias.view(1, -1, 1)
        return F.normalize(out, p=2, dim=1).transpose(1, 2)

    def _pool_reference(
        self, feats: torch.Tensor, patch_sizes: tuple[int, ...], strides: tuple[int, ...]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One image's descriptors with the reference's arithmetic (``PatchNetVLAD.forward``,
        ``get_square_regions_from_integral`` and ``get_pca_encoding`` of ``patchnetvlad==0.1.8``).

        feats: (1, C, h, w) float32 -> global (1, D), patches [(1, P, D)], as :meth:`_pool`. Every reduction
        runs on a tensor of the reference's shape and memory layout, so the same kernels sum in the same order:
        the global VLAD as the sum over the flat (h*w) residual map (not the integral's last cell); each patch
        box sum divided by p^2, ``F.normalize`` over C then over K*C in the (K*C, P) layout; the WPCA as a
        convolution over a batch of P 1x1 images (oneDNN rounds a batch of P differently from P pixels of one
        image), its output normalised per row. Box sums take the reference's corner order (tl - tr - bl + br,
        its 2x2 dilated kernel's). The normalisations run in place (same values as ``F.normalize``'s).
        """
        b, c, h, w = feats.shape
        k = self.pool.num_clusters
        x = F.normalize(feats, p=2, dim=1)
        assign = F.softmax(self.pool.conv(x), dim=1)  # (1, K, h, w)
        res = self._buffer("residuals", (b, k, c, h, w), x)
        torch.sub(x.unsqueeze(1), self.pool.centroids.view(1, k, c, 1, 1), out=res)
        res.mul_(assign.unsqueeze(2))
        glob = F.normalize(res.view(b, k, c, h * w).sum(dim=-1), p=2, dim=2).view(b, k * c)
        glob = self._project_reference(F.normalize(glob, p=2, dim=1))
        integral = self._buffer("integral", (b, k, c, h + 1, w + 1), x, zero=True)
        torch.cumsum(res, dim=-1, out=integral[..., 1:, 1:])
        integral.cumsum_(dim=-2)
        flat = integral.view(b, k * c, h + 1, w + 1)
        patches: list[torch.Tensor] = []
        for size, stride in zip(patch_sizes, strides):
            rows, cols = (h - size) // stride + 1, (w - size) // stride + 1
            r_end, c_end = (rows - 1) * stride + 1, (cols - 1) * stride + 1
            v = self._buffer(f"box{size}_{stride}", (b, k * c, rows, cols), flat)
            torch.sub(
                flat[..., 0:r_end:stride, 0:c_end:stride],
                flat[..., 0:r_end:stride, size : size + c_end : stride],
                out=v,
            )
            v -= flat[..., size : size + r_end : stride, 0:c_end:stride]
            v += flat[..., size : size + r_end : stride, size : size + c_end : stride]
            v.div_(size * size)
            p = rows * cols
            v4 = v.view(b, k, c, p)
            v4.div_(v4.norm(2, 2, keepdim=True).clamp_min_(1e-12))
            v3 = v.view(b, k * c, p)
            rows_t = self._buffer("transposed", (p, k * c), v3)  # (P, K*C): the reference's WPCA input
            v3.div_(_column_norms(v3[0], rows_t.view(k * c, p)).clamp_min_(1e-12))
            if self.num_pcs <= 0:
                patches.append(v3.transpose(1, 2))
                continue
            rows_t.copy_(v3[0].t())
            patches.append(self._project_reference(rows_t).unsqueeze(0))
        return glob, patches

    def _project_reference(self, vlad: torch.Tensor) -> torch.Tensor:
        """WPCA as ``get_pca_encoding``: a 1x1 convolution over N 1x1 images, then L2 per row.
        vlad: (N, K*C) contiguous -> (N, D); unchanged without WPCA."""
        if self.num_pcs <= 0:
            return vlad
        conv = self.WPCA[0]
        out = F.conv2d(vlad.view(*vlad.shape, 1, 1), conv.weight, conv.bias)
        return F.normalize(out.view(vlad.shape[0], -1), p=2, dim=-1)
