"""pnv train and pnv add-pca on real images: the loss falls, checkpoints round-trip and load everywhere,
a resumed run continues bit for bit, bad inputs are refused, and add-pca gives the default model's WPCA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORRIDOR

pytestmark = pytest.mark.slow
PLACES = 20  # corridor places 0..19 of both traversals: 40 images
#: small-set choices: a 128-d WPCA (the training database gives ~300 samples), 3 negatives per query
SMALL = {"dims": 128, "negatives": 3}


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ref/ + query/ (corridor places 0..29) and gt.npy (|i - j| <= 2, the set's rule)."""
    root = tmp_path_factory.mktemp("pairs")
    for part in ("ref", "query"):
        (root / part).mkdir()
        for i in range(PLACES):
            shutil.copy(CORRIDOR / part / f"{i:07d}.jpg", root / part / f"{i:07d}.jpg")
    i = np.arange(PLACES)
    np.save(root / "gt.npy", (np.abs(i[:, None] - i[None]) <= 2).astype(np.uint8))
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_cache")


def _data(pairs: Path):
    from pnv_ros.training.datasets import from_pairs

    return from_pairs(pairs / "ref", pairs / "query", pairs / "gt.npy")


def _train(pairs: Path, out: Path, cache_dir: Path, epochs: int, resume: Path | None = None, **cfg):
    from pnv_ros.model.registry import default_checkpoint_path
    from pnv_ros.training.trainer import TrainConfig, train_model

    config = TrainConfig(epochs=epochs, lr=0.01, **{**SMALL, **cfg})
    return train_model(
        _data(pairs),
        out,
        init=None if resume else default_checkpoint_path(),
        resume=resume,
        config=config,
        cache_dir=cache_dir,
        log=lambda m: None,
    )


@pytest.fixture(scope="session")
def two_epochs(pairs: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory, default_ckpt: Path):
    return _train(pairs, tmp_path_factory.mktemp("run2") / "m.pth.tar", cache_dir, 2)


def test_loss_falls_on_fixed_triplets(pairs: Path, cache_dir: Path, default_ckpt: Path, two_epochs) -> None:
    """The triplet loss of one fixed set of mined triplets falls as the NetVLAD layer trains."""
    from pnv_ros.model.checkpoint import load_checkpoint
    from pnv_ros.model.default_model import fit_tensor
    from pnv_ros.training.feature_cache import build_cache, cache_key, frozen_prefix
    from pnv_ros.training.trainer import TrainConfig, Trainer, _image_ids, _training_model, _weights_digest

    data = _data(pairs)
    model = _training_model(load_checkpoint(default_ckpt)[0].state_dict())
    key = cache_key(_weights_digest(model.encoder), "netvlad", _image_ids(data))
    cache = build_cache(data.images, len(data.images), cache_dir, key, frozen_prefix(model, "netvlad"), fit_tensor)
    train, val = data.split(0.2)
    t = Trainer(model, cache, train, val, TrainConfig(lr=0.05, **SMALL))
    triplets = t.mine(train.queries)
    assert len(triplets) >= 10

    def loss() -> float:
        with torch.no_grad():
            total, n = 0.0, 0
            for q, p, negs in triplets:
                e = t.forward(np.array([q, p, *negs]))
                k = len(negs)
                total += float(t.criterion(e[:1].expand(k, -1), e[1:2].expand(k, -1), e[2:]))
                n += k
        return total / n

    before = loss()
    for _ in range(2):
        t.train_epoch()
    after = loss()
    assert after < 0.95 * before, (before, after)


def test_vlad_matches_the_pooling_layer(default_ckpt: Path) -> None:
    """The trainer's matrix-product VLAD equals NetVLADPooling.forward (the model's own global descriptor)."""
    from pnv_ros.model.checkpoint import load_checkpoint
    from pnv_ros.training.trainer import vlad

    model, _ = load_checkpoint(default_ckpt)
    feats = torch.randn(3, 512, 6, 8)
    with torch.no_grad():
        np.testing.assert_allclose(vlad(model.pool, feats).numpy(), model.pool(feats).numpy(), atol=2e-6)


def test_output_loads_in_every_command(two_epochs, tmp_path: Path) -> None:
    """The trained model (official format, WPCA 512) and the training checkpoint (no WPCA) load; the model
    extracts; the metadata records the run; the work dir holds the curves."""
    from pnv_ros.model.checkpoint import load_checkpoint

    res = two_epochs
    model, info = load_checkpoint(res.out)
    assert info.family == "netvlad_vgg16" and model.num_pcs == 128
    raw = torch.load(res.out, weights_only=True)
    assert set(raw) == {"num_pcs", "state_dict"}
    ck, _ = load_checkpoint(res.work_dir / "checkpoint.pth.tar")
    assert ck.num_pcs == 0  # the authors' training checkpoints carry no WPCA
    for name in ("model_best.pth.tar", "history.json", "training.png"):
        assert (res.work_dir / name).stat().st_size > 0
    assert [h.epoch for h in res.history] == [0, 1, 2]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pnv_ros.cli",
            "extract",
            "--checkpoint",
            str(res.out),
            "--out",
            str(tmp_path / "f.npz"),
            "-q",
            str(CORRIDOR / "query" / "0000050.jpg"),
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "f.npz").is_file()


def test_resume_continues_bit_for_bit(pairs: Path, cache_dir: Path, two_epochs, tmp_path: Path) -> None:
    """One epoch, then --resume to two, gives the uninterrupted two-epoch run's weights, exactly."""
    one = _train(pairs, tmp_path / "a.pth.tar", cache_dir, 1)
    assert [h.epoch for h in one.history] == [0, 1]
    resumed = _train(pairs, tmp_path / "a.pth.tar", cache_dir, 2, resume=one.work_dir / "checkpoint.pth.tar")
    assert [h.epoch for h in resumed.history] == [0, 1, 2]
    a = torch.load(resumed.work_dir / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(two_epochs.work_dir / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h.loss for h in resumed.history] == [h.loss for h in two_epochs.history]


def test_bad_inputs_are_refused(pairs: Path, cache_dir: Path, two_epochs, tmp_path: Path) -> None:
    from pnv_ros.errors import CheckpointError, ConfigError
    from pnv_ros.training.trainer import TrainConfig, train_model

    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        _train(pairs, tmp_path / "x.pth.tar", cache_dir, 2, resume=bad)
    # a resume on other images: refused before any training
    other = tmp_path / "other"
    shutil.copytree(pairs, other)
    with pytest.raises(ConfigError, match="other images"):
        _train(other, tmp_path / "y.pth.tar", cache_dir, 3, resume=two_epochs.work_dir / "checkpoint.pth.tar")
    with pytest.raises(ConfigError, match="trainable layers"):
        train_model(
            _data(pairs), tmp_path / "z.pth.tar", init=two_epochs.out, config=TrainConfig(layers="conv4", **SMALL)
        )
    # the same images with other ground truth: its best score would not be comparable
    from pnv_ros.training.datasets import from_pairs

    i = np.arange(PLACES)
    np.save(tmp_path / "gt1.npy", (np.abs(i[:, None] - i[None]) <= 1).astype(np.uint8))
    with pytest.raises(ConfigError, match="other ground truth"):
        train_model(
            from_pairs(pairs / "ref", pairs / "query", tmp_path / "gt1.npy"),
            tmp_path / "g.pth.tar",
            resume=two_epochs.work_dir / "checkpoint.pth.tar",
            config=TrainConfig(epochs=3, **SMALL),
        )
    # a fresh run into a folder holding a run, or into an input folder: refused before any work
    with pytest.raises(ConfigError, match="holds a run"):
        train_model(_data(pairs), tmp_path / "h.pth.tar", init=two_epochs.out, work_dir=two_epochs.work_dir)
    with pytest.raises(ConfigError, match="inside the input folder"):
        train_model(_data(pairs), tmp_path / "i.pth.tar", init=two_epochs.out, work_dir=pairs / "ref" / "w")
    assert not (pairs / "ref" / "w").exists()
    # more WPCA dimensions than the training images can give: refused before training
    with pytest.raises(ConfigError, match="--dims"):
        train_model(_data(pairs), tmp_path / "j.pth.tar", init=two_epochs.out, config=TrainConfig(dims=4096))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pnv_ros.cli", *args], capture_output=True, text=True, env=os.environ)


def test_cli_train(pairs: Path, cache_dir: Path, tmp_path: Path, default_ckpt: Path) -> None:
    """pnv train (layout a) through the command line; a malformed ground truth is one line and writes nothing."""
    out = tmp_path / "m.pth.tar"
    common = [
        "train",
        "--pairs",
        str(pairs / "ref"),
        str(pairs / "query"),
        "--epochs",
        "1",
        "--dims",
        "128",
        "--negatives",
        "3",
        "--cache-dir",
        str(cache_dir),
        "-q",
    ]
    r = _cli(*common, "--gt", str(pairs / "gt.npy"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "best epoch" in r.stdout and out.is_file()
    np.save(tmp_path / "bad_gt.npy", np.ones((3, 4)))
    r = _cli(*common, "--gt", str(tmp_path / "bad_gt.npy"), "--out", str(tmp_path / "n.pth.tar"))
    assert r.returncode == 1 and r.stderr.startswith("error:") and "bad_gt.npy" in r.stderr, r.stderr
    assert not (tmp_path / "n.pth.tar").exists()


def test_add_pca_reproduces_a_built_model(tmp_path: Path, default_ckpt: Path) -> None:
    """pnv add-pca on the images a model was built from gives that model's WPCA bit for bit (the builders' rule
    and seeded stream, one piece of code). A 24-image build keeps it quick; README shows the default model's
    own command (222 images), which holds the same way."""
    from pnv_ros.model.default_model import build_default_model

    fit = tmp_path / "fit"
    fit.mkdir()
    for i in range(0, 96, 4):
        shutil.copy(CORRIDOR / "ref" / f"{i:07d}.jpg", fit / f"{i:07d}.jpg")
    built = build_default_model(
        sorted(fit.iterdir()), tmp_path / "built.pth.tar", wheel_dir=default_ckpt.parent / "wheels"
    )
    out = tmp_path / "again.pth.tar"
    r = _cli("add-pca", str(built), "--images", str(fit), "--dims", "512", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "whitening PCA" in r.stdout
    a = torch.load(out, weights_only=True)["state_dict"]
    b = torch.load(built, weights_only=True)["state_dict"]
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "again.json").is_file()
    r = _cli("add-pca", str(built), "--images", str(fit), "--dims", "4096", "--out", str(tmp_path / "big.pth.tar"))
    assert r.returncode == 1 and "4096" in r.stderr, r.stderr


def test_dinov2_family_trains_its_aggregation(pairs: Path, cache_dir: Path, tmp_path: Path) -> None:
    """--init dinov2_vlad: the NetVLAD layer trains on cached DINOv2 tokens (backbone frozen); the result is a
    DINOv2 model file with the source's layer, facet, input size and global weight; conv5 is refused."""
    from pnv_ros.errors import ConfigError
    from pnv_ros.model.checkpoint import load_checkpoint
    from pnv_ros.model.registry import resolve_checkpoint
    from pnv_ros.training.trainer import TrainConfig, train_model

    src = resolve_checkpoint("dinov2_vlad")
    res = train_model(
        _data(pairs),
        tmp_path / "d.pth.tar",
        init=src,
        config=TrainConfig(epochs=1, lr=0.01, **SMALL),
        cache_dir=cache_dir,
        log=lambda m: None,
    )
    model, info = load_checkpoint(res.out)
    source, _ = load_checkpoint(src)
    assert info.family == "dinov2_vlad" and model.num_pcs == 128
    assert model.config() == source.config()
    last = torch.load(res.work_dir / "checkpoint.pth.tar", weights_only=True)
    assert last["pnv_train"]["dinov2"] == source.config()
    assert not torch.equal(last["state_dict"]["pool.conv.weight"], source.pool.conv.weight)  # the layer trained
    for k, v in source.encoder.state_dict().items():  # the backbone did not
        assert torch.equal(model.encoder.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="conv5"):
        train_model(_data(pairs), tmp_path / "e.pth.tar", init=src, config=TrainConfig(layers="conv5", **SMALL))
