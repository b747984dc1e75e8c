#!/usr/bin/env bash
# Build our .msg/.srv with the PyPI ROS 2 wheels into .venv (pip mode).
# The two traps of ../shared/ros/README.md: re-point the wheels' CMake files at
# this venv's Python, and install into the venv prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$PWD/.venv
PYBIN=$VENV/bin/python
PYINC=$($PYBIN -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NPINC=$($PYBIN -c "import numpy; print(numpy.get_include())")
PYVER=$($PYBIN -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
for f in $(grep -rl --include='*.cmake' '/opt/python/cp' "$VENV/share" || true); do
  sed -i -E "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python[0-9.]+#$PYINC#g; s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python[0-9.]+/site-packages/numpy/(_core|core)/include#$NPINC#g" "$f"
done
mkdir -p build
export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
cmake -S . -B build/ros -DCMAKE_INSTALL_PREFIX="$VENV" -DPython3_EXECUTABLE="$PYBIN" \
  -DPNV_INSTALL_PYTHON=OFF -DBUILD_TESTING=OFF -DCMAKE_BUILD_TYPE=Release > build/ros.log 2>&1 \
  || { tail -30 build/ros.log; exit 1; }
cmake --build build/ros -j2 >> build/ros.log 2>&1 || { tail -30 build/ros.log; exit 1; }
cmake --install build/ros >> build/ros.log 2>&1 || { tail -30 build/ros.log; exit 1; }
# The generated package's empty __init__.py would shadow ours: drop it; our
# pnv_ros/__init__.py extends its path to this folder.
SITE=$($PYBIN -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$SITE/pnv_ros/__init__.py"
$PYBIN -c "from pnv_ros.msg import LoopClosure; from pnv_ros.srv import QueryPlace; print('interfaces: ok')"
