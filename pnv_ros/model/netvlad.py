"""NetVLAD pooling, integral patch pooling (Patch-NetVLAD) and WPCA.

The computation is the reference's (``patchnetvlad==0.1.8``), done in one
pass without its per-cluster Python loop: soft-assign every location, form
the K x C residual map once, take the global VLAD as its sum and every
patch VLAD as a box sum of its integral image.
"""

from __future__ import annotations

import threading
import time

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


#: the fast pooling's product dtype per ``projection`` name (``PatchNetVLADModel._pool_fast``)
FAST = {"fast": torch.bfloat16, "fast32": torch.float32}


def _version(t: torch.Tensor | None) -> int:
    """A tensor's in-place version counter (-1 for None or an inference tensor, which has none)."""
    try:
        return -1 if t is None else int(t._version)
    except RuntimeError:
        return -1


def _windows(t: torch.Tensor, size: int, stride: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every size x size window of a (h, w, F) contiguous grid at ``stride``, row-major: (P, size^2, F), a copy
    (into ``out`` of that shape and dtype when given)."""
    h, w, f = t.shape
    rows, cols = (h - size) // stride + 1, (w - size) // stride + 1
    s0, s1, s2 = t.stride()
    view = t.as_strided((rows, cols, size, size, f), (stride * s0, stride * s1, s0, s1, s2))
    if out is None:
        return view.reshape(rows * cols, size * size, f)
    out.view(rows, cols, size, size, f).copy_(view)
    return out


class _Clock:
    """Adds the seconds since the last mark to ``timings[name]`` (nothing when ``timings`` is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings, self.t = timings, time.perf_counter()

    def mark(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now


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

    def _wpca_cache(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the fast pooling needs of the weights: the WPCA weight as a (D, K*C) matrix in ``dtype``, the
        projected centroids ``W_k c_k`` as (K, D) float32 (zeros (K, 0) without WPCA) and the centroids' squared
        norms (K,) float32. Made once per weight tensor, storage, version and ``dtype``: an in-place
        ``load_state_dict`` bumps the version, a ``.data`` assignment changes the storage; an in-place change of
        an inference tensor (no version counter) is not seen."""
        w, cent = (self.WPCA[0].weight if self.num_pcs > 0 else None), self.pool.centroids
        key = tuple((id(t), None if t is None else t.data_ptr(), _version(t)) for t in (w, cent)) + (cent.device, dtype)
        cached = self._scratch.__dict__.get("wpca_low")
        if cached is None or cached[0] != key:
            k, c = cent.shape
            cent_d = cent.detach()
            if w is None:
                w_low, wc = cent_d.new_zeros(0, k * c, dtype=dtype), cent_d.new_zeros(k, 0)
            else:
                w2 = w.detach().reshape(w.shape[0], -1)
                w_low = w2.to(dtype).contiguous()
                wc = torch.einsum("dkc,kc->kd", w2.view(-1, k, c), cent_d).contiguous()
            cached = (key, (w_low, wc, cent_d.square().sum(1)))
            self._scratch.__dict__["wpca_low"] = cached
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
        timings: dict[str, float] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """feats: (B, C, h, w) float32 conv5_3 -> global (B, D) and patches, as ``forward``.

        ``timings``: when given, seconds are added to its ``pooling`` (assignment, residuals and the global
        descriptor) and ``patch_descriptors`` (every scale's, WPCA included) entries.

        ``projection``: how the patch descriptors' WPCA product runs. "exact" (default, every float32 path):
        as the reference rounds it. "bf16": one bfloat16 matrix product (float32 accumulation; AMX or AVX-512
        BF16), ~4-8x sooner on such CPUs; for the int8 engines, whose descriptors are a variant of the model's
        anyway (``pnv_ros.engines.variant``). Integral, box sums and normalisations stay float32 either way.
        "reference": the reference's arithmetic step for step (:meth:`_pool_reference`): global and patch
        descriptors bit-identical to ``patchnetvlad==0.1.8``'s on CPU float32, at a cost (see
        docs/results/pooling_exact.md); "exact" agrees with it to ~2e-6.
        "fast" / "fast32": the same descriptors computed another way (:meth:`_pool_fast`, no residual integral),
        its two large products in bfloat16 ("fast") or float32 ("fast32"); for every path that is not the exact
        float32 one (``FeatureExtractor.pooling``).

        Pooled one image at a time: oneDNN picks its product kernels by batch size, and a box sum
        (a small difference of large integral values) turns their last-bit differences into patch
        descriptors moved by up to 0.004, enough to change RANSAC inlier counts. Per image, a
        descriptor is the same whatever the batch it came in (tested); the backbone's convolutions
        are already batch-independent on CPU (bit-identical, tested)."""
        if feats.shape[0] > 1:
            parts = [
                self._pool(feats[i : i + 1], patch_sizes, strides, projection, timings) for i in range(feats.shape[0])
            ]
            return torch.cat([g for g, _ in parts]), [torch.cat(ps) for ps in zip(*(p for _, p in parts))]
        clock = _Clock(timings)
        if projection == "reference":
            return self._pool_reference(feats, patch_sizes, strides, clock)
        if projection in FAST:
            return self._pool_fast(feats, patch_sizes, strides, FAST[projection], clock)
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
        clock.mark("pooling")
        patches: list[torch.Tensor] = []
        flat = integral.view(b, k * c, h + 1, w + 1)
        for size, stride in zip(patch_sizes, strides):
            patches.append(self._patch_descriptors(flat, size, stride, k, c, projection))
        clock.mark("patch_descriptors")
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
            w16 = self._wpca_cache(torch.bfloat16)[0]
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

    def _pool_fast(
        self,
        feats: torch.Tensor,
        patch_sizes: tuple[int, ...],
        strides: tuple[int, ...],
        low: torch.dtype,
        clock: _Clock | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One image's descriptors without the residual integral: feats (1, C, h, w) float32 -> global (1, D),
        patches [(1, P, D)], as :meth:`_pool`.

        The (K, C, h+1, w+1) integral (~166 MB for VGG-16 at 640 x 480), its box sums and the (K*C, P) patch
        matrix are each several passes over memory; here the same quantities come from small products:

        - global VLAD: ``A^T X - diag(sum A) c`` with X (hw, C) the normalised features, A (hw, K) the
          soft-assignment, c (K, C) the centroids;
        - a window w's residual sum for word k, ``v_wk = sum_i a_ik (x_i - c_k)``, has the squared norm
          ``a^T G_w a - 2 m (a . x c_k) + m^2 |c_k|^2`` (G_w the window's (p^2, p^2) Gram matrix of features,
          m the word's mass in the window), so intra-normalisation and the L2 norm over K*C need no v_wk;
        - WPCA is linear, so with the normalising factors s_wk folded into the assignments (beta = a s), the
          projected patch descriptor is ``W vec(beta^T X_w) - sum_k (sum_i beta_ik) W_k c_k + b``: one batched
          (K, p^2) x (p^2, C) product per window and one (D, K*C) x (K*C, P) product, both in ``low``
          (bfloat16 on AMX / AVX-512 BF16 CPUs and GPUs, float32 accumulation), the centroid term in float32.

        No box sum is a difference of two integral values, so a word with little mass in a window is not
        rounding noise here: the result is closer to the float64 descriptors than the float32 integral is
        (RTAB-Map images, VGG-16 default: patch cosine to float64 >= 0.9999999 in float32, >= 0.99997 with
        bfloat16 products; the float32 integral down to 0.62; docs/results/pooling_fast.md). Its own
        conditioning limit: the squared norm and the centroid term are differences of values of the order of the
        word's mass, so a word whose centroid nearly equals its weighted mean in a window (residual / mass below
        ~1e-3) loses digits; on the RTAB-Map images that ratio is >= 0.23 (VGG-16 default).
        """
        _, c, h, w = feats.shape
        k = self.pool.num_clusters
        x = F.normalize(feats, p=2, dim=1)
        assign = F.softmax(self.pool.conv(x), dim=1)  # (1, K, h, w)
        cent = self.pool.centroids
        X = x[0].permute(1, 2, 0).contiguous()  # (h, w, C)
        A = assign[0].permute(1, 2, 0).contiguous()  # (h, w, K)
        xf, af = X.view(h * w, c), A.view(h * w, k)
        vlad = af.t() @ xf - af.sum(0).unsqueeze(1) * cent  # (K, C)
        global_desc = self.project(vlad_normalise(vlad.unsqueeze(0)))
        clock = clock or _Clock(None)
        clock.mark("pooling")
        xc = (xf @ cent.t()).view(h, w, k)  # x_i . c_k
        w_low, wc, c2 = self._wpca_cache(low)
        x_low = X if low == torch.float32 else X.to(low)
        patches = [
            self._patch_descriptors_fast(X, x_low, A, xc, (w_low, wc, c2), size, stride)
            for size, stride in zip(patch_sizes, strides)
        ]
        clock.mark("patch_descriptors")
        return global_desc, patches

    def _patch_descriptors_fast(
        self,
        X: torch.Tensor,
        x_low: torch.Tensor,
        A: torch.Tensor,
        xc: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        size: int,
        stride: int,
    ) -> torch.Tensor:
        """One scale of :meth:`_pool_fast`. X (h, w, C) float32, x_low the same in the products' dtype, A (h, w, K)
        assignments, xc (h, w, K) ``x_i . c_k`` -> (1, P, D) (P windows row-major; (1, P, K*C) without WPCA)."""
        h, w, c = X.shape
        k = A.shape[-1]
        w_low, wc, c2 = cache
        p = ((h - size) // stride + 1) * ((w - size) // stride + 1)

        def windows(name: str, t: torch.Tensor) -> torch.Tensor:  # into a kept buffer: no fresh pages per image
            return _windows(t, size, stride, self._buffer(f"{name}{size}_{stride}", (p, size * size, t.shape[-1]), t))

        xw = windows("xw", X)  # (P, p^2, C)
        xw_low = xw if x_low is X else windows("xw_low", x_low)
        aw, xcw = windows("aw", A), windows("xcw", xc)  # (P, p^2, K)
        gram = torch.bmm(xw, xw.transpose(1, 2))  # (P, p^2, p^2)
        mass = aw.sum(1)  # (P, K)
        sq = (torch.bmm(gram, aw) * aw).sum(1) - 2 * mass * (aw * xcw).sum(1) + mass.square() * c2
        norms = sq.clamp_(min=0).sqrt_()  # |v_wk|, the box sums' norms (not divided by p^2)
        inv = 1.0 / norms.clamp(min=1e-12 * size * size)  # the reference's eps on the mean, as _patch_descriptors
        scale = inv / (norms * inv).square().sum(1, keepdim=True).sqrt().clamp(min=1e-12)  # (P, K)
        beta = (aw * scale.unsqueeze(1)).transpose(1, 2).to(x_low.dtype)  # (P, K, p^2)
        v = torch.bmm(beta, xw_low, out=self._buffer(f"v{size}_{stride}", (p, k, c), xw_low))  # sum_i beta_ik x_i
        corr = mass * scale  # (P, K): sum_i beta_ik
        if self.num_pcs <= 0:
            out = v.float() - corr.unsqueeze(-1) * self.pool.centroids.unsqueeze(0)
            return F.normalize(out.view(1, p, k * c), p=2, dim=-1)  # unit length again after the rounding
        out = torch.mm(w_low, v.view(p, k * c).t()).float()  # (D, P)
        out -= wc.t() @ corr.t()
        out += self.WPCA[0].bias.unsqueeze(1)
        return F.normalize(out, p=2, dim=0).t().unsqueeze(0)

    def _pool_reference(
        self,
        feats: torch.Tensor,
        patch_sizes: tuple[int, ...],
        strides: tuple[int, ...],
        clock: _Clock | None = None,
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
        clock = clock or _Clock(None)
        clock.mark("pooling")
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
        clock.mark("patch_descriptors")
        return glob, patches

    def _project_reference(self, vlad: torch.Tensor) -> torch.Tensor:
        """WPCA as ``get_pca_encoding``: a 1x1 convolution over N 1x1 images, then L2 per row.
        vlad: (N, K*C) contiguous -> (N, D); unchanged without WPCA."""
        if self.num_pcs <= 0:
            return vlad
        conv = self.WPCA[0]
        out = F.conv2d(vlad.view(*vlad.shape, 1, 1), conv.weight, conv.bias)
        return F.normalize(out.view(vlad.shape[0], -1), p=2, dim=-1)
