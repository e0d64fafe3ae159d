"""List a run's checkpoints and what one of them holds, without loading any array.

  python tools/inspect_checkpoint.py WORKDIR [--step N] [--filter params/] [--sparsity]

Prints the complete steps (and any half-written temporary directories a crash left), then for one
step (default: the newest) every array's path, shape, dtype, how it was sharded when saved (mesh axes
per dimension) and its bytes, with totals for params, optimizer state and the whole checkpoint.
`--sparsity` also reads the params and prints the fraction of exact zeros of every matrix (each layer
of a scanned stack; the ones config.prune may prune), e.g. to check a pruned run.
"""

import glob
import math
import os
import sys

from absl import app, flags, logging
import jax
from flax import nnx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spjax.compress import prune  # noqa: E402
from spjax.convert import workdir as workdir_lib  # noqa: E402
from spjax.train import checkpoint  # noqa: E402

_STEP = flags.DEFINE_integer("step", None, "Step to describe; default the newest complete one.")
_FILTER = flags.DEFINE_string("filter", "", "Only arrays whose path starts with this.")
_SPARSITY = flags.DEFINE_bool("sparsity", False, "Also read the params: zeros per matrix.")



def _bits(dtype) -> int:
  """Bits per entry: int4/uint4 count as half a byte (packed on device) though numpy stores a byte."""
  dtype = np.dtype(dtype)
  return 4 if dtype.name in ("int4", "uint4", "float4_e2m1fn") else 8 * dtype.itemsize


def describe(workdir: str, step: int | None = None, prefix: str = "") -> str:
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=1, save_every_steps=1)
  steps = ckpt.all_steps()
  partial = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                   if not os.path.basename(p).isdigit())
  lines = [f"{workdir}/checkpoints: complete steps {', '.join(map(str, steps)) or 'none'}"]
  if partial:
    lines.append(f"  incomplete (ignored, removed at the next training start): {', '.join(partial)}")
  if not steps:
    return "\n".join(lines)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"step {step} has no complete checkpoint; complete steps: {steps}")

  rows, totals, mesh = [], {}, None
  for path, meta in jax.tree_util.tree_flatten_with_path(ckpt.metadata(step))[0]:
    name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
    if not name.startswith(prefix):
      continue
    nbytes = -(-math.prod(meta.shape) * _bits(meta.dtype) // 8)
    spec = getattr(meta.sharding, "partition_spec", None)
    if getattr(meta.sharding, "axis_names", None) is not None:
      mesh = dict(zip(meta.sharding.axis_names, map(int, meta.sharding.shape)))
    placed = "replicated" if not spec or not any(spec) else ",".join(
        "-" if s is None else "+".join(s) if isinstance(s, (list, tuple)) else s for s in spec)
    rows.append((name, str(tuple(meta.shape)), str(meta.dtype), placed, nbytes))
    group = name.split("/")[0]
    totals[group] = totals.get(group, 0) + nbytes
  ckpt.close()

  width = max(len(r[0]) for r in rows) if rows else 4
  saved_on = ", ".join(f"{a}={n}" for a, n in (mesh or {}).items() if n > 1) or "one device"
  lines.append(f"step {step} (saved on mesh {saved_on})")
  lines.append(f"  {'array':<{width}}  {'shape':<18} {'dtype':<9} {'sharding':<22} {'bytes':>14}")
  lines += [f"  {n:<{width}}  {s:<18} {d:<9} {p:<22} {b:>14,}" for n, s, d, p, b in rows]
  lines += [f"  total {group}: {b / 2**20:,.2f} MiB" for group, b in sorted(totals.items())]
  lines.append(f"  total: {sum(totals.values()) / 2**20:,.2f} MiB in {len(rows)} arrays")
  return "\n".join(lines)


def sparsity(workdir: str, step: int | None = None) -> str:
  """Fraction of exact zeros per prunable matrix (config.prune.exclude of the run) at `step`."""
  model, config = workdir_lib.load(workdir, step)
  exclude = config.prune.exclude if "prune" in config else prune.DEFAULT_EXCLUDE
  rows = prune.sparsity_report(nnx.state(model, nnx.Param), exclude)
  width = max(len(name) for name, *_ in rows)
  total = sum(f * n for _, f, n in rows) / sum(n for _, _, n in rows)
  return "\n".join([f"sparsity per matrix (exact zeros; excluded: {exclude!r})"] +
                   [f"  {name:<{width}}  {f:7.2%}" for name, f, _ in rows] +
                   [f"  all matrices: {total:.2%}"])


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: inspect_checkpoint.py WORKDIR [--step N] [--filter PREFIX]")
  logging.set_verbosity(logging.WARNING)  # Orbax narrates every file it opens at INFO
  try:
    print(describe(argv[1], _STEP.value, _FILTER.value))
    if _SPARSITY.value:
      print(sparsity(argv[1], _STEP.value))
  except (ValueError, FileNotFoundError) as e:
    print(f"inspect_checkpoint: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
