"""pip mode: the ROS-free library and the pnv CLI (ROS users build with colcon)."""

from setuptools import setup

setup()
