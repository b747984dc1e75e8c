#!/usr/bin/env bash
# Every measurement quoted in the README, in one go (about 50 minutes on 2 cores).
# Run on a quiet machine: timings are compared side by side within each script.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/bench}
mkdir -p "$OUT"
PY=.venv/bin/python
STEPS=${STEPS:-123456789}  # e.g. STEPS=345 to skip the timing steps
step() { [[ $STEPS == *$1* ]]; }
if step 1; then
echo "== 1. side by side with the reference (extraction, re-ranking, floors, memory)"
$PY benchmarks/compare_reference.py --out "$OUT/compare_reference.json"
$PY benchmarks/authors_workflow.py --db data/corridor_vprbench/ref --queries data/corridor_vprbench/query \
  --n-db 100 --n-queries 5 --preset speed --out "$OUT/authors_workflow.json"
fi
if step 2; then
echo "== 2. pnv bench"
for p in speed performance; do
  .venv/bin/pnv bench -q --preset $p --top-n 100 --out "$OUT/bench_$p.json" data/rtabmap_samples_loop84/images/{1,20,41,60}.jpg
done
fi
if step 3; then
echo "== 3. sequences through the detector (pnv bag make + pnv eval)"
$PY benchmarks/sequence_sets.py --data "$DATA" --out "$OUT/sequences"
for s in rtabmap_loop84 corridor gardenspoint10; do
  [ -d "$OUT/sequences/$s" ] || continue
  rm -rf "$OUT/sequences/$s/bag" "$OUT/runs/$s"
  .venv/bin/pnv bag make "$OUT/sequences/$s/images" --out "$OUT/sequences/$s/bag"
  .venv/bin/pnv eval -q "$OUT/sequences/$s/bag" --gt "$OUT/sequences/$s/gt.npy" --out "$OUT/runs/$s"
done
fi
if step 4; then
echo "== 4. default model recall on the shared sets"
$PY benchmarks/eval_default_model.py --data "$DATA" --out "$OUT/default_model_recall.json"
fi
if step 5; then
echo "== 5. map scale"
$PY benchmarks/scale_index.py --sizes 10000,100000,1000000 --out "$OUT/scale"
fi
if step 6; then
echo "== 6. reduced-cost modes"
$PY benchmarks/reduced_cost.py --data "$DATA" --out "$OUT/reduced_cost.json"
fi
if step 7; then
echo "== 7. model families: VGG-16 default vs dinov2_vlad (recall, sequences, cost; writes docs/results/model_families.*)"
.venv/bin/pnv models build dinov2_vlad -q  # no-op when present
$PY benchmarks/model_families.py --data "$DATA" --out "$OUT/model_families"
fi
if step 8; then
echo "== 8. loop poses on TUM fr1/desk: patch centres (before) vs local features, with and without depth (docs/results/loop_poses.*)"
$PY benchmarks/loop_poses.py --data "$DATA/tum_rgbd_fr1_desk" --calibrate --radii 24,48,96,160
fi
if step 9; then
echo "== 9. closing the loop on TUM fr1/desk: drifted odometry, live loop_closure_node + pose_graph_node, ATE before/after (docs/results/closing_the_loop/)"
T="$DATA/tum_rgbd_fr1_desk"
# --node starts rclpy processes: loopback-only DDS and a domain of their own (on a robot, your own DDS setup)
export FASTDDS_DEFAULT_PROFILES_FILE=${FASTDDS_DEFAULT_PROFILES_FILE:-$PWD/test/fastdds_loopback.xml}
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-93}
rm -rf "$OUT/fr1_desk.bag" "$OUT/runs/fr1_desk_node" "$OUT/runs/fr1_desk"
.venv/bin/pnv bag make "$T" --tum --camera "$T/camera.yaml" --poses "$T/groundtruth_at_rgb.txt" --drift --compressed --out "$OUT/fr1_desk.bag"
for mode in "" --node; do
  .venv/bin/pnv eval -q "$OUT/fr1_desk.bag" --gt-poses "$T/groundtruth_at_rgb.txt" --gt-radius 1.0 --gt-min-gap 8 \
    --min-travel-m 0.15 --min-rotation-rad 0.15 $mode --out "$OUT/runs/fr1_desk${mode:+_node}"
done
mkdir -p docs/results/closing_the_loop
cp "$OUT/runs/fr1_desk_node/trajectory.png" docs/results/closing_the_loop/trajectory.png
for m in "" _node; do cp "$OUT/runs/fr1_desk$m/metrics.json" "docs/results/closing_the_loop/metrics${m:-_in_process}.json"; done
$PY benchmarks/pose_graph_fr1_desk.py --data "$T"  # the backend alone on all 69 ground-truth revisits
fi
