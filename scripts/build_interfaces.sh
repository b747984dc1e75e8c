#!/usr/bin/env bash
# Build ROS 2 interfaces (.msg/.srv) with the PyPI ROS 2 wheels into the venv (pip mode).
#   scripts/build_interfaces.sh          ours: msg/ and srv/ of this checkout (package pnv_ros)
#   scripts/build_interfaces.sh DIR      another rosidl package's source folder (one with CMakeLists.txt and
#                                        package.xml; scripts/install_launch.sh builds composition_interfaces)
# PNV_VENV names the venv (default: .venv of this checkout). The source folder may be read-only:
# the build goes to build/ros (ours) or build/ros-<package> (DIR).
# The two traps of ../shared/ros/README.md: re-point the wheels' CMake files at
# this venv's Python, and install into the venv prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath "${PNV_VENV:-$PWD/.venv}")
PYBIN=$VENV/bin/python
if [ $# -eq 0 ]; then
  SRC=$PWD NAME=pnv_ros BUILD=build/ros
  EXTRA=(-DPNV_INSTALL_PYTHON=OFF)
else
  SRC=$(realpath "$1")
  test -f "$SRC/CMakeLists.txt" -a -f "$SRC/package.xml" || { echo "error: $1 is not a ROS package source folder"; exit 1; }
  NAME=$(sed -n 's#.*<name>\(.*\)</name>.*#\1#p' "$SRC/package.xml" | head -1)
  BUILD=build/ros-$NAME
  EXTRA=()
fi
PYINC=$($PYBIN -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NPINC=$($PYBIN -c "import numpy; print(numpy.get_include())")
for f in $(grep -rl --include='*.cmake' '/opt/python/cp' "$VENV/share" || true); do
  sed -i -E "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python[0-9.]+#$PYINC#g; s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python[0-9.]+/site-packages/numpy/(_core|core)/include#$NPINC#g" "$f"
done
mkdir -p build
LOG=$BUILD.log
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
cmake -S "$SRC" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PYBIN" \
  "${EXTRA[@]}" -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release > "$LOG" 2>&1 \
  || { tail -30 "$LOG"; exit 1; }
cmake --build "$BUILD" -j2 >> "$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
cmake --install "$BUILD" >> "$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
if [ "$NAME" = pnv_ros ]; then
  # The generated package's empty __init__.py would shadow ours: drop it; our
  # pnv_ros/__init__.py extends its path to this folder.
  SITE=$($PYBIN -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -f "$SITE/pnv_ros/__init__.py"
  $PYBIN -c "from pnv_ros.msg import LoopClosure; from pnv_ros.srv import QueryPlace; print('interfaces: ok')"
else
  for kind in msg srv; do
    [ ! -d "$SRC/$kind" ] || $PYBIN -c "import $NAME.$kind"
  done
  echo "interfaces $NAME: ok"
fi
