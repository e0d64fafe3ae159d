"""Merge checkpoints of one architecture: the same command as the installed `spjax-merge`.

  python tools/merge.py --method=uniform|weighted|greedy|task_arithmetic|slerp --out=DIR INPUT ...

See spjax/compress/merge.py for the methods and their flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax.compress import merge  # noqa: E402

if __name__ == "__main__":
  merge.run()
