from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_BF16, make_random_checkpoint, rtab_frame
from PIL import Image

from pnv_ros.config import get_preset
from pnv_ros.errors import EngineError, FeaturesError, ImageError
from pnv_ros.extract import FeatureExtractor, input_transform
from pnv_ros.features import FeatureSet, patch_keypoints
from pnv_ros.images import list_images, load_image
from pnv_ros.model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def extractor(random_ckpt: Path) -> FeatureExtractor:
    model, info = load_checkpoint(random_ckpt)
    return FeatureExtractor(model, info, get_preset("speed"), device="cpu")


def test_shapes_and_unit_norm(extractor: FeatureExtractor) -> None:
    f = extractor.extract_one(rtab_frame(1))
    assert f.global_desc.shape == (64,) and f.patches[0].shape == (936, 64)
    assert f.patches[0].flags.c_contiguous  # rows in order: re-ranking copies them as they are
    assert np.allclose(np.linalg.norm(f.patches[0], axis=1), 1, atol=1e-5)
    assert f.image_size == (512, 384)


def test_keypoints_in_original_pixels(extractor: FeatureExtractor) -> None:
    kp_in = patch_keypoints(extractor.preset, 0)
    assert tuple(kp_in[0]) == (39, 39) and tuple(kp_in[1]) == (55, 39)  # x = 16c + 39
    f = extractor.extract_one(rtab_frame(1))
    kp = f.keypoints(extractor.preset)[0]
    assert kp.shape == (936, 2)
    assert 0 < kp[:, 0].min() and kp[:, 0].max() < 512 and kp[:, 1].max() < 384
    np.testing.assert_allclose(kp[0], ((39.5 * 0.8) - 0.5, (39.5 * 0.8) - 0.5), atol=1e-4)


def test_image_modes_agree(extractor: FeatureExtractor, tmp_path: Path) -> None:
    rgb = np.asarray(Image.open(rtab_frame(5)).convert("RGB"))
    base = extractor.extract_one(rgb)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    u16 = rgb.astype(np.uint16) * 257
    f32 = rgb.astype(np.float32) / 255.0
    for variant in (rgba, u16, f32, Image.fromarray(rgb), rtab_frame(5)):
        f = extractor.extract_one(variant)
        assert np.abs(f.global_desc - base.global_desc).max() < 1e-5
    grey = extractor.extract_one(rgb.mean(axis=2).astype(np.uint8))
    assert grey.patches[0].shape == (936, 64)
    p16 = tmp_path / "grey16.png"
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(p16)
    assert load_image(p16).mode == "RGB"


def test_batched_equals_single(random_ckpt: Path) -> None:
    model, info = load_checkpoint(random_ckpt)
    ex = FeatureExtractor(model, info, get_preset("speed"), device="cpu", batch_size=3)
    frames = [rtab_frame(i) for i in (1, 2, 3, 4)]
    batched = ex.extract(frames)
    single = FeatureExtractor(model, info, get_preset("speed"), device="cpu", batch_size=1).extract(frames)
    for a, b in zip(batched, single):
        assert np.abs(a.patches[0] - b.patches[0]).max() < 1e-4


def test_bad_images(extractor: FeatureExtractor, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(rtab_frame(1).read_bytes()[:200])
    with pytest.raises(ImageError, match="corrupt.jpg: cannot decode image"):
        extractor.extract([bad])
    small = extractor.extract_one(np.zeros((40, 60, 3), np.uint8))  # resized to the input size, as the reference
    assert small.image_size == (60, 40) and small.patches[0].shape == (936, 64)
    with pytest.raises(ImageError, match="not an image"):
        extractor.extract_one(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="channels"):
        extractor.extract_one(np.zeros((200, 200, 2), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        extractor.extract_one(np.full((200, 200), np.nan, np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="folder holds no images"):
        list_images([empty])


def test_folder_order_is_numeric(tmp_path: Path) -> None:
    for n in (10, 2, 1):
        (tmp_path / f"{n}.jpg").write_bytes(b"x")
    assert [p.stem for p in list_images([tmp_path])] == ["1", "2", "10"]


def test_features_file_roundtrip_and_checks(extractor: FeatureExtractor, tmp_path: Path) -> None:
    fs = extractor.extract_set([rtab_frame(1), rtab_frame(2)])
    path = tmp_path / "f.npz"
    fs.save(path)
    back = FeatureSet.load(path)
    assert back.names == ["1.jpg", "2.jpg"] and back.dim == 64 and back.model_id == fs.model_id
    np.testing.assert_array_equal(back.patches[0], fs.patches[0])
    with np.load(path, allow_pickle=False) as z:  # loads without pickle
        assert z["keypoints_p5"].shape == (936, 2) and z["patches_p5"].shape == (2, 936, 64)
    with pytest.raises(FeaturesError, match="cannot be matched with preset 'performance'.*--preset performance"):
        back.check_preset(get_preset("performance"))
    other = FeatureSet(fs.names, fs.global_descs, fs.patches, fs.image_sizes, fs.preset, "other:64:abc")
    with pytest.raises(FeaturesError, match="same checkpoint"):
        back.check_compatible(other)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[:500])
    with pytest.raises(FeaturesError, match="cannot be read"):
        FeatureSet.load(broken)
    assert not list(tmp_path.glob("*.tmp"))


def test_blocked_backbone_is_bit_identical(random_ckpt: Path, tmp_path: Path) -> None:
    """The CPU fast path (activations kept in oneDNN's blocked layout) gives exactly the plain modules' values,
    for odd sizes and batches, and follows weights loaded after its first use."""
    model, _ = load_checkpoint(random_ckpt)
    frames = [Image.open(rtab_frame(i)).convert("RGB") for i in (1, 2)]
    with torch.inference_mode():
        for h, w in ((480, 640), (243, 331)):
            x = torch.stack([input_transform(h, w)(f) for f in frames])
            assert torch.equal(model.backbone(x), model.encoder(x))
        before = model.backbone(x)
        other, _ = load_checkpoint(make_random_checkpoint(tmp_path / "other.pth.tar", seed=7))
        model.load_state_dict(other.state_dict())
        after = model.backbone(x)
        assert not torch.equal(after, before)
        assert torch.equal(after, model.encoder(x))


def test_blocked_backbone_bf16_matches_autocast(random_ckpt: Path) -> None:
    """Under bfloat16 autocast the blocked path computes in bfloat16 as autocast does (rounding-level differences)."""
    model, info = load_checkpoint(random_ckpt)
    if not CPU_BF16:  # no bfloat16 here: refused, with the reason (not skipped)
        with pytest.raises(EngineError, match="no bfloat16 instructions.*choose fp32"):
            FeatureExtractor(model, info, get_preset("speed"), device="cpu", bf16=True)
        return
    x = torch.stack([input_transform(480, 640)(Image.open(rtab_frame(i)).convert("RGB")) for i in (1, 2)])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, plain = model.backbone(x), model.encoder(x)
    assert fast.dtype == plain.dtype == torch.bfloat16
    rel = ((fast.float() - plain.float()).norm() / plain.float().norm()).item()
    assert 0 <= rel < 1e-2
    with torch.inference_mode():
        assert model.backbone(x).dtype == torch.float32  # float32 again outside autocast


def test_bfloat16_mode_keeps_patch_descriptors(default_ckpt: Path) -> None:
    """bf16=True runs the backbone in bfloat16 and pools with the fast pooling (no integral image: box sums of a
    bfloat16 integral turned patch VLADs to noise, median cosine 0.73). Against the float32 backbone pooled the
    same way in float32, descriptors stay close at every scale of the performance preset."""
    model, info = load_checkpoint(default_ckpt)
    preset = get_preset("performance")
    if not CPU_BF16:  # this CPU refuses bf16 (see the test below)
        with pytest.raises(EngineError, match="no bfloat16 instructions"):
            FeatureExtractor(model, info, preset, bf16=True)
        return
    fp32 = FeatureExtractor(model, info, preset, pooling="fast")
    fp32.projection = "fast32"  # the same pooling with float32 products: only the precision differs
    half_ex = FeatureExtractor(model, info, preset, bf16=True)
    assert half_ex.pooling == "fast"
    full, half = fp32.extract_one(rtab_frame(41)), half_ex.extract_one(rtab_frame(41))
    assert full.global_desc.dtype == half.global_desc.dtype == np.float32
    assert float(full.global_desc @ half.global_desc) > 0.999
    for s, size in enumerate(preset.patch_sizes):
        cos = (full.patches[s] * half.patches[s]).sum(axis=1)
        assert np.median(cos) > 0.99, (size, np.median(cos))
        assert np.mean(cos > 0.95) > 0.95, (size, np.mean(cos > 0.95))


def test_bfloat16_without_cpu_support_is_refused(random_ckpt: Path, monkeypatch) -> None:
    """On a CPU without oneDNN bfloat16 (simulated where this one has it) torch's bfloat16 convolutions take a
    reference path: one VGG-16 pass took about 10 min on an AVX2-only AMD EPYC (fp32: 1.5 s). A robot asking for
    bf16 there gets an error that says so, not a keyframe every ten minutes."""
    from pnv_ros.engines import supported_precisions
    from pnv_ros.model.backbone import BlockedBackbone

    model, info = load_checkpoint(random_ckpt)
    monkeypatch.setattr(BlockedBackbone, "available", staticmethod(lambda dtype: dtype == torch.float32))
    assert supported_precisions("torch", "cpu") == ("fp32",)
    for kw in ({"bf16": True}, {"precision": "bf16"}):
        with pytest.raises(EngineError, match="no bfloat16 instructions for oneDNN.*hundreds of times slower"):
            FeatureExtractor(model, info, get_preset("speed"), device="cpu", **kw)


def test_descriptors_do_not_depend_on_batch_size(default_extractor) -> None:
    """Kind: descriptors depended on batch size (231 of 4,524 patch-2 descriptors moved by up to 0.01
    between batch 1 and 4, RANSAC inliers 75 -> 72). Pooling now runs per image: bit-identical."""
    from pnv_ros.matching import PatchMatcher

    ex = default_extractor
    frames = [rtab_frame(i) for i in (10, 11, 50, 51)]
    runs = {}
    for bs in (1, 3, 4):
        e = FeatureExtractor(ex.model, ex.info, ex.preset, device="cpu", batch_size=bs)
        runs[bs] = e.extract(frames)
    for bs in (3, 4):
        for a, b in zip(runs[1], runs[bs]):
            assert np.array_equal(a.global_desc, b.global_desc)
            assert all(np.array_equal(x, y) for x, y in zip(a.patches, b.patches)), f"batch {bs}"
    pm = PatchMatcher(ex.preset, "ransac")
    inliers = {bs: pm.score(runs[bs][0], [runs[bs][1]]).num_inliers.tolist() for bs in (1, 4)}
    assert inliers[1] == inliers[4] and max(inliers[1][0]) > 10


def test_open_extractor_is_the_assembly(extractor: FeatureExtractor, random_ckpt: Path) -> None:
    """open_extractor (resolve, load, FeatureExtractor) gives the extractor the callers assembled by hand: the same
    model identity, preset and descriptors; the runtime's settings arrive (bit depth, batch size)."""
    from pnv_ros.engines.spec import RuntimeSpec
    from pnv_ros.extract import open_extractor

    ex = open_extractor(random_ckpt, "speed", RuntimeSpec(device="cpu", bit_depth=12, batch_size=3))
    assert ex.info.identity == extractor.info.identity and ex.preset == extractor.preset
    assert (ex.bit_depth, ex.batch_size, ex.engine_name, ex.precision) == (12, 3, "torch", "fp32")
    a, b = ex.extract_one(rtab_frame(1)), extractor.extract_one(rtab_frame(1))
    np.testing.assert_array_equal(a.global_desc, b.global_desc)
    np.testing.assert_array_equal(a.patches[0], b.patches[0])
    with pytest.raises(EngineError, match="bf16"):  # the old switch with another engine: refused as before
        open_extractor(random_ckpt, get_preset("speed"), RuntimeSpec(device="cpu", engine="onnxruntime", bf16=True))


def test_runtime_spec_checks_names_without_torch() -> None:
    """RuntimeSpec lives in the torch-free engines.spec: importing it (and the package's names) loads no torch,
    and an unknown engine or precision is refused when the spec is made, naming the choices."""
    import subprocess
    import sys

    probe = (
        "import sys\nfrom pnv_ros.engines.spec import RuntimeSpec\nfrom pnv_ros.engines import ENGINES, variant\n"
        "from pnv_ros.errors import EngineError\nRuntimeSpec(engine='openvino', precision='int8')\n"
        "for bad in ({'engine': 'tflite'}, {'precision': 'fp8'}):\n"
        "    try:\n        RuntimeSpec(**bad)\n    except EngineError as e:\n        print(e)\n"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert "unknown engine 'tflite'" in lines[0] and "onnxruntime" in lines[0]
    assert "unknown precision 'fp8'" in lines[1] and "int8" in lines[1]
    assert lines[-1] == "False"
