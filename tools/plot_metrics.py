"""Plot one or more runs' metrics into a PNG (several runs: one figure, to compare them).

  python tools/plot_metrics.py WORKDIR [WORKDIR ...] --out=FILE.png [--labels=a,b]

Train and eval loss (per domain when the run has several), learning rate, tokens/s and MFU, against
optimizer steps and against training tokens (spjax/train/plots.py). Needs matplotlib
(`pip install 'spjax[plot]'`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

from spjax.train import plots  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workdirs", nargs="+", help="run directories (each with a metrics.jsonl)")
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("--labels", default="", help="comma-separated names; default: directory names")
  args = p.parse_args(argv)
  labels = args.labels.split(",") if args.labels else None
  try:
    plots.require()
    if labels and len(labels) != len(args.workdirs):
      raise ValueError(f"--labels has {len(labels)} names for {len(args.workdirs)} run(s)")
    print(plots.plot(args.workdirs, args.out, labels))
  except ValueError as e:
    print(f"plot_metrics: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
