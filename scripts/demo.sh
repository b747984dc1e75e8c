#!/usr/bin/env bash
# The main job on the built-in default: the RTAB-Map loop (frames 1-40 are the
# database, 41-84 revisit them), two-stage retrieval with ground truth, and a
# match picture of one loop closure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-out/demo}
mkdir -p "$OUT/db" "$OUT/q"
IMG=data/rtabmap_samples_loop84/images
for i in $(seq 1 40); do ln -sf "$PWD/$IMG/$i.jpg" "$OUT/db/$i.jpg"; done
for i in $(seq 41 84); do ln -sf "$PWD/$IMG/$i.jpg" "$OUT/q/$i.jpg"; done
.venv/bin/pnv extract --preset speed --out "$OUT/db.npz" "$OUT/db"
.venv/bin/pnv extract --preset speed --out "$OUT/q.npz" "$OUT/q"
.venv/bin/pnv match --db "$OUT/db.npz" --queries "$OUT/q.npz" --top-n 40 \
  --gt data/rtabmap_samples_loop84/gt.csv --out "$OUT/result.json"
.venv/bin/pnv match-two "$IMG/60.jpg" "$IMG/20.jpg" --out "$OUT/match_60_20.png"
echo "demo outputs in $OUT"
