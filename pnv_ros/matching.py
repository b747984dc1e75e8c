"""Patch matching: mutual nearest neighbours, RANSAC and rapid spatial scoring,
multi-scale fusion and re-ranking.

Scores follow the reference (``patchnetvlad.tools.patch_matcher``): lower
(more negative) is better, normalised by the query's patch count. Matching is
batched over candidates: one (n, Pq, Pb) similarity product per chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import cv2
import numpy as np
import torch

from pnv_ros.config import Matcher, Preset
from pnv_ros.features import PlaceFeatures, patch_grid, patch_keypoints
from pnv_ros.products import bf16_products

T = TypeVar("T")
R = TypeVar("R")
#: One RANSAC call: (candidate, scale, query patch count, db_idx (M,), q_idx (M,)).
RansacJob = tuple[int, int, int, np.ndarray, np.ndarray]

#: Candidates per similarity product on a GPU; bounds memory at chunk x Pq x Pb
#: floats (32 x 936 x 936 x 4 B = 112 MB for the speed preset).
CHUNK = 32
#: The bfloat16 products' offset: they compute s - SIM_OFFSET, so the 8-bit rounding of the result is finest
#: around the similarities nearest neighbours have (cross-image nearest-neighbour similarity: median 0.53 VGG-16
#: default, 0.60 dinov2_vlad, 95th percentile 0.79 / 0.83 on RTAB-Map frames, int8). Measured on RTAB-Map frames
#: (VGG-16 default, int8): identical mutual matches to float32 products 88.5 % without an offset, 96.6 % at 0.5,
#: 97.7 % at 0.625, 95.9 % at 0.875 (float32 products of bfloat16-rounded inputs: 99.3 %). Exact in bfloat16.
SIM_OFFSET = 0.625
#: Columns added to the bfloat16 operands: the offset's and zeros to a multiple of 16 (oneDNN's bfloat16 blocks).
BF16_PAD = 16
#: On a CPU, small products win: a 2-candidate distance matrix (7 MB) stays in
#: cache for the passes after the product (measured 5.6 vs 10.6 ms/candidate at 32).
CPU_CHUNK = 2


@dataclass
class ScaleMatch:
    """One scale's matching of a query against one candidate.

    Attributes:
        score: the raw per-scale score (<= 0, lower is better).
        db_idx: (M,) grid indices (rows of :func:`patch_grid` / :func:`patch_keypoints`) of mutually
            matched database patches, ascending; with patch selection the kept patches' grid indices.
        query_idx: (M,) their query patches' grid indices.
        inliers: (M,) bool RANSAC inlier mask (all True for rapid scoring).
        homography: 3x3 db->query homography in network-input pixels, or None.
    """

    score: float
    db_idx: np.ndarray
    query_idx: np.ndarray
    inliers: np.ndarray
    homography: np.ndarray | None = None

    @property
    def num_matches(self) -> int:
        return int(self.db_idx.size)

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())


@dataclass
class Scores:
    """Raw scores of a query against N candidates.

    Attributes:
        raw: (N, S) per-scale scores.
        num_matches: (N, S) mutual matches.
        num_inliers: (N, S) RANSAC inliers (0 for rapid scoring).
        details: per candidate, per scale ScaleMatch, when requested.
    """

    raw: np.ndarray
    num_matches: np.ndarray
    num_inliers: np.ndarray
    details: list[list[ScaleMatch]] = field(default_factory=list)


def fuse_scores(raw: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Multi-scale fusion: z-score each scale across candidates, weight and sum.

    raw: (N, S) -> (N,). The reference's arithmetic (``normalise_func``), operation for
    operation: per scale ``np.mean`` and ``np.std`` of the column, then the weighted
    z-scores added scale by scale, so equal raw scores give equal fused scores to the
    last bit. A scale whose scores are all equal (std 0) carries no ranking
    information and contributes 0, where the reference gives NaN.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(weights):
        raise ValueError(f"scores of shape {raw.shape} do not fit {len(weights)} patch weights")
    fused = np.zeros(raw.shape[0])
    for i, w in enumerate(np.asarray(weights, dtype=np.float64)):
        col = raw[:, i]
        std = np.std(col)
        if std > 0:
            fused = fused + w * ((col - np.mean(col)) / std)
    return fused


def rerank_order(fused: np.ndarray) -> np.ndarray:
    """Candidate order, best (lowest) first; ties keep the global order.

    The reference's ``np.argsort`` (quicksort) leaves the order of exactly equal fused
    scores to numpy's sort; this order is the same wherever no two are equal.
    """
    return np.argsort(fused, kind="stable")


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _map_threads(fn: Callable[[T], R], jobs: Sequence[T]) -> list[R]:
    """``[fn(j) for j in jobs]``, spread over torch's thread count when there is more than one job."""
    global _POOL
    workers = max(1, torch.get_num_threads())
    if len(jobs) < 2 or workers < 2:
        return [fn(j) for j in jobs]
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pnv-ransac")
        pool = _POOL
    return list(pool.map(fn, jobs))


class PatchMatcher:
    """Scores candidates against a query with one preset's scales and matcher.

    Args:
        preset: patch sizes, strides, weights, input size.
        matcher: override of the preset's matcher.
        device: where the similarity products run (default CPU).
        exact: compute the similarity products and rapid spatial scores as
            the reference does (same values, same ties: on the same float32
            features the raw scores are the reference's to the last bit);
            False takes oneDNN's faster products on a CPU (float32-rounding
            differences; see ``_similarities``) and, on a GPU, rapid scoring
            vectorised over candidates (float64 sums in another order, ~1e-16
            relative).
        bf16: the similarity products in bfloat16 (the fast paths':
            extractors that are not on the exact float32 path,
            ``FeatureExtractor.pooling`` "fast"); ~3x sooner on CPUs with AMX /
            AVX-512 BF16. A bfloat16 result keeps 8 bits: similarities near
            0.9 would be rounded to 0.004 and neighbouring patches tie, so the
            product computes ``s - SIM_OFFSET`` (an extra coordinate: 1 on the
            candidates' side, -SIM_OFFSET on the query's; accumulated in float32
            before the rounding), which is small where nearest neighbours are
            decided. Mutual matches then differ from float32's at near-ties
            only (measured: 97.7 % of them identical on RTAB-Map frames, the
            int8 descriptors themselves moving far more). Ignored (float32)
            where the device has no fast bfloat16 products. No process-wide
            setting is touched.
    """

    def __init__(
        self,
        preset: Preset,
        matcher: Matcher | str | None = None,
        device: str | torch.device = "cpu",
        exact: bool = True,
        bf16: bool = False,
    ):
        self.preset = preset
        self.matcher = Matcher.parse(matcher) if matcher is not None else preset.matcher
        self.device = torch.device(device)
        n = len(preset.patch_sizes)
        self.grids = [patch_grid(preset, s) for s in range(n)]
        self.keypoints = [patch_keypoints(preset, s) for s in range(n)]
        self._grid_t = [torch.as_tensor(g, dtype=torch.float64, device=self.device) for g in self.grids]
        #: the reference's (2, P) int64 patch indices and their maxima, for exact rapid scoring
        self._indices = [np.ascontiguousarray(g.T) for g in self.grids]
        self._ind_max = [(np.max(i[0, :]), np.max(i[1, :])) for i in self._indices]
        self.exact = bool(exact)
        self.bf16 = bool(bf16) and bf16_products(self.device)
        self._buffers: dict[int, torch.Tensor] = {}
        self._rows16: torch.Tensor | None = None
        self._products: dict[tuple[int, int, int], torch.Tensor] = {}

    def _bf16_operand(self, q: torch.Tensor) -> torch.Tensor:
        """The query's patches (Pq, D) as the bfloat16 product's operand (Pq, D + BF16_PAD): [q, -SIM_OFFSET, 0...]."""
        out = torch.zeros((q.shape[0], q.shape[1] + BF16_PAD), dtype=torch.bfloat16, device=q.device)
        out[:, : q.shape[1]] = q
        out[:, q.shape[1]] = -SIM_OFFSET
        return out

    def _bf16_rows(self, rows: int, dim: int) -> torch.Tensor:
        """A reused (rows, D + BF16_PAD) bfloat16 buffer for candidates' patches: [., 1, 0...] (the patches go in
        the first D columns)."""
        buf = self._rows16
        if buf is None or buf.shape[0] < rows or buf.shape[1] != dim + BF16_PAD:
            buf = torch.zeros(
                (max(rows, self.chunk * self.preset.kept_patches(0)), dim + BF16_PAD), dtype=torch.bfloat16
            )
            buf[:, dim] = 1.0
            self._rows16 = buf = buf.to(self.device)
        return buf[:rows]

    @property
    def chunk(self) -> int:
        return CPU_CHUNK if self.device.type == "cpu" else CHUNK

    # -- mutual nearest neighbours ---------------------------------------------------------
    def _mutual(self, q: torch.Tensor, dbs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (Pq, D), dbs: (n, Pb, D) -> fw (n, Pb) nearest query patch of each
        database patch, and mask (n, Pb) of mutual matches.

        Distances are the reference's float32 sqrt(2 - 2 q.b + 1e-9): its
        rounding merges near-equal similarities, and argmin then takes the
        first, so computing the same values keeps the same matches. With
        ``bf16``: one product per chunk with bfloat16 inputs, the nearest by
        the largest similarity (the same order; ties to the first index too).
        """
        if self.bf16:  # q: the query's bfloat16 operand (_bf16_operand)
            n, pb, d = dbs.shape
            rows = self._bf16_rows(n * pb, d)
            rows[:, :d].copy_(dbs.reshape(n * pb, d))
            sims = torch.mm(rows, q.t()).float().view(n, pb, -1)  # (n, Pb, Pq): s - SIM_OFFSET
            fw = sims.argmax(dim=2)  # (n, Pb): nearest query patch of each db patch
            bw = sims.max(dim=1).indices  # (n, Pq): nearest db patch of each query patch
            return fw, bw.gather(1, fw) == torch.arange(pb, device=dbs.device)
        dist = self._similarities(q, dbs)  # (n, Pq, Pb)
        dist.mul_(-2.0).add_(2.0).add_(1e-9).sqrt_()  # the reference's 2 - 2 * mul + 1e-9, rounded as it rounds
        fw = torch.min(dist, dim=1).indices  # (n, Pb): nearest query patch of each db patch (the reference's call)
        bw = dist.argmin(dim=2)  # (n, Pq): nearest db patch of each query patch
        mutual = bw.gather(1, fw) == torch.arange(dbs.shape[1], device=dbs.device)
        return fw, mutual

    def _similarities(self, q: torch.Tensor, dbs: torch.Tensor) -> torch.Tensor:
        """q: (Pq, D), dbs: (n, Pb, D) -> (n, Pq, Pb) products q . b, float32.

        Exact (default): on a CPU one ``torch.mm`` per candidate into a reused
        buffer, the reference's own product, so its values are bit-identical
        and ties resolve as the reference resolves them. Fast (``exact=False``,
        CPU with oneDNN): one oneDNN product per chunk, about twice as fast on
        the AMD EPYC we measure on, equal within float32 rounding (~2e-7),
        which can flip a near-tie and so move a RANSAC inlier count by one.
        q arrives as a oneDNN tensor on the fast path (converted once per scale).
        """
        n, pb, d = dbs.shape
        if q.is_mkldnn:
            out = torch._C._nn.mkldnn_linear(q, dbs.reshape(n * pb, d).to_mkldnn(), None).to_dense()
            return out.view(-1, n, pb).transpose(0, 1)
        if dbs.device.type != "cpu":
            return torch.matmul(q, dbs.transpose(1, 2))
        shape = (n, q.shape[0], pb)
        out = self._products.get(shape)
        if out is None:
            out = self._products[shape] = torch.empty(shape)
        for j in range(n):
            torch.mm(q, dbs[j].T, out=out[j])
        return out

    def _rapid(
        self,
        fw: torch.Tensor,
        mutual: torch.Tensor,
        scale: int,
        pq: int,
        db_grid: torch.Tensor | None = None,
        q_grid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rapid spatial scoring, vectorised over candidates (``exact=False`` on a GPU):
        the reference's formula, float64 sums in torch's order. -> (n,) float64.

        db_grid (n, Pb), q_grid (Pq,): the stored patches' grid indices (patch selection), or None: all kept."""
        grid = self._grid_t[scale]
        db_pos = grid.unsqueeze(0) if db_grid is None else grid[db_grid]
        d = db_pos - (grid[fw] if q_grid is None else grid[q_grid[fw]])  # (n, Pb, 2): db index - query index
        m = mutual.to(torch.float64).unsqueeze(-1)
        count = m.sum(dim=1)  # (n, 1)
        mean = (d * m).sum(dim=1) / count.clamp(min=1)
        e = (d - mean.unsqueeze(1)).abs()
        xmax, ymax = grid[:, 0].max(), grid[:, 1].max()
        s = ((xmax - e[..., 0]) ** 2 + (ymax - e[..., 1]) ** 2) * m[..., 0]
        score = -s.sum(dim=1) / pq
        return torch.where(count[:, 0] > 0, score, torch.zeros_like(score)).cpu()

    def _rapid_exact(self, scale: int, pq: int, db_idx: np.ndarray, q_idx: np.ndarray) -> float:
        """Rapid spatial scoring of one pair in the reference's float64 arithmetic, operation for
        operation (``compare_two_spatial``), so its raw score is the reference's to the last bit.

        db_idx, q_idx: (M,) mutually matched database and query patches, db_idx ascending.
        """
        if db_idx.size == 0:
            return 0.0
        ind = self._indices[scale]  # (2, P) int64, C-contiguous: the reference's layout and reductions
        spatial = ind[:, db_idx] - ind[:, q_idx]
        mean = np.mean(spatial, axis=1)
        sx = np.absolute(spatial[0, :] - mean[0])
        sy = np.absolute(spatial[1, :] - mean[1])
        s = (self._ind_max[scale][0] - sx) ** 2 + (self._ind_max[scale][1] - sy) ** 2
        return float(-s.sum() / pq)

    def _ransac(self, job: RansacJob) -> tuple[float, np.ndarray, np.ndarray | None]:
        """Homography RANSAC over one pair's mutual matches, as the reference calls it.

        job: (candidate, scale, query patch count, db_idx (M,), q_idx (M,))
        -> (raw score, inliers (M,), homography or None).
        """
        _, scale, pq, db_idx, q_idx = job
        if db_idx.size <= 3:
            return 0.0, np.zeros(db_idx.size, bool), None
        kp = self.keypoints[scale]
        thr = self.preset.geometry.stride * self.preset.strides[scale] * 1.5
        h, mask = cv2.findHomography(kp[db_idx], kp[q_idx], cv2.RANSAC, ransacReprojThreshold=thr)
        if mask is None:
            return 0.0, np.zeros(db_idx.size, bool), None
        inl = mask.ravel() == 1
        return -float(inl.sum()) / pq, inl, h

    # -- public API --------------------------------------------------------------------------
    def score(
        self,
        query: PlaceFeatures,
        candidates: Sequence[PlaceFeatures],
        *,
        details: bool = False,
    ) -> Scores:
        """Raw per-scale scores of ``query`` against each candidate.

        query.patches[s]: (Pq_s, D); each candidate's: (Pb_s, D). With patch selection
        (``preset.patch_keep`` < 1) each image's ``patch_index`` places its patches on the grid.
        Returns Scores with raw (N, S).
        """
        n_scales = len(self.preset.patch_sizes)
        qs = [
            torch.as_tensor(np.asarray(query.patches[s], dtype=np.float32), device=self.device) for s in range(n_scales)
        ]
        q_index = db_index = None
        if query.patch_index is not None or any(c.patch_index is not None for c in candidates):
            q_index = [query.grid_index(s) for s in range(n_scales)]
            db_index = [np.stack([c.grid_index(s) for c in candidates]) for s in range(n_scales)]

        def chunks(s: int):
            for start in range(0, len(candidates), self.chunk):
                chunk = candidates[start : start + self.chunk]
                buf = self._stack_buffer(s, len(chunk), qs[s].shape[1])
                for j, c in enumerate(chunk):
                    p = c.patches[s]
                    if p.flags.writeable and p.flags.c_contiguous:  # torch converts float16 ~30x sooner than numpy
                        buf[j].copy_(torch.from_numpy(p))
                    else:  # spilled keyframes: read-only memory maps
                        buf[j].copy_(torch.from_numpy(np.array(p)))
                yield buf

        return self._score(qs, [chunks(s) for s in range(n_scales)], len(candidates), details, q_index, db_index)

    def _stack_buffer(self, scale: int, n: int, dim: int) -> torch.Tensor:
        """A reused (n, P', D) float32 buffer: a fresh 30-100 MB array per chunk
        costs more in page faults than the copy into it."""
        p = self.preset.kept_patches(scale)
        buf = self._buffers.get(scale)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != (p, dim):
            buf = torch.empty((self.chunk, p, dim), dtype=torch.float32, device=self.device)
            self._buffers[scale] = buf
        return buf[:n]

    def score_stacked(
        self,
        query: Sequence[torch.Tensor],
        dbs: Sequence[torch.Tensor],
        details: bool = False,
        q_index: Sequence[np.ndarray] | None = None,
        db_index: Sequence[np.ndarray] | None = None,
    ) -> Scores:
        """Raw scores against candidates already stacked (on the device).

        query[s]: (Pq_s, D); dbs[s]: (N, Pb_s, D) float32 on ``self.device``. q_index[s] (Pq_s,),
        db_index[s] (N, Pb_s): the patches' grid indices with patch selection (both or neither).
        Nothing is copied to the device: for maps held there (GPU).
        """
        n = int(dbs[0].shape[0])
        return self._score(list(query), [iter(d.split(self.chunk)) for d in dbs], n, details, q_index, db_index)

    def _score(
        self,
        qs: list[torch.Tensor],
        chunk_iters: list,
        n: int,
        details: bool,
        q_index: Sequence[np.ndarray] | None = None,
        db_index: Sequence[np.ndarray] | None = None,
    ) -> Scores:
        """q_index[s] (Pq_s,), db_index[s] (n, Pb_s): grid indices of the stored patches, or None (all kept):
        matches are reported, spatially scored and given to RANSAC as grid indices."""
        if (q_index is None) != (db_index is None):
            raise ValueError("patch grid indices are needed for the query and the candidates alike")
        n_scales = len(qs)
        raw = np.zeros((n, n_scales))
        nm = np.zeros((n, n_scales), dtype=np.int64)
        ni = np.zeros((n, n_scales), dtype=np.int64)
        det: list[list[ScaleMatch]] = [[None] * n_scales for _ in range(n)] if details else []
        ransac_jobs: list[RansacJob] = []
        for s in range(n_scales):
            q = qs[s]
            pq = q.shape[0]
            if self.bf16:
                q = self._bf16_operand(q)  # converted once per scale
            elif not self.exact and q.device.type == "cpu" and torch.backends.mkldnn.is_available():
                q = q.to_mkldnn()  # the fast products' operand, converted once per scale
            start = 0
            for dbs in chunk_iters[s]:
                size = int(dbs.shape[0])
                fw, mutual = self._mutual(q, dbs)
                nm[start : start + size, s] = mutual.sum(dim=1).cpu().numpy()
                # rapid scoring per pair in numpy (the reference's arithmetic; on a CPU also the
                # fastest, ~0.03 ms a pair), vectorised on the device only for GPU fast products
                rapid_exact = self.matcher is Matcher.RAPID and (self.exact or fw.device.type == "cpu")
                if self.matcher is Matcher.RAPID and not rapid_exact:
                    grids = (None, None)
                    if db_index is not None:
                        grids = tuple(
                            torch.as_tensor(np.asarray(a, np.int64), device=fw.device)
                            for a in (db_index[s][start : start + size], q_index[s])
                        )
                    raw[start : start + size, s] = self._rapid(fw, mutual, s, pq, *grids).numpy()
                if self.matcher is Matcher.RANSAC or details or rapid_exact:
                    fw_np, mutual_np = fw.cpu().numpy(), mutual.cpu().numpy()
                    for j in range(size):
                        db_idx = np.flatnonzero(mutual_np[j])
                        q_idx = fw_np[j][db_idx]
                        if db_index is not None:  # stored rows to grid indices (kept in grid order: still ascending)
                            db_idx = np.asarray(db_index[s][start + j], np.int64)[db_idx]
                            q_idx = np.asarray(q_index[s], np.int64)[q_idx]
                        if self.matcher is Matcher.RANSAC:
                            ransac_jobs.append((start + j, s, pq, db_idx, q_idx))
                            continue
                        if rapid_exact:
                            raw[start + j, s] = self._rapid_exact(s, pq, db_idx, q_idx)
                        if details:
                            det[start + j][s] = ScaleMatch(
                                float(raw[start + j, s]), db_idx, q_idx, np.ones(db_idx.size, bool)
                            )
                start += size
        # RANSAC runs after the products, each call on one core: OpenCV's
        # findHomography is single-threaded, deterministic and releases the
        # GIL, so the calls spread over the cores give the same answers.
        for (i, s, _, db_idx, q_idx), (score, inl, hom) in zip(ransac_jobs, _map_threads(self._ransac, ransac_jobs)):
            raw[i, s] = score
            ni[i, s] = int(inl.sum())
            if details:
                det[i][s] = ScaleMatch(float(score), db_idx, q_idx, inl, hom)
        return Scores(raw, nm, ni, det)

    def absolute_per_scale(self, raw: np.ndarray) -> np.ndarray:
        """Per-scale absolute similarity in [0, 1], higher is better: raw (N, S) -> (N, S).

        RANSAC's -raw is the fraction of query patches that are homography
        inliers; rapid scoring's -raw is divided by its best possible value
        (every patch a perfectly consistent match).
        """
        per = -np.atleast_2d(np.asarray(raw, dtype=np.float64))
        if self.matcher is Matcher.RAPID:
            best = np.array([float(g[:, 0].max() ** 2 + g[:, 1].max() ** 2) for g in self.grids])
            per = per / np.maximum(best, 1.0)
        return np.clip(per, 0.0, 1.0)

    def absolute(self, raw: np.ndarray) -> np.ndarray:
        """Absolute similarity in [0, 1], higher is better, comparable across pairs.

        raw: (N, S) -> (N,): :meth:`absolute_per_scale` averaged with the patch weights.
        """
        w = np.asarray(self.preset.patch_weights, dtype=np.float64)
        return np.clip(self.absolute_per_scale(raw) @ w / w.sum(), 0.0, 1.0)

    def dominant_scale(self, raw: np.ndarray) -> np.ndarray:
        """(N,) index of the scale contributing most to each candidate's absolute score
        (weight x per-scale score): the scale whose matches and inliers a loop reports."""
        w = np.asarray(self.preset.patch_weights, dtype=np.float64)
        return np.argmax(self.absolute_per_scale(raw) * w, axis=1)

    def fuse(self, raw: np.ndarray, global_distances: np.ndarray | None = None) -> np.ndarray:
        """Fused score per candidate (N,), lower is better.

        raw: (N, S) per-scale scores. global_distances: (N,) the candidates' global descriptor
        distances (any monotone distance, e.g. L2); with the preset's ``global_weight`` > 0 they
        join the fusion as one more scale (z-scored across the candidates, that weight). Without
        them, or at weight 0, the paper's patch-only fusion (:func:`fuse_scores`).
        """
        fused = fuse_scores(raw, self.preset.patch_weights)
        w = self.preset.global_weight
        if w > 0 and global_distances is not None:
            fused = fused + fuse_scores(np.asarray(global_distances, np.float64).reshape(-1, 1), (w,))
        return fused

    def rerank(
        self, query: PlaceFeatures, candidates: Sequence[PlaceFeatures], global_distances: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, Scores]:
        """Re-rank candidates: (order (N,), fused scores (N,), raw Scores). ``global_distances`` (N,):
        see :meth:`fuse`."""
        sc = self.score(query, candidates)
        fused = self.fuse(sc.raw, global_distances)
        return rerank_order(fused), fused, sc
