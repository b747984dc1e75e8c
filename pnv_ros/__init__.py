"""pnv_ros: Patch-NetVLAD visual loop closure (core library, no ROS imports).

The ROS 2 node lives in :mod:`pnv_ros.ros`; everything else here is plain
Python (torch, numpy, FAISS, OpenCV) and serves the node, the CLI and the
evaluator alike.
"""

__version__ = "0.1.0"
