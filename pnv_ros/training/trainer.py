"""NetVLAD training as the authors' ``train.py`` defines it, on cached frozen features (``pnv train``).

What is theirs (``train.py``, ``configs/train.ini``, ``training_tools/msls.py`` of patchnetvlad 0.1.8):
- loss: ``nn.TripletMarginLoss(margin=sqrt(0.1), p=2, reduction="sum")`` over every (query, positive,
  negative) triplet of a batch, divided by the number of negatives (``margin`` below is their 0.1);
- batches of 4 queries, each with its closest positive and the 5 hardest negatives (``nNeg = 5``, the
  MSLS default their ``train.py`` uses; Nanne's pytorch-NetVlad used 10: ``negatives``);
- mining: each epoch samples the queries (with replacement, uniform weights) and splits them into
  cache subsets of 1000; per subset the model's current descriptors of the queries, their positives and
  1000 random database images rank the positives (the most similar one is used) and the negatives (the
  most similar ones are the hardest);
- SGD (lr 1e-4, momentum 0.9, weight decay 1e-3), StepLR (step 5 epochs, gamma 0.5), 30 epochs,
  validation Recall@N every epoch on global NetVLAD descriptors, the best Recall@5 kept, patience 10;
- checkpoints ``{"epoch", "state_dict", "recalls", "best_score", "not_improved", "optimizer",
  "parallel"}`` without a WPCA layer; the WPCA is fitted afterwards (``add_pca.py``; here automatically).

What differs, and why:
- the frozen layers run once per image (:mod:`pnv_ros.training.feature_cache`): same values, no
  augmentation is used by either;
- the VLAD is computed as ``A X^T - (sum A) c`` (a matrix product; identical sums) rather than a
  (B, K, C, h, w) residual tensor, so a batch fits a robot's memory under autograd;
- negatives are removed per query (its own non-negatives), not as the union over the cache subset:
  on a map of a hundred images the union removes every image;
- a query is kept when at least one of its chosen negatives violates the margin (its loss is zero
  otherwise); their MSLS code compares similarities with the margin, which keeps nearly every query;
- epoch 0 (the starting model) is validated too and can be the best: training never makes the result
  worse on the validation places than what it started from; a tie in Recall@5 (a small map saturates it)
  goes to the lower validation triplet loss (the training loss on the validation places);
- one seeded ``numpy`` generator drives every random choice, and its state, torch's and the optimiser's
  are in each checkpoint, so ``--resume`` continues the same run bit for bit.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pnv_ros.errors import CheckpointError, ConfigError
from pnv_ros.model.checkpoint import read_raw
from pnv_ros.model.netvlad import PatchNetVLADModel, vlad_normalise
from pnv_ros.storage import utc_now
from pnv_ros.training.datasets import TrainingSet
from pnv_ros.training.feature_cache import FeatureCache, trainable_head

FORMAT = "pnv-train-1"


@dataclass(frozen=True)
class TrainConfig:
    """Training choices; defaults are the authors' ``configs/train.ini`` and ``train.py`` values, except
    ``layers`` (``"netvlad"``: the CPU adaptation mode; ``"conv5"``: their freezing) and ``holdout``."""

    layers: str = "netvlad"
    epochs: int = 30  # train.py --nEpochs; 0: no training, only the WPCA refitted on the training images
    batch_size: int = 4  # train.ini batchsize
    lr: float = 1e-4  # train.ini lr
    momentum: float = 0.9
    weight_decay: float = 1e-3
    lr_step: int = 5  # StepLR step_size (epochs)
    lr_gamma: float = 0.5
    margin: float = 0.1  # train.ini margin; the loss uses sqrt(margin) on plain L2 distances, as theirs
    negatives: int = 5  # MSLS nNeg default (their train.py passes none)
    cached_queries: int = 1000  # MSLS cached_queries
    cached_negatives: int = 1000  # MSLS cached_negatives
    patience: int = 10  # epochs without a better validation Recall@5
    seed: int = 123  # train.ini seed
    dims: int = 512  # WPCA dimensions of the final model
    holdout: float = 0.2  # share of queries (the last places) kept for validation
    recluster: bool = False  # refit the NetVLAD clusters on the training images first (their get_clusters)

    def check(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.negatives < 1 or self.lr <= 0 or self.margin <= 0:
            raise ConfigError("batch size, negatives, learning rate and margin must be positive, epochs 0 or more")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"--holdout {self.holdout}: give a share between 0 and 1 (e.g. 0.2)")


@dataclass
class EpochLog:
    epoch: int
    loss: float | None
    triplets: int
    recalls: dict[int, float]
    seconds: float
    lr: float
    val_loss: float = 0.0


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights."""

    epoch: int = 0
    best_score: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    not_improved: int = 0
    history: list[EpochLog] = field(default_factory=list)


def vlad(pool: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Global NetVLAD descriptors (no WPCA). feats: (N, C, h, w) -> (N, K*C), unit length.

    The same sums as ``NetVLADPooling.forward`` (sum_i a_k(i) (x_i - c_k) = (A X^T)_k - (sum_i a_k(i)) c_k),
    in memory O(N K hw) instead of O(N K C hw), so training batches fit under autograd."""
    x = F.normalize(feats, p=2, dim=1)
    a = F.softmax(pool.conv(x), dim=1).flatten(2)  # (N, K, hw)
    v = torch.bmm(a, x.flatten(2).transpose(1, 2)) - a.sum(-1, keepdim=True) * pool.centroids  # (N, K, C)
    return vlad_normalise(v)


class Trainer:
    """One training run of a NetVLAD model (either family) on a :class:`TrainingSet`'s cached maps."""

    def __init__(
        self,
        model: PatchNetVLADModel,
        cache: FeatureCache,
        train_set: TrainingSet,
        val_set: TrainingSet,
        config: TrainConfig,
        device: str = "cpu",
    ) -> None:
        self.model, self.cache, self.config, self.device = model, cache, config, torch.device(device)
        self.train_set, self.val_set = _valid_only(train_set, cache.valid), _valid_only(val_set, cache.valid)
        if not len(self.train_set.queries):
            raise ConfigError("no training query with a positive is left (after dropping undecodable images)")
        self.head = trainable_head(model, config.layers)
        model.to(self.device)
        for p in model.parameters():
            p.requires_grad = False
        self.params = list(model.pool.parameters()) + (list(self.head.parameters()) if self.head else [])
        for p in self.params:
            p.requires_grad = True
        self.optimizer = torch.optim.SGD(
            self.params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_step, config.lr_gamma)
        self.criterion = nn.TripletMarginLoss(margin=config.margin**0.5, p=2, reduction="sum")
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self.state = TrainState()
        #: queries of the last epoch that gave no triplet: too few negatives, or no negative violating the margin
        self.skipped = {"few_negatives": 0, "no_violation": 0}

    # -- descriptors -----------------------------------------------------------------------------------
    def descriptors(self, index: np.ndarray, chunk: int = 16) -> torch.Tensor:
        """(n, K*C) global descriptors of these images with the current weights, no gradients."""
        out = []
        with torch.no_grad():
            for s in range(0, len(index), chunk):
                out.append(self.forward(index[s : s + chunk]))
        return torch.cat(out) if out else torch.zeros(0, self.model.pool.num_clusters * self.model.pool.dim)

    def forward(self, index: np.ndarray) -> torch.Tensor:
        feats = self.cache.get(index, self.device)
        if self.head is not None:
            feats = self.head(feats)
        return vlad(self.model.pool, feats)

    # -- mining ----------------------------------------------------------------------------------------
    def mine(self, queries: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
        """(query, closest positive, hardest negatives) image indices for one cache subset of queries."""
        ts, cfg = self.train_set, self.config
        qpos = {int(q): i for i, q in enumerate(ts.queries)}
        rows = [qpos[int(q)] for q in queries]
        pos = np.unique(np.concatenate([ts.positives[r] for r in rows]))
        neg = self.rng.choice(ts.db, min(cfg.cached_negatives, len(ts.db)), replace=False)
        everything = np.unique(np.concatenate([queries, pos, neg]))
        desc = self.descriptors(everything)
        at = {int(i): j for j, i in enumerate(everything)}
        triplets = []
        for q, r in zip(queries, rows):
            dq = desc[at[int(q)]]
            p_idx = ts.positives[r]
            sp = desc[[at[int(p)] for p in p_idx]] @ dq
            best_p = int(p_idx[int(torch.argmax(sp))])
            n_idx = neg[~np.isin(neg, ts.non_negatives[r])]
            n_idx = n_idx[n_idx != q]
            if len(n_idx) < cfg.negatives:
                self.skipped["few_negatives"] += 1
                continue
            sn = desc[[at[int(n)] for n in n_idx]] @ dq
            hardest = n_idx[torch.argsort(sn, descending=True, stable=True)[: cfg.negatives].numpy()]
            d_p = torch.linalg.vector_norm(dq - desc[at[best_p]])
            d_n = torch.linalg.vector_norm(dq[None] - desc[[at[int(n)] for n in hardest]], dim=1)
            if bool((d_p - d_n + cfg.margin**0.5 > 0).any()):
                triplets.append((int(q), best_p, hardest))
            else:
                self.skipped["no_violation"] += 1
        return triplets

    # -- one epoch ---------------------------------------------------------------------------------------
    def train_epoch(self, progress: Callable[[str, int, int], None] | None = None) -> tuple[float | None, int]:
        cfg, ts = self.config, self.train_set
        self.skipped = {"few_negatives": 0, "no_violation": 0}
        order = self.rng.choice(ts.queries, len(ts.queries), replace=True)
        subsets = np.array_split(order, math.ceil(len(order) / cfg.cached_queries))
        total, count, steps = 0.0, 0, 0
        for sub in subsets:
            self.model.eval()
            triplets = self.mine(sub)
            if self.head is not None:
                self.head.train()
            self.model.pool.train()
            perm = self.rng.permutation(len(triplets))
            batches = [perm[s : s + cfg.batch_size] for s in range(0, len(perm), cfg.batch_size)]
            for b, batch in enumerate(batches):
                chosen = [triplets[i] for i in batch]
                n_neg = [len(t[2]) for t in chosen]
                index = np.concatenate([[t[0] for t in chosen], [t[1] for t in chosen]] + [t[2] for t in chosen])
                enc = self.forward(index)
                nq = len(chosen)
                vq, vp, vn = enc[:nq], enc[nq : 2 * nq], enc[2 * nq :]
                owner = torch.repeat_interleave(torch.arange(nq), torch.tensor(n_neg))
                loss = self.criterion(vq[owner], vp[owner], vn) / float(sum(n_neg))
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach())
                steps += 1
                count += nq
                if progress:
                    progress("train", b + 1, len(batches))
        self.model.eval()
        return (total / steps if steps else None), count

    def validate(self, n_values: tuple[int, ...] = (1, 5, 10)) -> tuple[dict[int, float], float]:
        """Recall@N of the validation queries against the whole database (global NetVLAD, as theirs), and the
        validation triplet loss: the training loss of each validation query with its closest positive and
        its hardest negatives, averaged (a continuous score that still moves when Recall@5 is saturated)."""
        from pnv_ros.eval.ground_truth import GroundTruth, recall_at_n

        vs, cfg = self.val_set, self.config
        self.model.eval()
        dq, dd = self.descriptors(vs.queries), self.descriptors(vs.db)
        sim = dq @ dd.T
        top = torch.argsort(sim, dim=1, descending=True, stable=True)[:, : max(n_values)].numpy()
        preds = [vs.db[row].tolist() for row in top]
        recalls = recall_at_n(preds, GroundTruth([set(p.tolist()) for p in vs.positives]), n_values)
        losses = []
        for i, (pos, non) in enumerate(zip(vs.positives, vs.non_negatives)):
            d = torch.sqrt(torch.clamp(2 - 2 * sim[i], min=0))  # unit vectors: |q - x| from q . x
            neg = ~np.isin(vs.db, non) & (vs.db != vs.queries[i])
            if not neg.any():
                continue
            d_p = d[np.isin(vs.db, pos)].min()
            d_n = torch.sort(d[neg]).values[: cfg.negatives]
            losses.append(float(torch.clamp(d_p - d_n + cfg.margin**0.5, min=0).mean()))
        return recalls, float(np.mean(losses)) if losses else 0.0

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint(self, recalls: dict[int, float], meta: dict[str, Any]) -> dict[str, Any]:
        """The authors' training-checkpoint dict (plus ``pnv_train``: what a resumed run needs)."""
        st = self.state
        return {
            "epoch": st.epoch,
            "state_dict": {
                k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith("WPCA")
            },
            "recalls": {int(k): float(v) for k, v in recalls.items()},
            "best_score": float(st.best_score),
            "not_improved": int(st.not_improved),
            "optimizer": self.optimizer.state_dict(),
            "parallel": False,
            "pnv_train": {
                "format": FORMAT,
                "config": asdict(self.config),
                "scheduler": self.scheduler.state_dict(),
                "rng": json.dumps(self.rng.bit_generator.state),
                "torch_rng": torch.get_rng_state(),
                "best_epoch": st.best_epoch,
                "best_val_loss": st.best_val_loss,
                "history": json.dumps([asdict(h) for h in st.history]),
                **meta,
            },
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        t = ckpt["pnv_train"]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(t["scheduler"])
        self.rng.bit_generator.state = json.loads(t["rng"])
        torch.set_rng_state(t["torch_rng"])
        hist = [
            EpochLog(**{**h, "recalls": {int(k): v for k, v in h["recalls"].items()}}) for h in json.loads(t["history"])
        ]
        self.state = TrainState(
            int(ckpt["epoch"]),
            float(ckpt["best_score"]),
            float(t["best_val_loss"]),
            int(t["best_epoch"]),
            int(ckpt["not_improved"]),
            hist,
        )

    def improves(self, recalls: dict[int, float], val_loss: float) -> bool:
        """The authors' rule, a higher validation Recall@5, and on a tie a lower validation triplet loss (on a
        small map Recall@5 is often 1.0 from the start and would never let a trained epoch win)."""
        st = self.state
        return recalls[5] > st.best_score or (recalls[5] == st.best_score and val_loss < st.best_val_loss)


def _valid_only(ts: TrainingSet, valid: np.ndarray) -> TrainingSet:
    """The set without images whose maps are missing (undecodable): queries without a positive go."""
    keep_q, pos, non = [], [], []
    for q, p, n in zip(ts.queries, ts.positives, ts.non_negatives):
        p = p[valid[p]]
        if valid[q] and len(p):
            keep_q.append(q)
            pos.append(p)
            non.append(n)
    return replace(
        ts, db=ts.db[valid[ts.db]], queries=np.asarray(keep_q, dtype=np.int64), positives=pos, non_negatives=non
    )


def save_training_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    """Atomically (a crash mid-write keeps the previous checkpoint)."""
    from pnv_ros.storage import atomic_file

    with atomic_file(path, "wb") as f:
        torch.save(ckpt, f)


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_training_checkpoint` (read with ``weights_only=True``)."""
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint (pnv train writes WORK_DIR/checkpoint.pth.tar)")
    ckpt = read_raw(path)
    if ckpt.get("pnv_train", {}).get("format") != FORMAT:
        raise CheckpointError(f"--resume {path} is not a pnv train checkpoint (give WORK_DIR/checkpoint.pth.tar)")
    return ckpt


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


# -- the whole run ----------------------------------------------------------------------------------------------

Progress = Callable[[str, int, int], None]
#: images the final WPCA is fitted on, at most (evenly spaced database images; as ``pnv models refit``)
WPCA_IMAGES = 300


@dataclass
class TrainResult:
    out: Path
    work_dir: Path
    history: list[EpochLog]
    best_epoch: int
    seconds: dict[str, float]


def _image_ids(ts: TrainingSet) -> list[str]:
    """Identities of the set's images for the cache key: path, size and mtime of files; the source's
    description and position for frames of a bag or arrays."""
    ids = []
    for i, img in enumerate(ts.images if isinstance(ts.images, (list, tuple)) else range(len(ts.images))):
        if isinstance(img, (str, Path)):
            st = Path(img).stat()
            ids.append(f"{Path(img).resolve()}:{st.st_size}:{st.st_mtime_ns}")
        else:
            ids.append(f"{json.dumps(ts.source, sort_keys=True, default=str)}#{i}")
    return ids


def _check_work_dir(work: Path, data: TrainingSet, *, fresh: bool, force: bool) -> None:
    """A work dir is never an input folder or inside one (its plot would become a training image), and a
    fresh run does not overwrite another run's checkpoints unless forced."""
    w = work.resolve()
    folders = (
        {Path(p).resolve().parent for p in data.images if isinstance(p, (str, Path))}
        if isinstance(data.images, (list, tuple))
        else set()
    )
    for f in folders:
        if w == f or w.is_relative_to(f):
            raise ConfigError(
                f"--work-dir {work} is inside the input folder {f}: its files would become "
                "training images; give another folder"
            )
    if fresh and not force and (work / "checkpoint.pth.tar").exists():
        raise ConfigError(
            f"{work} holds a run (checkpoint.pth.tar): continue it with --resume "
            f"{work / 'checkpoint.pth.tar'}, or give another --out / --work-dir (--force replaces it)"
        )


def _check_pca_samples(model: PatchNetVLADModel, train_set: TrainingSet, dims: int) -> None:
    """Refuse before training what the final WPCA could not fit: it samples the training database's images."""
    from pnv_ros.model.fitting import PATCHES_PER_IMAGE
    from pnv_ros.model.refit import _pca_samples_per_image, fitting_geometry

    grid, _, sizes = fitting_geometry(model)
    n = min(len(train_set.db), WPCA_IMAGES)
    per = _pca_samples_per_image(grid, sizes, PATCHES_PER_IMAGE)
    if n * per <= dims:
        raise ConfigError(
            f"the whitening PCA is fitted on the {n} training database images ({per} samples each, "
            f"{n * per} in all): {dims} dimensions need more; give --dims {n * per - 1} or less, or "
            "more images"
        )


def _labels_digest(data: TrainingSet) -> str:
    """Identity of the set's ground truth (database, queries, positives, non-negatives)."""
    import hashlib

    h = hashlib.sha256()
    for a in (data.db, data.queries, *data.positives, *data.non_negatives):
        h.update(np.asarray(a, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:20]


def _weights_digest(module: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _training_model(state: dict[str, torch.Tensor], dinov2: dict[str, Any] | None = None) -> PatchNetVLADModel:
    """A model without WPCA from a state dict (a WPCA in it is dropped): VGG-16 NetVLAD, or with ``dinov2``
    (a DINOv2 file's recorded choices) the DINOv2 family."""
    state = {k: v for k, v in state.items() if not k.startswith("WPCA")}
    if "pool.centroids" not in state:
        raise CheckpointError("training needs a NetVLAD model (pool.* weights)")
    k = int(state["pool.centroids"].shape[0])
    if dinov2 is not None:
        from pnv_ros.model.dinov2_vlad import DinoVLADModel

        model: PatchNetVLADModel = DinoVLADModel(
            k,
            0,
            dinov2["layer"],
            dinov2["facet"],
            (dinov2["input_height"], dinov2["input_width"]),
            dinov2["global_weight"],
        )
    else:
        model = PatchNetVLADModel(num_clusters=k, num_pcs=0, vladv2="pool.conv.bias" in state)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _to_tensor(model: PatchNetVLADModel) -> Callable[[Any], torch.Tensor]:
    """An image as the model's backbone takes it (the builders' fitting input: 480 x 640 for VGG-16, the
    recorded input size for DINOv2)."""
    from pnv_ros.model.families import family_of

    return family_of(model).fit_input(model)


def _recluster(model: PatchNetVLADModel, trainer: Trainer, rng: np.random.Generator) -> int:
    """The authors' ``get_clusters`` + ``init_params`` on the training database (the builders' code): k-means of
    100 L2-normalised local descriptors per image (at most 500 images: their 50,000 descriptors)."""
    from pnv_ros.model.fitting import DESCS_PER_IMAGE, sample_descriptors, set_clusters

    db = trainer.train_set.db
    pick = np.sort(rng.choice(db, min(len(db), 500), replace=False))

    def maps() -> Iterator[torch.Tensor]:  # one image at a time: 500 maps would not fit a robot's memory
        with torch.no_grad():
            for i in pick:
                f = trainer.cache.get([i])
                yield (trainer.head(f) if trainer.head is not None else f)[0]

    descs = sample_descriptors(maps(), rng, DESCS_PER_IMAGE)
    k = model.pool.num_clusters
    if len(descs) < k:
        raise ConfigError(f"--recluster: {len(descs)} descriptors for {k} clusters; give more images")
    set_clusters(model, descs, k)
    return len(descs)


def plot_history(history: list[EpochLog], path: Path) -> None:
    """Loss and validation Recall@N per epoch, two panels, PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pnv_ros.storage import atomic_file

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    tr = [h for h in history if h.loss is not None]
    a.plot([h.epoch for h in tr], [h.loss for h in tr], "o-", label="training (mined triplets)")
    a.plot([h.epoch for h in history], [h.val_loss for h in history], "s--", label="validation places")
    a.set(xlabel="epoch", ylabel="mean triplet loss", title="triplet loss")
    a.legend()
    for n in sorted({n for h in history for n in h.recalls}):
        b.plot([h.epoch for h in history], [h.recalls[n] for h in history], "o-", label=f"Recall@{n}")
    b.set(xlabel="epoch (0 = starting model)", ylabel="recall", title="validation (global NetVLAD)", ylim=(0, 1.02))
    b.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _prepare_work_dir(
    out: Path,
    data: TrainingSet,
    init: str | Path | None,
    resume: str | Path | None,
    work_dir: str | Path | None,
    device: str,
    force: bool,
) -> Path:
    """The run's work folder, after checking it, ``out``, its metadata file and ``device``.

    A resumed run continues in its checkpoint's folder; a fresh one uses ``work_dir`` or
    ``OUT`` without suffixes + ``_training``.

    Raises:
        ConfigError: a work dir other than the resumed run's, a work dir that holds a run
            (without ``force``) or lies in an input folder, or a CUDA device torch does not see.
        OutputError: an output that cannot be written.
    """
    from pnv_ros.model.refit import metadata_path
    from pnv_ros.storage import check_output

    if resume:  # a run lives in one folder: its checkpoints and best model stay together
        work = Path(resume).parent
        if work_dir and Path(work_dir).resolve() != work.resolve():
            raise ConfigError(f"--work-dir {work_dir}: a resumed run continues in its own folder {work}")
    else:
        work = Path(work_dir) if work_dir else out.parent / (out.name.split(".")[0] + "_training")
    _check_work_dir(work, data, fresh=not resume, force=force)
    check_output(out, what="--out", inputs=[p for p in (init, resume) if p])
    check_output(metadata_path(out), what=f"the metadata file of --out {out}")
    check_output(work, folder=True, what="--work-dir", inputs=[p for p in (init,) if p])
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device here (torch sees none): use --device cpu")
    return work


@dataclass
class _Start:
    """Where a run starts: its settings, model and provenance."""

    cfg: TrainConfig
    #: the DINOv2 family's config, None for VGG-16
    dinov2: dict[str, Any] | None
    model: PatchNetVLADModel
    #: the starting model's record (path, sha256, identity) for the metadata
    init_record: dict[str, Any]
    #: the resumed training checkpoint, None for a fresh run
    ckpt: dict[str, Any] | None


def _starting_point(init: str | Path | None, resume: str | Path | None, config: TrainConfig | None) -> _Start:
    """Load the model to train: from the ``resume`` checkpoint (its choices kept, ``config``'s
    epochs and dims applied) or from the ``init`` model file (with ``config`` or the defaults).

    Raises:
        ConfigError: neither init nor resume, or choices that fail :meth:`TrainConfig.check`.
        CheckpointError: a bad model or checkpoint file.
    """
    from pnv_ros.model.checkpoint import load_checkpoint

    ckpt = None
    if resume:
        ckpt = load_training_checkpoint(Path(resume))
        recorded = ckpt["pnv_train"]
        given = config or TrainConfig(**recorded["config"])
        cfg = TrainConfig(**{**recorded["config"], "epochs": given.epochs, "dims": given.dims})
        dinov2 = recorded.get("dinov2")
        model = _training_model(ckpt["state_dict"], dinov2)
        init_record = recorded["init"]
    else:
        cfg = config or TrainConfig()
        if init is None:
            raise ConfigError("give a model to start from (--init) or a checkpoint to continue (--resume)")
        loaded, info = load_checkpoint(init)
        dinov2 = loaded.config() if info.family == "dinov2_vlad" else None
        model = _training_model(loaded.state_dict(), dinov2)
        init_record = {"model": str(init), "sha256": info.sha256, "identity": info.identity}
    cfg.check()
    return _Start(cfg, dinov2, model, init_record, ckpt)


def _check_resume_fits(ckpt: dict[str, Any] | None, resume: str | Path | None, data_key: str, labels: str) -> None:
    """A resumed run must see the same images, frozen backbone and ground truth as before.

    Raises:
        ConfigError: the checkpoint's data key or labels digest differ from the given ones.
    """
    if ckpt is not None and ckpt["pnv_train"]["data_key"] != data_key:
        raise ConfigError(
            f"--resume {resume} was trained on other images or another frozen backbone than given "
            "now: give the same data as the run it continues"
        )
    if ckpt is not None and ckpt["pnv_train"].get("labels") != labels:
        raise ConfigError(
            f"--resume {resume} was trained with other ground truth (positives, radii, gaps) than "
            "given now: its best score is not comparable; start a new run (--init)"
        )


def _begin(
    trainer: Trainer,
    model: PatchNetVLADModel,
    ckpt: dict[str, Any] | None,
    meta: dict[str, Any],
    work: Path,
    log: Callable[[str], None],
) -> None:
    """Restore a resumed run, or validate the starting model as epoch 0 and checkpoint it
    (``model_best`` and ``checkpoint``, so the run is resumable from here)."""
    cfg = trainer.config
    if ckpt is not None:
        trainer.restore(ckpt)
        log(
            f"resuming after epoch {trainer.state.epoch} (best Recall@5 {trainer.state.best_score:.3f} at epoch "
            f"{trainer.state.best_epoch})"
        )
        return
    if cfg.recluster:
        n = _recluster(model, trainer, trainer.rng)
        log(f"clusters refitted on {n} descriptors of the training images")
    t0 = time.perf_counter()
    r, vloss = trainer.validate()
    trainer.state.history.append(EpochLog(0, None, 0, r, elapsed(t0), cfg.lr, vloss))
    trainer.state.best_score, trainer.state.best_val_loss, trainer.state.best_epoch = r[5], vloss, 0
    c = trainer.checkpoint(r, meta)
    save_training_checkpoint(c, work / "model_best.pth.tar")
    save_training_checkpoint(c, work / "checkpoint.pth.tar")  # resumable from here
    log(
        f"epoch 0 (start): validation Recall@1/5/10 {r[1]:.3f}/{r[5]:.3f}/{r[10]:.3f}, loss {vloss:.4f} on "
        f"{len(trainer.val_set.queries)} queries; {len(trainer.train_set.queries)} training queries"
    )


def _epoch(
    trainer: Trainer,
    meta: dict[str, Any],
    work: Path,
    progress: Progress | None,
    log: Callable[[str], None],
) -> None:
    """One epoch: train, step the scheduler, validate, update the best score, write
    ``checkpoint.pth.tar`` (and ``model_best.pth.tar`` when better), ``training.png`` and
    ``history.json`` in ``work``, and log the epoch."""
    from pnv_ros.storage import write_text_atomic

    cfg, st = trainer.config, trainer.state
    t0 = time.perf_counter()
    lr = trainer.optimizer.param_groups[0]["lr"]
    loss, n = trainer.train_epoch(progress)
    with warnings.catch_warnings():  # an epoch without a violating triplet takes no optimiser step
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        trainer.scheduler.step()
    r, vloss = trainer.validate()
    st.epoch += 1
    st.history.append(EpochLog(st.epoch, loss, n, r, elapsed(t0), lr, vloss))
    better = trainer.improves(r, vloss)
    if better:
        st.best_score, st.best_val_loss, st.best_epoch, st.not_improved = r[5], vloss, st.epoch, 0
    else:
        st.not_improved += 1
    c = trainer.checkpoint(r, meta)
    save_training_checkpoint(c, work / "checkpoint.pth.tar")
    if better:
        save_training_checkpoint(c, work / "model_best.pth.tar")
    plot_history(st.history, work / "training.png")
    write_text_atomic(work / "history.json", json.dumps([asdict(h) for h in st.history], indent=1) + "\n")
    loss_s = f"{loss:.4f}" if loss is not None else "-"
    sk = trainer.skipped
    if sk["few_negatives"]:
        log(
            f"epoch {st.epoch}: {sk['few_negatives']} queries gave no triplet: fewer than {cfg.negatives} "
            "negatives left after their non-negatives (a small or dense map): lower --negatives, or give more "
            "places"
        )
    log(
        f"epoch {st.epoch}: loss {loss_s} on {n} triplets; validation Recall@1/5/10 "
        f"{r[1]:.3f}/{r[5]:.3f}/{r[10]:.3f}, loss {vloss:.4f}{' (best)' if better else ''}, "
        f"{st.history[-1].seconds:.0f} s"
    )


def _save_best_with_wpca(
    trainer: Trainer,
    model: PatchNetVLADModel,
    cache: FeatureCache,
    head: nn.Module | None,
    dinov2: dict[str, Any] | None,
    work: Path,
    run: str,
    out: Path,
    progress: Progress | None,
) -> tuple[int, Any]:
    """Load the run's best weights into ``model``, fit a WPCA on up to ``WPCA_IMAGES`` training
    database images (add_pca; the builders' sampling, seeded with ``SEED``) and write the model
    file ``out`` in its family's format.

    Returns:
        ``(images, fit)``: the number of images the WPCA saw and the fitting's record.

    Raises:
        CheckpointError: ``model_best.pth.tar`` belongs to another run.
    """
    from pnv_ros.model.checkpoint import save_checkpoint
    from pnv_ros.model.default_model import SEED, vgg_fitted_state
    from pnv_ros.model.refit import evenly_spaced

    dims = trainer.config.dims
    best = load_training_checkpoint(work / "model_best.pth.tar")
    if best["pnv_train"].get("run") != run:
        raise CheckpointError(
            f"{work / 'model_best.pth.tar'} belongs to another run than {work / 'checkpoint.pth.tar'}"
            ": give each run its own --work-dir"
        )
    model.load_state_dict(best["state_dict"], strict=True)
    model.eval()
    db = trainer.train_set.db
    pick = db[evenly_spaced(len(db), WPCA_IMAGES)]
    with torch.no_grad():
        maps = [(head(cache.get([i])) if head is not None else cache.get([i]))[0] for i in pick]
    rng = np.random.default_rng(SEED)
    if dinov2 is not None:
        from pnv_ros.model.dinov2_vlad import fitted_model, save_dinov2_vlad

        final, fit = fitted_model(model, maps, rng, dims, progress=progress, fit_clusters=False)
        save_dinov2_vlad(final, out)
    else:
        encoder = {f"encoder.{k}": v.detach() for k, v in model.encoder.state_dict().items()}
        state, fit = vgg_fitted_state(encoder, model, maps, rng, dims, fit_clusters=False, progress=progress)
        save_checkpoint(state, out, dims)
    return len(maps), fit


def train_model(
    data: TrainingSet,
    out: str | Path,
    *,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    config: TrainConfig | None = None,
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
    force: bool = False,
) -> TrainResult:
    """Train (or adapt) a NetVLAD model on ``data`` and write the best one, with a WPCA layer fitted on the
    training images, to ``out`` in its family's format (every command and the node load it): VGG-16 (the
    official format) or DINOv2 (the backbone frozen: ``layers="netvlad"`` only; its training checkpoints
    serve ``--resume`` and are not model files, as they lack the WPCA a DINOv2 file needs).

    init: the model to start from (a model file: the default model, an official or trained one); resume: a
    ``WORK_DIR/checkpoint.pth.tar`` to continue (its choices are kept; ``config.epochs`` may extend the
    run). work_dir (default ``OUT`` without suffixes + ``_training``) receives ``checkpoint.pth.tar`` (every
    epoch), ``model_best.pth.tar``, ``history.json`` and ``training.png``; the frozen maps are cached in
    ``cache_dir`` (default ``~/.cache/pnv_ros/training``). A fresh run refuses a work dir that holds a run
    (``force``: replace it) or lies in an input folder; a resumed run continues in its checkpoint's folder.

    Raises ConfigError (choices, too few queries, a resume that does not fit the data), CheckpointError
    (a bad model file), OutputError (an output that cannot be written), ImageError (no decodable
    image)."""
    from pnv_ros.model.checkpoint import file_sha256
    from pnv_ros.model.refit import metadata_path
    from pnv_ros.model.registry import models_dir
    from pnv_ros.storage import write_text_atomic
    from pnv_ros.training.feature_cache import build_cache, cache_key, frozen_prefix

    t_start = time.perf_counter()
    out = Path(out)
    work = _prepare_work_dir(out, data, init, resume, work_dir, device, force)
    start = _starting_point(init, resume, config)
    cfg, dinov2, model, ckpt = start.cfg, start.dinov2, start.model, start.ckpt
    train_set, val_set = data.split(cfg.holdout)
    _check_pca_samples(model, train_set, cfg.dims)
    head = trainable_head(model, cfg.layers)
    frozen = model.encoder if head is None else nn.Sequential(*list(model.encoder.children())[: -len(head)])
    data_key = cache_key(_weights_digest(frozen) + json.dumps(dinov2, sort_keys=True), cfg.layers, _image_ids(data))
    labels = _labels_digest(data)
    _check_resume_fits(ckpt, resume, data_key, labels)

    t0 = time.perf_counter()
    cache = build_cache(
        data.images,
        len(data.images),
        Path(cache_dir or models_dir().parent / "training"),
        data_key,
        frozen_prefix(model, cfg.layers),
        _to_tensor(model),
        progress=(lambda i, n: progress("features", i, n)) if progress else None,
    )
    seconds = {"features": elapsed(t0)}
    if cache.errors:
        log(
            f"{len(cache.errors)} of {len(cache)} images cannot be used and are left out; "
            f"the first: {next(iter(cache.errors.values()))}"
        )
    trainer = Trainer(model, cache, train_set, val_set, cfg, device)
    run = ckpt["pnv_train"]["run"] if ckpt is not None else f"{data_key}-{labels}-{utc_now()}"
    meta = {
        "init": start.init_record,
        "data_key": data_key,
        "labels": labels,
        "data": data.source,
        "device": device,
        "dinov2": dinov2,
        "run": run,
    }
    work.mkdir(parents=True, exist_ok=True)
    _begin(trainer, model, ckpt, meta, work, log)
    st = trainer.state
    while st.epoch < cfg.epochs and st.not_improved <= cfg.patience:
        _epoch(trainer, meta, work, progress, log)
    if st.not_improved > cfg.patience:
        log(f"no better validation score for {cfg.patience} epochs: stopped (the authors' patience)")
    seconds["train"] = round(sum(h.seconds for h in st.history), 2)

    # The best weights, with a WPCA fitted on the training database.
    t0 = time.perf_counter()
    wpca_images, fit = _save_best_with_wpca(trainer, model, cache, head, dinov2, work, run, out, progress)
    seconds["wpca"] = elapsed(t0)
    seconds["total"] = elapsed(t_start)
    meta_out = {
        "model": out.name,
        "family": "dinov2_vlad" if dinov2 else "netvlad_vgg16",
        "sha256": file_sha256(out),
        "dim": cfg.dims,
        "num_clusters": model.pool.num_clusters,
        "built": utc_now(),
        "trained": {
            "init": start.init_record,
            "data": data.source,
            "config": asdict(cfg),
            "best_epoch": st.best_epoch,
            "best_validation_recall_at_5": st.best_score,
            "epochs_run": st.epoch,
            "training_queries": len(trainer.train_set.queries),
            "validation_queries": len(trainer.val_set.queries),
            "seconds": seconds,
            "work_dir": str(work),
            "wpca": {"images": wpca_images, "samples": int(sum(v.shape[0] for v in fit.vecs))},
        },
    }
    write_text_atomic(metadata_path(out), json.dumps(meta_out, indent=2) + "\n")
    return TrainResult(out, work, st.history, st.best_epoch, seconds)
