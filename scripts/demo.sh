#!/usr/bin/env bash
# The main job on the built-in default: the RTAB-Map loop replayed as a ROS 2
# bag through the live loop-closure node (see scripts/demo_node.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/demo_node.py
