import numpy as np
import pytest
import torch

from pnv_ros.config import get_preset
from pnv_ros.features import PlaceFeatures
from pnv_ros.index import GlobalIndex
from pnv_ros.matching import PatchMatcher, fuse_scores


def _unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fusion_handles_equal_scores() -> None:
    raw = np.array([[-1.0, -2.0], [-1.0, -3.0], [-1.0, -1.0]])
    fused = fuse_scores(raw, [0.5, 0.5])
    assert np.isfinite(fused).all()
    assert list(np.argsort(fused)) == [1, 0, 2]  # the constant scale carries no information
    assert np.all(fuse_scores(np.zeros((4, 1)), [1.0]) == 0)


def test_identical_image_scores_best(rng) -> None:
    preset = get_preset("speed")
    imgs = [PlaceFeatures(_unit(rng, 64), [_unit(rng, 936, 32)], (640, 480)) for _ in range(5)]
    for matcher in ("rapid", "ransac"):
        pm = PatchMatcher(preset, matcher)
        order, fused, sc = pm.rerank(imgs[2], imgs)
        assert order[0] == 2
        assert sc.num_matches[2, 0] == 936  # every patch matches itself
        assert pm.absolute(sc.raw)[2] == pytest.approx(1.0)
        assert pm.absolute(sc.raw).max() <= 1.0


def test_chunked_equals_unchunked(rng, monkeypatch) -> None:
    import pnv_ros.matching as m

    preset = get_preset("performance")
    imgs = [
        PlaceFeatures(_unit(rng, 8), [_unit(rng, preset.num_patches(s), 16) for s in range(3)], (640, 480))
        for _ in range(7)
    ]
    pm = PatchMatcher(preset, "rapid")
    a = pm.score(imgs[0], imgs).raw
    monkeypatch.setattr(m, "CPU_CHUNK", 3)  # 7 candidates: chunks of 3, 3, 1
    b = pm.score(imgs[0], imgs).raw
    d = pm.score(imgs[0], imgs, details=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(d.raw, a)
    assert d.details[3][1].num_matches == d.num_matches[3, 1]


def test_vectorised_rapid_equals_exact(rng) -> None:
    """The GPU's vectorised rapid scoring (exact=False on a device) is the per-pair numpy scoring,
    the reference's arithmetic, up to float64 summation order; a pair without matches scores 0."""
    import torch

    preset = get_preset("speed")
    pm = PatchMatcher(preset, "rapid")
    p = preset.num_patches(0)
    fw = torch.as_tensor(rng.integers(0, p, size=(4, p)))
    mutual = torch.as_tensor(rng.random((4, p)) < 0.3)
    mutual[3] = False
    vec = pm._rapid(fw, mutual, 0, p).numpy()
    for j in range(4):
        db_idx = np.flatnonzero(mutual[j].numpy())
        assert vec[j] == pytest.approx(pm._rapid_exact(0, p, db_idx, fw[j].numpy()[db_idx]), rel=1e-12, abs=0)
    assert vec[3] == 0.0


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_index_against_brute_force(rng, kind: str) -> None:
    db = _unit(rng, 500, 32)
    q = _unit(rng, 20, 32)
    idx = GlobalIndex(32, kind)
    idx.add(db[:250])
    idx.add(db[250:])
    d, ids = idx.search(q, 10)
    brute = np.argsort(np.linalg.norm(db[None] - q[:, None], axis=2), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, brute)])
    assert recall >= (1.0 if kind == "flat" else 0.99)
    np.testing.assert_allclose(d[:, 0], np.linalg.norm(db[ids[:, 0]] - q, axis=1), rtol=1e-4)
    _, lim = idx.search(q, 5, limit=100)
    assert lim.max() < 100
    assert idx.search(q, 5, limit=0)[1].shape == (20, 0)


@pytest.fixture(scope="module")
def real_perf_features(random_ckpt):
    """Performance-preset features of five RTAB-Map frames (two revisits of the first three)."""
    from conftest import rtab_frame

    from pnv_ros.extract import FeatureExtractor
    from pnv_ros.model.checkpoint import load_checkpoint

    model, info = load_checkpoint(random_ckpt)
    ex = FeatureExtractor(model, info, get_preset("performance"), device="cpu")
    return ex.extract([rtab_frame(i) for i in (1, 2, 3, 42, 43)])


def test_parallel_ransac_equals_serial(real_perf_features, monkeypatch) -> None:
    import pnv_ros.matching as m

    pm = PatchMatcher(get_preset("performance"), "ransac")
    par = pm.score(real_perf_features[0], real_perf_features, details=True)
    monkeypatch.setattr(m, "_map_threads", lambda fn, jobs: [fn(j) for j in jobs])
    ser = pm.score(real_perf_features[0], real_perf_features, details=True)
    np.testing.assert_array_equal(par.raw, ser.raw)
    np.testing.assert_array_equal(par.num_inliers, ser.num_inliers)
    assert par.num_inliers[1:].sum() > 0  # real RANSAC work, not only the self-match
    for a, b in zip(par.details, ser.details):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x.inliers, y.inliers)
            assert (x.homography is None) == (y.homography is None)
            if x.homography is not None:
                np.testing.assert_array_equal(x.homography, y.homography)


@pytest.mark.parametrize("matcher", ["ransac", "rapid"])
def test_fast_products_close_to_exact(real_perf_features, matcher: str) -> None:
    """oneDNN products differ from the exact ones only by float32 rounding: nearly all mutual matches agree."""
    preset = get_preset("performance")
    q, cands = real_perf_features[0], real_perf_features
    exact = PatchMatcher(preset, matcher).score(q, cands)
    fast = PatchMatcher(preset, matcher, exact=False).score(q, cands)
    assert np.abs(fast.num_matches - exact.num_matches).max() <= max(2, 0.01 * exact.num_matches.max())
    np.testing.assert_allclose(fast.raw, exact.raw, rtol=0.05, atol=2.0 / preset.num_patches(2))
    assert fast.raw[0].sum() == exact.raw[0].sum()  # the self-match: every patch, no near-ties


@pytest.fixture(scope="module")
def default_perf_features(default_ckpt):
    """Performance-preset features of five RTAB-Map frames, the default model (real, distinct patches: a random
    model's patches are near-duplicates, ~0.9999 apart, below any reduced precision)."""
    from conftest import rtab_frame

    from pnv_ros.extract import FeatureExtractor
    from pnv_ros.model.checkpoint import load_checkpoint

    model, info = load_checkpoint(default_ckpt)
    ex = FeatureExtractor(model, info, get_preset("performance"), device="cpu")
    return ex.extract([rtab_frame(i) for i in (1, 2, 42, 43, 60)])


@pytest.mark.parametrize("matcher", ["ransac", "rapid"])
def test_bf16_products_close_to_exact(default_perf_features, matcher: str) -> None:
    """bfloat16 products (the fast paths', with the similarity offset): the self-match keeps every patch; against
    other frames the mutual matches move only at near-ties, so counts and scores stay close and the order of the
    candidates (frames 2, 42 and 43 revisit frame 1; 60 does not) is kept; stacked candidates score the same."""
    from conftest import CPU_BF16

    preset = get_preset("performance")
    q, cands = default_perf_features[0], default_perf_features
    half = PatchMatcher(preset, matcher, bf16=True)
    assert half.bf16 == CPU_BF16
    exact = PatchMatcher(preset, matcher).score(q, cands)
    fast = half.score(q, cands)
    for s in range(3):
        p = preset.num_patches(s)
        assert fast.num_matches[0, s] == p and fast.raw[0, s] == exact.raw[0, s]  # itself: every patch matched
        assert np.abs(fast.num_matches[1:, s] - exact.num_matches[1:, s]).max() <= max(3, 0.05 * p)
    np.testing.assert_allclose(fast.raw, exact.raw, rtol=0.15, atol=2.0 / preset.num_patches(2))
    assert np.array_equal(np.argsort(fast.raw.sum(1)[1:]), np.argsort(exact.raw.sum(1)[1:]))
    stacked = half.score_stacked(
        [torch.as_tensor(p) for p in q.patches],
        [torch.as_tensor(np.stack([c.patches[s] for c in cands])) for s in range(3)],
    )
    np.testing.assert_array_equal(stacked.raw, fast.raw)
