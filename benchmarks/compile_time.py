"""Compile time of the spjax train step: 4 vs 32 layers, scanned (scan_layers=True) and unrolled.

Measures `prog.jit_train_step().lower(abstract_state, abstract_batch)` (trace + lower to StableHLO)
and `.compile()` (XLA) under `prog.activate()`, on shapes only: nothing is initialized or run. With
the layers scanned the step holds one copy of the block whatever the depth, so 32 layers should
compile about as fast as 4 (target: ratio <= 1.3); unrolled is the contrast, about linear in depth.

Every measurement starts from `jax.clear_caches()`; the four candidates are interleaved for
`--repeats` rounds (order flipped every round) so that the load of a shared machine hits them alike.
The table gives medians, the ratio of medians, and the median of per-round ratios (the two depths
compiled back to back share the load, so this is the steadier estimate and decides the target). The
size of the optimized HLO (instructions) is the noise-free part: scanned, it should not grow.

  python benchmarks/compile_time.py [--layout fsdp] [--repeats 3] [--json compile_time.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

# Simulated devices: XLA reads the flag once, when jax is first imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402

from configs import default  # noqa: E402
from spjax.train import program  # noqa: E402


def compile_seconds(layout: str, layers: int, scan: bool) -> tuple[float, float, int]:
  """(lower s, compile s, HLO instructions) of the train step of `configs/default.py:tiny`."""
  c = default.get_config("tiny")
  c.layout = layout
  c.model.num_layers, c.model.scan_layers = layers, scan
  prog = program.build(c)  # not timed: validation and abstract shapes, shared by every tool
  jax.clear_caches()  # no traced or compiled function survives from the previous candidate
  with prog.activate():
    step = prog.jit_train_step()
    t0 = time.perf_counter()
    lowered = step.lower(prog.abstract_state(), prog.abstract_batch())
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  return t1 - t0, t2 - t1, compiled.as_text().count(" = ")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layout", default="fsdp")
  p.add_argument("--layers", type=int, nargs=2, default=(4, 32), metavar=("FEW", "MANY"))
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no_unrolled", action="store_true", help="skip the (slow) unrolled contrast")
  p.add_argument("--json", help="write the results here")
  args = p.parse_args()

  few, many = args.layers
  scans = (True,) if args.no_unrolled else (True, False)
  candidates = [(scan, n) for scan in scans for n in (few, many)]
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}, layout {args.layout}, "
        f"model tiny (d_model 128) with {few} / {many} layers")
  runs = {cand: [] for cand in candidates}
  for r in range(args.repeats):
    for cand in candidates if r % 2 == 0 else candidates[::-1]:
      runs[cand].append(compile_seconds(args.layout, cand[1], cand[0]))
      lower_s, compile_s, _ = runs[cand][-1]
      print(f"  repeat {r}: scan={cand[0]!s:<5} layers={cand[1]:>2}: lower {lower_s:5.1f}s "
            f"compile {compile_s:5.1f}s", flush=True)

  def med(cand, i=None):
    return statistics.median(t[0] + t[1] if i is None else t[i] for t in runs[cand])

  print(f"\n{'':<9} {'layers':>6} {'HLO ops':>8} {'lower s':>8} {'compile s':>9} {'total s':>8}"
        f"   ratio {many}/{few}: of medians, per round")
  results = {}
  for scan in scans:
    ratio = med((scan, many)) / med((scan, few))
    round_ratio = statistics.median((a[0] + a[1]) / (b[0] + b[1])
                                    for a, b in zip(runs[(scan, many)], runs[(scan, few)]))
    for n in (few, many):
      print(f"{'scan' if scan else 'unrolled':<9} {n:>6} {runs[(scan, n)][0][2]:>8} "
            f"{med((scan, n), 0):>8.1f} {med((scan, n), 1):>9.1f} {med((scan, n)):>8.1f}" +
            (f"   {ratio:.2f}, {round_ratio:.2f}" if n == many else ""))
    per_depth = {str(n): {"lower_s": med((scan, n), 0), "compile_s": med((scan, n), 1),
                          "hlo_ops": runs[(scan, n)][0][2], "runs": runs[(scan, n)]}
                 for n in (few, many)}
    results["scan" if scan else "unrolled"] = {"ratio": ratio, "round_ratio": round_ratio,
                                               **per_depth}
  ratio = results["scan"]["round_ratio"]
  print(f"scanned {many}/{few} layers: {ratio:.2f} (target <= 1.3: "
        f"{'met' if ratio <= 1.3 else 'NOT met'})")

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"layout": args.layout, "layers": [few, many], "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
