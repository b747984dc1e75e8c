"""Adapting the default model to one environment with ``pnv train`` (CPU mode), measured on held-out places.

Split of the corridor set (VPR-Bench; 111 places, two traversals, positives |i - j| <= 2):
- training data: places 0..TRAIN_END-1 of both traversals (``pnv train --pairs``); pnv train keeps its last
  25% of those queries as validation places (checkpoint selection) and trains on the rest;
- test: the query images of places TEST_START..110, never seen in training or validation, against the whole
  reference traversal (111 images) as the map; and the same places replayed as one sequence (reference pass,
  then query pass) through ``pnv eval`` for the sequence metrics.
The default model's k-means vocabulary and WPCA were fitted on all corridor images (its build set); the
adapted model's NetVLAD weights were trained on places 0..TRAIN_END-1 only, and its WPCA refitted on them.

Runs each learning rate in ``--lrs`` (the authors' 1e-4 first) and reports all; the README quotes the run
whose validation Recall@5 was best (chosen on validation places, not on the test places).

    .venv/bin/python benchmarks/adapt.py --out docs/results/adapt.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, write_md

CORRIDOR = REPO / "data" / "corridor_vprbench"
PLACES, TRAIN_END, TEST_START, TOL = 111, 88, 88, 2


def split(work: Path) -> tuple[Path, Path]:
    """train/{ref,query} (symlinks) + gt.npy; the held-out sequence folder with its GT matrix."""
    tr = work / "train"
    for part in ("ref", "query"):
        (tr / part).mkdir(parents=True, exist_ok=True)
        for i in range(TRAIN_END):
            link = tr / part / f"{i:07d}.jpg"
            if not link.exists():
                link.symlink_to(CORRIDOR / part / f"{i:07d}.jpg")
    i = np.arange(TRAIN_END)
    np.save(tr / "gt.npy", (np.abs(i[:, None] - i[None]) <= TOL).astype(np.uint8))
    seq = work / "heldout_sequence"
    seq.mkdir(exist_ok=True)
    test = list(range(TEST_START, PLACES))
    n = len(test)
    for k, place in enumerate(test):
        for part, off in (("ref", 0), ("query", n)):
            link = seq / f"{off + k:04d}.jpg"
            if not link.exists():
                link.symlink_to(CORRIDOR / part / f"{place:07d}.jpg")
    g = np.zeros((2 * n, 2 * n), dtype=np.uint8)
    for k in range(n):
        for j in range(max(0, k - TOL), min(n, k + TOL + 1)):
            g[n + k, j] = 1
    np.save(work / "heldout_gt.npy", g)
    return tr, seq


def retrieval(checkpoint: Path) -> dict:
    """Global and re-ranked (speed preset: rapid spatial scoring) Recall@1/5 of the held-out queries."""
    from pnv_ros.config import get_preset
    from pnv_ros.engines.spec import RuntimeSpec
    from pnv_ros.eval.ground_truth import load_ground_truth, recall_at_n
    from pnv_ros.extract import open_extractor
    from pnv_ros.images import list_images
    from pnv_ros.retrieval import two_stage

    ex = open_extractor(checkpoint, "speed", RuntimeSpec(device="cpu"))
    db = ex.extract_set(list_images([CORRIDOR / "ref"]), progress=True)
    q = ex.extract_set(list_images([CORRIDOR / "query"])[TEST_START:], progress=True)
    gt = load_ground_truth(CORRIDOR / "gt.csv", q.names, db.names)
    res = two_stage(db, q, get_preset("speed"), top_n=100, matcher="rapid")
    return {
        "queries": len(q),
        "db": len(db),
        "global": recall_at_n([r.global_ids for r in res], gt, (1, 5)),
        "reranked": recall_at_n([r.reranked_ids for r in res], gt, (1, 5)),
    }


def sequence(checkpoint: Path, bag: Path, gt: Path, out: Path) -> dict:
    """pnv eval over the held-out sequence bag: precision, recall, AP, recall at 100% precision. Every frame is a
    keyframe (``--min-visual-change 0``: the 160 x 120 corridor frames change too little for the default
    keyframe rule, which would keep 3 of 46)."""
    env = {**os.environ, "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "test" / "fastdds_loopback.xml")}
    cmd = [
        sys.executable,
        "-m",
        "pnv_ros.cli",
        "eval",
        str(bag),
        "--gt",
        str(gt),
        "--out",
        str(out),
        "--force",
        "--checkpoint",
        str(checkpoint),
        "--exclude-recent",
        "10",
        "--exclude-recent-keyframes",
        "5",
        "--min-visual-change",
        "0",
        "-q",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    m = json.loads((out / "metrics.json").read_text())
    at = m["at_threshold"]
    return {
        "threshold": m["threshold"],
        "precision": at["precision"],
        "recall": at["recall"],
        "f1": at["f1"],
        "average_precision": m["average_precision"],
        "recall_at_100_precision": m["recall_at_100_precision"],
    }


def default_path() -> Path:
    from pnv_ros.model.registry import default_checkpoint_path

    return default_checkpoint_path()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "adapt.json"))
    ap.add_argument("--work", default="/tmp/pnv_adapt")
    ap.add_argument("--lrs", default="1e-4,1e-2", help="learning rates to train with (comma-separated)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--render", action="store_true", help="only write OUT's Markdown table from OUT")
    ap.add_argument("--sequence-only", action="store_true", help="redo only the sequence metrics of a finished run")
    ap.add_argument(
        "--append",
        action="store_true",
        help="add runs (--lrs, --epochs) to OUT's, without evaluating the default model again",
    )
    a = ap.parse_args()
    if a.render:
        render(Path(a.out))
        return
    if a.sequence_only:  # the sequence metrics again, for the models a finished run left in --work
        work, rows = Path(a.work), json.loads(Path(a.out).read_text())
        rows["default"]["sequence"] = sequence(
            default_path(), work / "heldout.bag", work / "heldout_gt.npy", work / "eval_default"
        )
        for r in rows["runs"]:
            tag = f"lr{r['lr']:g}_e{r.get('epochs', 30)}"
            r["sequence"] = sequence(
                work / f"adapted_{tag}.pth.tar", work / "heldout.bag", work / "heldout_gt.npy", work / f"eval_{tag}"
            )
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
        render(Path(a.out))
        return
    from pnv_ros.bags import make_bag
    from pnv_ros.model.registry import default_checkpoint_path
    from pnv_ros.training.datasets import from_pairs
    from pnv_ros.training.trainer import TrainConfig, train_model

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tr, seq = split(work)
    bag = work / "heldout.bag"
    if not bag.exists():
        make_bag(seq, bag, rate=1.0)
    default = default_checkpoint_path()
    rows = {
        "split": {
            "train_places": [0, TRAIN_END - 1],
            "validation": "last 25% of the training queries",
            "test_places": [TEST_START, PLACES - 1],
            "map": "all 111 reference images",
        },
        "machine": f"{os.cpu_count()} CPU cores",
        "runs": [],
    }
    if a.append:
        rows = json.loads(Path(a.out).read_text())
    else:
        t0 = time.perf_counter()
        rows["default"] = {
            "retrieval": retrieval(default),
            "sequence": sequence(default, bag, work / "heldout_gt.npy", work / "eval_default"),
        }
        rows["default"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rows["default"]))
    data = from_pairs(tr / "ref", tr / "query", tr / "gt.npy")
    for lr in [float(x) for x in a.lrs.split(",")]:
        out = work / f"adapted_lr{lr:g}_e{a.epochs}.pth.tar"
        res = train_model(
            data,
            out,
            init=default,
            config=TrainConfig(lr=lr, epochs=a.epochs, holdout=0.25),
            cache_dir=work / "cache",
            work_dir=work / f"run_lr{lr:g}_e{a.epochs}",
            force=True,
        )
        per_epoch = [h.seconds for h in res.history if h.epoch > 0]
        row = {
            "lr": lr,
            "epochs": a.epochs,
            "epochs_run": res.history[-1].epoch,
            "best_epoch": res.best_epoch,
            "validation_recall": {h.epoch: h.recalls for h in res.history},
            "loss": {h.epoch: h.loss for h in res.history if h.loss is not None},
            "seconds": res.seconds,
            "seconds_per_epoch_median": float(np.median(per_epoch)) if per_epoch else None,
            "training_images": len(data.images),
            "retrieval": retrieval(out),
            "sequence": sequence(out, bag, work / "heldout_gt.npy", work / f"eval_lr{lr:g}_e{a.epochs}"),
        }
        print(json.dumps({k: row[k] for k in ("lr", "best_epoch", "retrieval", "sequence", "seconds")}))
        if a.epochs:  # the run's loss and validation curves beside the table
            shutil.copy(res.work_dir / "training.png", Path(a.out).with_name(f"adapt_training_lr{lr:g}.png"))
        rows["runs"].append(row)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    render(Path(a.out))


def render(path: Path) -> None:
    """The JSON's table as Markdown beside it (NAME.md)."""
    rows = json.loads(path.read_text())
    sp = rows["split"]
    lines = [
        "# Adapting the default model to the corridor (`benchmarks/adapt.py`)",
        "",
        f"Training places {sp['train_places'][0]}-{sp['train_places'][1]} of both traversals ({sp['validation']} "
        f"for checkpoint selection); test: query places {sp['test_places'][0]}-{sp['test_places'][1]} (never "
        f"trained on) against {sp['map']}; sequence: the test places' reference pass then query pass through "
        f"`pnv eval` (speed preset). {rows['machine']}.",
        "",
        "| model | lr | best epoch / run | global R@1 | R@5 | re-ranked R@1 | R@5 | seq. precision | recall | AP "
        "| R@100%P | features s | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def line(name: str, r: dict, lr: str, epochs: str, feats: str, per_epoch: str) -> str:
        g, rr, q = r["retrieval"]["global"], r["retrieval"]["reranked"], r["sequence"]
        return (
            f"| {name} | {lr} | {epochs} | {g['1']:.3f} | {g['5']:.3f} | {rr['1']:.3f} | {rr['5']:.3f} | "
            f"{q['precision']:.3f} | {q['recall']:.3f} | {q['average_precision']:.3f} | "
            f"{q['recall_at_100_precision']:.3f} | {feats} | {per_epoch} |"
        )

    lines.append(line("default", rows["default"], "-", "-", "-", "-"))
    for r in rows["runs"]:
        name = "control: WPCA refitted, no training" if r.get("epochs", 1) == 0 else "adapted (netvlad layer)"
        lines.append(
            line(
                name,
                r,
                f"{r['lr']:g}",
                f"{r['best_epoch']} / {r['epochs_run']}",
                f"{r['seconds']['features']:.0f}" if r["seconds"]["features"] >= 1 else "cached",
                f"{r['seconds_per_epoch_median']:.1f}" if r["seconds_per_epoch_median"] else "-",
            )
        )
    n = rows["runs"][0]["training_images"] if rows["runs"] else 0
    lines += [
        "",
        f"{n} training images (features cached once, then every run reuses them). Per-epoch "
        f"validation recall and loss are in `{path.name}`.",
        "",
    ]
    write_md(path.with_suffix(".md"), lines)


if __name__ == "__main__":
    main()
