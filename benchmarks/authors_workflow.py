"""End to end against the authors' own workflow, same checkpoint and images:
their feature_extract.py (features to one .npy per image and patch size) and
feature_match.py (reads them back per candidate, re-ranks the top 100), versus
`pnv extract` + `pnv match`. Time per query = query extraction + matching,
divided by the number of queries (the database is extracted beforehand by
both, and timed separately). Also compares the re-ranked orders.

    .venv/bin/python benchmarks/authors_workflow.py --db data/corridor_vprbench/ref --queries data/corridor_vprbench/query \
        --n-db 100 --n-queries 10 --preset speed --out out/bench/authors_workflow.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
# Their get_backend() asks torchvision for ImageNet VGG-16 weights (a download);
# the checkpoint then overwrites every encoder weight, so build it without them.
OFFLINE = (
    "import sys, runpy, torchvision.models as m; _v = m.vgg16; "
    "m.vgg16 = lambda *a, **k: _v(weights=None); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _run(cmd: list[str], cwd: Path | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def _parse_args() -> argparse.Namespace:
    """The command line: image folders, how many of each, preset, checkpoint, output JSON, --keep."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--n-db", type=int, default=100)
    ap.add_argument("--n-queries", type=int, default=10)
    ap.add_argument("--preset", default="speed", choices=["speed", "performance"])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (both sides' features and results)")
    return ap.parse_args()


def _write_reference_inputs(work: Path, ckpt: Path, ini_template: str, db: list[Path], qs: list[Path]) -> str:
    """Write what the authors' scripts read into ``work``: the checkpoint as
    ``<resumepath><num_pcs>.pth.tar`` (a symlink), their preset's config ``ini_template``
    pointed at it (512 PCs, Recall@N up to the database size, at most 100) and the image
    list files ``db.txt`` / ``q.txt``. Returns the config file's path."""
    # Their scripts want "<resumepath><num_pcs>.pth.tar" and image list files.
    (work / "model512.pth.tar").symlink_to(ckpt.resolve())
    ini = ini_template.replace("resumepath = ./pretrained_models/mapillary_WPCA", f"resumepath = {work}/model")
    ini = ini.replace("num_pcs = 4096", "num_pcs = 512")
    ini = ini.replace("n_values_all = 1,5,10,20,50,100", f"n_values_all = 1,5,10,20,50,{min(100, len(db))}")
    (work / "cfg.ini").write_text(ini)
    (work / "db.txt").write_text("\n".join(str(p.resolve()) for p in db) + "\n")
    (work / "q.txt").write_text("\n".join(str(p.resolve()) for p in qs) + "\n")
    return str(work / "cfg.ini")


def _run_reference(work: Path, cfg: str) -> dict[str, float]:
    """Run the authors' feature_extract.py (database, then queries) and feature_match.py on CPU
    with config ``cfg``; features and results go under ``work``. Returns their wall times (s):
    db_extract_s, query_extract_s, match_s, and disk_bytes_db (bytes of the database's features)."""

    def authors(script: str, *args: str, cwd: Path | None = None) -> float:
        return _run(
            [str(BIN / "python"), "-c", OFFLINE, str(BIN / script), "--config_path", cfg, *args, "--nocuda"],
            cwd=cwd,
        )

    ref = {}
    for side, listing, feats in (("db", "db.txt", "ref_db"), ("query", "q.txt", "ref_q")):
        ref[f"{side}_extract_s"] = authors(
            "feature_extract.py",
            "--dataset_file_path",
            str(work / listing),
            "--output_features_dir",
            str(work / feats),
        )
    ref["match_s"] = authors(
        "feature_match.py",
        "--query_file_path",
        str(work / "q.txt"),
        "--index_file_path",
        str(work / "db.txt"),
        "--query_input_features_dir",
        str(work / "ref_q"),
        "--index_input_features_dir",
        str(work / "ref_db"),
        "--result_save_folder",
        str(work / "ref_res"),
        cwd=work,
    )
    ref["disk_bytes_db"] = sum(f.stat().st_size for f in (work / "ref_db").iterdir())
    return ref


def _run_ours(work: Path, ckpt: Path, preset: str, db: list[Path], qs: list[Path]) -> dict[str, float]:
    """Run `pnv extract` on the database and query images (symlinked into folders under ``work``)
    and `pnv match` re-ranking the top min(100, database size) into ``work/r.json``. Returns
    the wall times (s) as `_run_reference` does, and disk_bytes_db (bytes of db.npz)."""
    ours = {}
    pnv = str(BIN / "pnv")
    for side, images, folder, out in (("db", db, "dbdir", "db.npz"), ("query", qs, "qdir", "q.npz")):
        (work / folder).mkdir()
        for p in images:
            (work / folder / p.name).symlink_to(p.resolve())
        ours[f"{side}_extract_s"] = _run(
            [
                pnv,
                "extract",
                "-q",
                "--checkpoint",
                str(ckpt),
                "--preset",
                preset,
                "--out",
                str(work / out),
                str(work / folder),
            ]
        )
    ours["match_s"] = _run(
        [
            pnv,
            "match",
            "-q",
            "--db",
            str(work / "db.npz"),
            "--queries",
            str(work / "q.npz"),
            "--top-n",
            str(min(100, len(db))),
            "--out",
            str(work / "r.json"),
        ]
    )
    ours["disk_bytes_db"] = (work / "db.npz").stat().st_size
    return ours


def _reference_orders(predictions: Path) -> dict[str, list[str]]:
    """The authors' re-ranked database order per query (image stems), from their
    ``PatchNetVLAD_predictions.txt`` (``query, database image`` lines; ``#`` lines are comments)."""
    lines = [ln.strip() for ln in predictions.read_text().splitlines() if not ln.startswith("#")]
    ref_order: dict[str, list[str]] = {}
    for ln in lines:
        q, d = (s.strip() for s in ln.split(","))
        ref_order.setdefault(Path(q).stem, []).append(Path(d).stem)
    return ref_order


def _order_partings(res: list[dict], ref_order: dict[str, list[str]]) -> list[dict]:
    """Per query whose re-ranked order differs from the reference's: the rank of the first
    difference, both sides' two images from there, and our fused scores there (near-equal = a tie)."""
    partings = []
    for r in res:
        o, t = r["reranked"], ref_order[r["query"]]
        k = next((i for i, (x, y) in enumerate(zip(o, t)) if x != y), None)
        if k is not None:
            sc = r.get("scores") or []
            partings.append(
                {
                    "query": r["query"],
                    "rank": k,
                    "ours": o[k : k + 2],
                    "reference": t[k : k + 2],
                    "our_scores": sc[k : k + 2],
                }
            )
    return partings


def _compare(work: Path, preset: str, n_db: int, n_queries: int, ref: dict, ours: dict) -> dict[str, Any]:
    """The report: both sides' times, per-query time (query extraction + matching, s) and speed-ups,
    and how many queries have the same re-ranked top-1 / top-10 / full order as the authors'."""
    ref_order = _reference_orders(work / "ref_res" / "PatchNetVLAD_predictions.txt")
    res = json.loads((work / "r.json").read_text())["queries"]
    per_q = {k: (v["query_extract_s"] + v["match_s"]) / n_queries for k, v in (("reference", ref), ("ours", ours))}
    return {
        "preset": preset,
        "n_db": n_db,
        "n_queries": n_queries,
        "reference": ref,
        "ours": ours,
        "per_query_s": per_q,
        "speedup_per_query": per_q["reference"] / per_q["ours"],
        "db_extract_speedup": ref["db_extract_s"] / ours["db_extract_s"],
        "same_top1": sum(r["reranked"][0] == ref_order[r["query"]][0] for r in res),
        "same_top10": sum(r["reranked"][:10] == ref_order[r["query"]][:10] for r in res),
        "same_full_order": sum(r["reranked"] == ref_order[r["query"]] for r in res),
        # Where the orders part: rank of the first difference and our fused scores there (near-equal = a tie).
        "order_partings": _order_partings(res, ref_order),
    }


def _print_report(report: dict[str, Any]) -> None:
    """Print the comparison's one-line summary and, per query whose order parts, where."""
    per_q, ref, ours, n = report["per_query_s"], report["reference"], report["ours"], report["n_queries"]
    print(
        f"[{report['preset']}] per query (extract + re-rank top {min(100, report['n_db'])}): authors' scripts "
        f"{per_q['reference']:.2f} s, pnv {per_q['ours']:.2f} s -> {report['speedup_per_query']:.2f}x; database "
        f"extraction {ref['db_extract_s']:.0f} s vs {ours['db_extract_s']:.0f} s; disk "
        f"{ref['disk_bytes_db'] / 1e6:.0f} MB vs {ours['disk_bytes_db'] / 1e6:.0f} MB; same top-1 "
        f"{report['same_top1']}/{n}, same top-10 {report['same_top10']}/{n}, same full order "
        f"{report['same_full_order']}/{n}"
    )
    for p in report["order_partings"]:
        print(
            f"  query {p['query']}: orders part at rank {p['rank']}: ours {p['ours']} (fused {p['our_scores']}), "
            f"reference {p['reference']}"
        )


def main() -> None:
    """Run both workflows on the first --n-db / --n-queries images in a temporary work folder,
    print the comparison and write it as JSON to --out (if given)."""
    a = _parse_args()
    import patchnetvlad

    from pnv_ros.images import list_images
    from pnv_ros.model.registry import resolve_checkpoint

    ckpt = resolve_checkpoint(a.checkpoint)
    db = list_images([a.db])[: a.n_db]
    qs = list_images([a.queries])[: a.n_queries]
    work = Path(tempfile.mkdtemp(prefix="pnv_authors_"))
    try:
        ini = (Path(patchnetvlad.__file__).parent / "configs" / f"{a.preset}.ini").read_text()
        cfg = _write_reference_inputs(work, ckpt, ini, db, qs)
        ref = _run_reference(work, cfg)
        ours = _run_ours(work, ckpt, a.preset, db, qs)
        report = _compare(work, a.preset, len(db), len(qs), ref, ours)
        _print_report(report)
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=1))
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
