"""``python -m pnv_ros.cli``: the ``pnv`` command."""

import os
import sys

from pnv_ros.cli import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
sys.exit(main())
