"""Where two compiled TPU steps differ, op by op, in the compiler's own cost model.

  python tools/hlo_diff.py A.hlo B.hlo [--chip=v5e] [--by=op|shape] [--top=30]

A and B are compiled HLO texts (`tools/aot_tpu.py --dump_hlo=FILE`, or
`benchmarks/maxtext_side_by_side.py --hlo_dir=DIR` for spjax's and MaxText's steps). Each op's
`estimated_cycles` is summed over what one step executes (loops by their trip counts, a
conditional's costliest branch: spjax.parallel.hlo.cycle_sum), bucketed by the JAX operation the
op came from (`--by=op`: "backward: dot_general") or by that and its output shape (`--by=shape`,
so the same matmul in both programs can be set side by side), and the buckets printed in order of
how much they differ, in milliseconds at the chip's clock. Pallas kernels have no cycles and are
not in these sums (tools/aot_tpu.py charges them separately).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aot_tpu  # noqa: E402  (its CHIPS: each chip's clock)
from spjax.parallel import hlo  # noqa: E402

_CHIP = flags.DEFINE_enum("chip", "v5e", list(aot_tpu.CHIPS), "The chip both were compiled for.")
_BY = flags.DEFINE_enum("by", "op", ["op", "shape"], "Bucket by JAX operation, or by it and "
                                                      "the op's output shape.")
_TOP = flags.DEFINE_integer("top", 30, "Buckets to print.")


def diff(text_a: str, text_b: str, by: str, clock: float) -> list[tuple]:
  """[(bucket, ms in A, executions in A, ms in B, executions in B)], the largest |B - A| first."""
  key = hlo.op_and_shape if by == "shape" else None
  a, b = hlo.cycle_sum(text_a, key), hlo.cycle_sum(text_b, key)
  rows = [(k, a.cycles.get(k, 0) / clock * 1e3, a.executions.get(k, 0),
           b.cycles.get(k, 0) / clock * 1e3, b.executions.get(k, 0))
          for k in set(a.cycles) | set(b.cycles)]
  return sorted(rows, key=lambda r: -abs(r[3] - r[1]))


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("takes two HLO files: A.hlo B.hlo")
  texts = []
  for path in argv[1:]:
    if not os.path.isfile(path):
      raise app.UsageError(f"no such HLO file: {path}")
    texts.append(open(path).read())
  clock = aot_tpu.CHIPS[_CHIP.value]["clock"]
  rows = diff(*texts, _BY.value, clock)
  total = lambda i: sum(r[i] for r in rows)
  print(f"A = {argv[1]}: {total(1):.1f} ms;  B = {argv[2]}: {total(3):.1f} ms  "
        f"(B - A {total(3) - total(1):+.1f} ms)")
  print(f"{'A ms':>9} {'n':>5} {'B ms':>9} {'n':>5} {'B - A':>8}  bucket")
  for k, ma, ca, mb, cb in rows[:_TOP.value]:
    print(f"{ma:9.2f} {ca:5d} {mb:9.2f} {cb:5d} {mb - ma:+8.2f}  {k}")


if __name__ == "__main__":
  app.run(main)
