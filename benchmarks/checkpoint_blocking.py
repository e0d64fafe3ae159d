"""How long a checkpoint save blocks the train loop: async (spjax's default) vs synchronous.

  python benchmarks/checkpoint_blocking.py [--size 125m] [--layout fsdp] [--repeats 3]

Both save the same train state (params + AdamW moments of the chosen size, sharded over 8 simulated
CPU devices) through spjax's Checkpointer. "Blocked" is the wall time from calling save() until the
loop may run its next step: for async, save() itself (device-to-host copy, then the write goes on in
a background thread); for sync, save() plus waiting until the files are committed. Saves alternate so
machine noise hits both alike; the ratio of medians is the result (target <= 0.10).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import logging  # noqa: E402

from configs import default  # noqa: E402
from spjax.train import checkpoint  # noqa: E402
from spjax.train import program  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="125m")
  parser.add_argument("--layout", default="fsdp")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  cfg = default.get_config(args.size)
  cfg.layout = args.layout
  prog = program.build(cfg)
  with prog.activate():
    state = prog.jit_init()()
  jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))

  blocked = {"async": [], "sync": []}
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = checkpoint.Checkpointer(tmp, max_to_keep=2, save_every_steps=1)
    step = 0
    for _ in range(args.repeats):
      for mode in ("async", "sync"):
        step += 1
        start = time.perf_counter()
        ckpt.save(step, state)
        if mode == "sync":
          ckpt.wait()
        blocked[mode].append(time.perf_counter() - start)
        ckpt.wait()  # the next measurement starts with an idle writer
    ckpt.close()

  a, s = statistics.median(blocked["async"]), statistics.median(blocked["sync"])
  print(f"state: {args.size} params + AdamW moments, {nbytes / 2**30:.2f} GiB, layout {args.layout}, "
        f"{len(jax.devices())} devices")
  print(f"{'mode':<6} {'blocked (median s)':>18}  runs")
  for mode, times in blocked.items():
    print(f"{mode:<6} {statistics.median(times):>18.3f}  {', '.join(f'{t:.3f}' for t in times)}")
  print(f"async / sync blocked-time ratio: {a / s:.3f} (target <= 0.10)")


if __name__ == "__main__":
  main()
