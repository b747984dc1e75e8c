#!/usr/bin/env bash
# ROS 2 launch for the pip mode (scripts/setup.sh runs this; robots have it from their ROS 2 install).
# PyPI has no ROS 2 launch (its 'launch' is an unrelated 2017 package: never installed here), so this
#  1. installs upstream launch, launch_xml, launch_yaml (ros2/launch 3.7.1) and launch_ros (0.28.0)
#     from a source folder with pip --no-deps (their PyPI dependencies, osrf-pycommon and lark-parser,
#     come from requirements.txt);
#  2. builds composition_interfaces, which launch_ros imports, with scripts/build_interfaces.sh;
#  3. links the node executables into <venv>/lib/pnv_ros/, where launch_ros looks for them (colcon installs
#     them there, CMakeLists.txt; pip puts console scripts in bin/ only).
# launch finds packages through the ament index: run launch files with AMENT_PREFIX_PATH=<venv>.
# The sources stay outside this repository (about 1.1 MB, 170 Python files of upstream code, needed only
# where no ROS 2 is installed); the default is the shared folder beside the checkout, as CI has it.
#   scripts/install_launch.sh [SRC]   SRC: the sources (default $PNV_LAUNCH_SRC, else ../shared/ros/launch_src
#                                     beside this checkout); PNV_VENV: the venv (default .venv of this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath "${PNV_VENV:-$PWD/.venv}")
PYBIN=$VENV/bin/python
SRC=${1:-${PNV_LAUNCH_SRC:-../shared/ros/launch_src}}
PACKAGES=(launch launch_xml launch_yaml launch_ros)
EXECUTABLES=(loop_closure_node pose_graph_node)  # CMakeLists.txt's install(PROGRAMS scripts/... DESTINATION lib/pnv_ros)
for p in "${PACKAGES[@]}" composition_interfaces; do
  test -f "$SRC/$p/package.xml" || { echo "error: $SRC/$p/package.xml not found (PNV_LAUNCH_SRC names the sources)"; exit 1; }
done
# pip builds a local folder in place: copy the (possibly read-only) sources to build/ first.
STAGE=build/launch_src
rm -rf "$STAGE"
mkdir -p "$STAGE"
for p in "${PACKAGES[@]}"; do
  cp -r "$SRC/$p" "$STAGE/$p"
  chmod -R u+w "$STAGE/$p"
done
# setuptools warns at length about the upstream setup.py files (tests_require, licence classifiers):
# pip's output goes to a log, shown when pip fails.
"$PYBIN" -m pip install -q --no-deps --no-build-isolation "${PACKAGES[@]/#/$STAGE/}" > build/launch_pip.log 2>&1 \
  || { cat build/launch_pip.log; echo "error: pip install of ${PACKAGES[*]} failed (its messages above)"; exit 1; }
scripts/build_interfaces.sh "$SRC/composition_interfaces"
mkdir -p "$VENV/lib/pnv_ros"
for exe in "${EXECUTABLES[@]}"; do
  test -x "$VENV/bin/$exe" || { echo "error: $VENV/bin/$exe missing (pip install of pnv_ros first)"; exit 1; }
  ln -sfn "../../bin/$exe" "$VENV/lib/pnv_ros/$exe"
done
AMENT_PREFIX_PATH=$VENV "$PYBIN" - <<'EOF'
from importlib.metadata import version

import launch_ros, launch_xml, launch_yaml  # noqa: F401  (launch_ros imports composition_interfaces)
from ament_index_python.packages import get_package_prefix
from launch import LaunchService  # noqa: F401  (PyPI's unrelated 'launch' has none)
print(f"launch {version('launch')}, launch_ros {version('launch_ros')}: ok; pnv_ros in", get_package_prefix("pnv_ros"))
EOF
