import pickle
from pathlib import Path

import pytest
import torch

from pnv_ros.errors import CheckpointError
from pnv_ros.model.checkpoint import load_checkpoint, read_state_dict, save_checkpoint


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def test_loads_and_infers_dimensions(random_ckpt: Path) -> None:
    model, info = load_checkpoint(random_ckpt)
    assert info.num_clusters == 16 and info.dim == 64 and not info.vladv2
    assert model.pool.centroids.shape == (16, 512)
    assert len(info.sha256) == 64 and info.identity.endswith(info.sha256[:12])


def test_training_checkpoint_extras_are_ignored(random_ckpt: Path, tmp_path: Path) -> None:
    p = tmp_path / "train.pth.tar"
    torch.save(
        {"epoch": 3, "best_score": 0.9, "optimizer": {"lr": 0.1}, "num_pcs": 64, "state_dict": _state(random_ckpt)}, p
    )
    _, info = load_checkpoint(p)
    assert info.dim == 64


def test_dataparallel_keys_are_renamed(random_ckpt: Path, tmp_path: Path) -> None:
    st = {k.replace("encoder.", "encoder.module.", 1): v for k, v in _state(random_ckpt).items()}
    p = tmp_path / "dp.pth.tar"
    save_checkpoint(st, p, 64)
    assert read_state_dict(p)[1:3] == (16, 64)


def test_missing_key_is_named(random_ckpt: Path, tmp_path: Path) -> None:
    st = _state(random_ckpt)
    del st["encoder.26.weight"]
    p = tmp_path / "m.pth.tar"
    save_checkpoint(st, p, 64)
    with pytest.raises(CheckpointError, match=r"missing key 'encoder.26.weight'"):
        load_checkpoint(p)


def test_wrong_shape_is_named(random_ckpt: Path, tmp_path: Path) -> None:
    st = _state(random_ckpt)
    st["pool.conv.weight"] = torch.zeros(16, 256, 1, 1)
    p = tmp_path / "s.pth.tar"
    save_checkpoint(st, p, 64)
    with pytest.raises(
        CheckpointError, match=r"'pool.conv.weight' has shape \[16, 256, 1, 1\], expected \[16, 512, 1, 1\]"
    ):
        load_checkpoint(p)


def test_unexpected_key_is_named(random_ckpt: Path, tmp_path: Path) -> None:
    st = _state(random_ckpt)
    st["head.fc.weight"] = torch.zeros(3)
    p = tmp_path / "u.pth.tar"
    save_checkpoint(st, p, 64)
    with pytest.raises(CheckpointError, match="unexpected key 'head.fc.weight'"):
        load_checkpoint(p)


def test_corrupt_and_truncated_files(random_ckpt: Path, tmp_path: Path) -> None:
    p = tmp_path / "c.pth.tar"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(p)
    t = tmp_path / "t.pth.tar"
    t.write_bytes(random_ckpt.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(t)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth.tar")


class _Evil:
    def __reduce__(self):  # would run code if unpickled
        return (eval, ("__import__('os').system('touch /tmp/pnv_pwned')",))


def test_pickled_code_is_never_run(tmp_path: Path) -> None:
    p = tmp_path / "evil.pth.tar"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    Path("/tmp/pnv_pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(p)
    assert not Path("/tmp/pnv_pwned").exists()


def test_nan_weights_refused(random_ckpt: Path, tmp_path: Path) -> None:
    st = _state(random_ckpt)
    st["WPCA.0.bias"][0] = float("nan")
    p = tmp_path / "n.pth.tar"
    save_checkpoint(st, p, 64)
    with pytest.raises(CheckpointError, match="'WPCA.0.bias' holds NaN"):
        load_checkpoint(p)


def test_default_model_window_sums_match_direct_sums() -> None:
    import torch.nn.functional as F

    from pnv_ros.model.default_model import window_sums

    g = torch.Generator().manual_seed(0)
    res = torch.randn(6, 30, 40, generator=g)  # (D, h, w)
    integral = F.pad(res.cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    top, left = torch.tensor([0, 3, 22, 25]), torch.tensor([0, 17, 32, 35])
    for size in (2, 5):
        got = window_sums(integral, top, left, size)
        want = torch.stack([res[:, t : t + size, c : c + size].sum(dim=(1, 2)) for t, c in zip(top, left)])
        assert got.shape == (4, 6) and got.is_contiguous()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
