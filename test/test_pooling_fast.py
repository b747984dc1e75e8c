"""The fast pooling (``PatchNetVLADModel._pool_fast``): the same descriptors as the exact integral, from small
products, on the default model's real conv5_3 features of RTAB-Map frames; and how extractors choose it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_BF16, rtab_frame

from pnv_ros.config import get_preset
from pnv_ros.errors import EngineError
from pnv_ros.extract import FeatureExtractor
from pnv_ros.model.checkpoint import load_checkpoint
from pnv_ros.model.netvlad import PatchNetVLADModel


@pytest.fixture(scope="module")
def default_model(default_ckpt: Path):
    return load_checkpoint(default_ckpt)


@pytest.fixture(scope="module")
def conv5(default_model) -> list[torch.Tensor]:
    """conv5_3 features (1, 512, 30, 40) of three RTAB-Map frames, speed preset input."""
    model, info = default_model
    ex = FeatureExtractor(model, info, get_preset("speed"), device="cpu")
    with torch.inference_mode():
        return [model.backbone(ex.preprocess(rtab_frame(i))[0].unsqueeze(0)) for i in (1, 30, 60)]


def float64_model(model: PatchNetVLADModel) -> PatchNetVLADModel:
    m64 = PatchNetVLADModel(model.pool.num_clusters, model.num_pcs)
    m64.load_state_dict(model.state_dict())
    return m64.double().eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.double() * b.double()).sum(-1).flatten().numpy()


@torch.inference_mode()
def test_fast_pooling_is_the_float64_descriptor(default_model, conv5: list[torch.Tensor]) -> None:
    """Against the same pooling in float64 (the mathematical descriptor), the fast path in float32 is within
    float32 rounding, and nearer to it than the exact float32 integral, whose box sums of words with little mass
    are differences of large values; with bfloat16 products it stays within 1e-4."""
    model, _ = default_model
    m64 = float64_model(model)
    sizes, strides = (2, 5, 8), (1, 1, 1)  # the performance preset's scales
    for feats in conv5:
        g64, p64 = m64._pool(feats.double(), sizes, strides)
        ge, pe = model._pool(feats, sizes, strides, "exact")
        g32, p32 = model._pool(feats, sizes, strides, "fast32")
        assert g32.shape == ge.shape and [p.shape for p in p32] == [p.shape for p in pe]
        assert cosines(g32, g64).min() > 1 - 1e-6
        for s in range(len(sizes)):
            fast, exact = cosines(p32[s], p64[s]), cosines(pe[s], p64[s])
            assert fast.min() > 1 - 1e-5, (sizes[s], fast.min())
            assert fast.min() > exact.min() and np.median(fast) >= np.median(exact) - 1e-7
        if CPU_BF16:
            g16, p16 = model._pool(feats, sizes, strides, "fast")
            assert cosines(g16, g64).min() > 1 - 1e-6  # the global descriptor takes no bfloat16 product
            for s in range(len(sizes)):
                assert cosines(p16[s], p64[s]).min() > 1 - 1e-4, sizes[s]


@torch.inference_mode()
def test_fast_pooling_without_wpca_and_in_batches(default_model, conv5: list[torch.Tensor]) -> None:
    """No WPCA: the (K*C) patch vectors themselves, unit length, equal to the float64 integral's; a batch pools
    image by image, so each image's descriptors are those it gets alone."""
    model, _ = default_model
    raw = PatchNetVLADModel(model.pool.num_clusters, 0)
    raw.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("WPCA")})
    raw.eval()
    g64, p64 = float64_model(raw)._pool(conv5[0].double(), (5,), (1,))
    g, p = raw._pool(conv5[0], (5,), (1,), "fast32")
    assert p[0].shape == (1, 936, 64 * 512)
    assert np.allclose(torch.linalg.norm(p[0], dim=-1).numpy(), 1, atol=1e-5)
    assert cosines(p[0], p64[0]).min() > 1 - 1e-5 and cosines(g, g64).min() > 1 - 1e-6
    batch = torch.cat(conv5[:2])
    gb, pb = model._pool(batch, (5,), (1,), "fast32")
    g1, p1 = model._pool(conv5[1], (5,), (1,), "fast32")
    assert torch.equal(gb[1:], g1) and torch.equal(pb[0][1:], p1[0])


def test_extractors_choose_the_pooling_by_precision(default_model) -> None:
    """fp32: the exact integral (the reference's arithmetic); any other precision: the fast pooling (bfloat16
    products where the CPU has them); an unknown choice is refused; the stages' times are kept per thread."""
    model, info = default_model
    speed = get_preset("speed")
    exact = FeatureExtractor(model, info, speed, device="cpu")
    assert (exact.pooling, exact.projection) == ("exact", "exact")
    forced = FeatureExtractor(model, info, speed, device="cpu", pooling="fast")
    assert forced.pooling == "fast" and forced.projection == ("fast" if CPU_BF16 else "fast32")
    if CPU_BF16:
        bf16 = FeatureExtractor(model, info, speed, device="cpu", precision="bf16")
        assert (bf16.pooling, bf16.projection) == ("fast", "fast")
    with pytest.raises(EngineError, match="pooling 'integral': use one of auto, exact, fast"):
        FeatureExtractor(model, info, speed, device="cpu", pooling="integral")
    assert exact.last_timings == {}
    a, b = exact.extract_one(rtab_frame(5)), forced.extract_one(rtab_frame(5))
    assert set(forced.last_timings) == {"preprocess", "backbone", "pooling", "patch_descriptors"}
    assert all(v > 0 for v in forced.last_timings.values())
    np.testing.assert_allclose(a.global_desc, b.global_desc, atol=1e-5)
    assert np.median((a.patches[0] * b.patches[0]).sum(1)) > 0.99
