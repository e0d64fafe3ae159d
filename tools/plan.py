"""Find the fastest run configuration that fits a TPU topology, by compiling candidates on this CPU.

  python tools/plan.py --config=configs/default.py:1b --topology=v5e:4x4 [--num_slices=2] \
      [--layouts=fsdp,fsdp_tp] [--remat=full,save_dots_no_batch] [--batches=4,8] \
      [--scan=true,false] [--loss_chunk=0,512] [--out=planned.py] [--cache_dir=DIR] [--config.key=v]

Searches layout presets x remat policy x (per-chip batch, accumulation) x scanned layers x loss
chunk. The tokens per optimizer step stay the config's (per_device_batch_size x grad_accum_steps
sequences per chip): each per-chip batch b in --batches that divides them runs with that total / b
accumulation steps. Candidates a shape-only estimate (spjax.parallel.footprint.step_bytes) puts
above --estimate_margin x HBM are skipped; the rest go through tools/aot_tpu.py, one process each,
one at a time (each compile takes the machine's cores), its JSON cached in --cache_dir under a
hash of the flags, the compiler flags (LIBTPU_INIT_ARGS) and the source of spjax/.

Prints the candidates ranked by estimated step time (the cycle sum; XLA's optimal_seconds beside
it where it gives one), with memory, MFU and tokens/s per chip, and writes the winner as a config
file that `spjax-train --config=FILE` (and this tool, and aot_tpu) accept.
"""

import dataclasses
import hashlib
import itertools
import json
import os
import pprint
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Candidate:
  layout: str
  remat: str
  batch: int  # sequences per chip per microbatch
  accum: int
  scan: bool
  loss_chunk: int

  def overrides(self) -> dict:
    """{config key: value} this candidate sets on the base config."""
    return {"layout": self.layout, "model.remat_policy": self.remat,
            "per_device_batch_size": self.batch, "grad_accum_steps": self.accum,
            "model.scan_layers": self.scan, "loss_chunk_size": self.loss_chunk}

  def flags(self) -> list:
    return [f"--config.{k}={v}" for k, v in self.overrides().items()]


def candidates(config, layouts, remats, batches, scans, chunks) -> list:
  """Every combination, at the config's tokens per chip per step."""
  per_chip = config.per_device_batch_size * config.grad_accum_steps
  sizes = [(b, per_chip // b) for b in batches if per_chip % b == 0]
  if not sizes:
    raise ValueError(f"no --batches value divides the config's {per_chip} sequences per chip "
                     f"per step (per_device_batch_size x grad_accum_steps)")
  bad = [c for c in chunks if c and config.seq_len % c]
  if bad:
    raise ValueError(f"--loss_chunk {bad} must be 0 or divisors of seq_len {config.seq_len}")
  return [Candidate(lay, r, b, a, s, ch) for lay, r, (b, a), s, ch
          in itertools.product(layouts, remats, sizes, scans, chunks)]


def apply(config, overrides: dict):
  """A copy of `config` with dotted keys set."""
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def estimate_bytes(config, devices) -> float:
  """Shape-only bytes per device of the step (nothing compiled); raises ValueError for a
  candidate the layout cannot shard."""
  from spjax.parallel import footprint
  from spjax.train import program
  return footprint.step_bytes(program.build(config, devices))["total"]


def cache_key(config_arg: str, topology: str, num_slices: int, cand: Candidate) -> str:
  """Hash of what decides a compile: flags, compiler flags, and spjax's source."""
  h = hashlib.sha256(json.dumps([config_arg, topology, num_slices, cand.flags(),
                                 os.environ.get("LIBTPU_INIT_ARGS", "")]).encode())
  for root, _, files in sorted(os.walk(os.path.join(REPO, "spjax"))):
    for name in sorted(f for f in files if f.endswith(".py")):
      with open(os.path.join(root, name), "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:16]


def aot_compile(config_arg, topology, num_slices, cand, extra_flags, out_json) -> dict:
  """tools/aot_tpu.py in its own process: its JSON result."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices
  cmd = [sys.executable, os.path.join(REPO, "tools", "aot_tpu.py"), f"--config={config_arg}",
         f"--topology={topology}", f"--num_slices={num_slices}", f"--json={out_json}",
         *extra_flags, *cand.flags()]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  with open(out_json) as f:
    return json.load(f)


def search(config, config_arg, topology, num_slices, cands, devices, hbm, margin, cache_dir,
           compile_fn=aot_compile, extra_flags=(), log=print) -> list:
  """[(candidate, estimate bytes, result or None, note)] for every candidate."""
  os.makedirs(cache_dir, exist_ok=True)
  rows = []
  for i, cand in enumerate(cands):
    try:
      est = estimate_bytes(apply(config, cand.overrides()), devices)
    except ValueError as e:
      rows.append((cand, None, None, f"invalid: {e}"))
      continue
    if est > margin * hbm:
      rows.append((cand, est, None, f"skipped: estimate {est / GIB:.1f} GiB > {margin} x HBM"))
      continue
    path = os.path.join(cache_dir, cache_key(config_arg, topology, num_slices, cand) + ".json")
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
    else:
      log(f"[{i + 1}/{len(cands)}] compiling {' '.join(cand.flags())}")
      result = compile_fn(config_arg, topology, num_slices, cand, list(extra_flags), path)
      if "error" not in result:
        with open(path, "w") as f:
          json.dump(result, f)
    note = result.get("error") or ("" if result["fits"] else "does not fit")
    rows.append((cand, est, result, note))
  return rows


def ranked(rows) -> list:
  """The rows that compiled and fit, fastest first (cycle-sum step time), then the others."""
  ok = [r for r in rows if r[2] and not r[3]]
  ok.sort(key=lambda r: r[2]["estimated_step_seconds"])
  return ok + [r for r in rows if r not in ok]


def table(rows) -> str:
  head = (f"{'layout':<11} {'remat':<26} {'batch':>5} {'acc':>3} {'scan':>5} {'chunk':>5} "
          f"{'est GiB':>7} {'GiB':>6} {'step s':>7} {'MFU':>6} {'tok/s/chip':>10} "
          f"{'XLA s':>7} {'XLA MFU':>7}  note")
  lines = [head, "-" * len(head)]
  for cand, est, r, note in rows:
    cells = (f"{cand.layout:<11} {cand.remat:<26} {cand.batch:>5} {cand.accum:>3} "
             f"{str(cand.scan):>5} {cand.loss_chunk:>5} "
             f"{(est or 0) / GIB:>7.1f} ")
    if r and "error" not in r:
      step, x = r["estimated_step_seconds"], r.get("xla_estimate") or {}
      tok = r["tokens_per_step"] / step / r["chips"] if step else None
      cells += (f"{r['memory_gib_per_device']:>6.2f} " +
                (f"{step:>7.3f} {r['estimated_mfu']:>6.3f} {tok:>10,.0f} " if step else
                 f"{'':>7} {'':>6} {'':>10} ") +
                (f"{x['step_seconds']:>7.3f} {x['mfu']:>7.3f}" if x.get("step_seconds") else
                 f"{'-':>7} {'-':>7}"))
    else:
      cells += f"{'':>6} {'':>7} {'':>6} {'':>10} {'':>7} {'':>7}"
    lines.append(cells + (f"  {note}" if note else ""))
  return "\n".join(lines)


def write_config(path: str, config, cand: Candidate, result: dict):
  """The winner as a config file: the resolved config, whole, so it stands on its own."""
  resolved = apply(config, cand.overrides()).to_dict()
  with open(path, "w") as f:
    f.write(f'"""Written by tools/plan.py for {result["topology"]} x{result["num_slices"]}: '
            f'estimated {result["estimated_step_seconds"]:.3f} s a step, MFU '
            f'{result["estimated_mfu"]:.3f}, {result["memory_gib_per_device"]:.2f} GiB per '
            f'device.\n\n  spjax-train --config={os.path.basename(path)} --workdir=...\n')
    if result.get("libtpu_init_args"):
      f.write(f'\nCompiled with LIBTPU_INIT_ARGS="{result["libtpu_init_args"]}": set it for '
              f'training too.\n')
    f.write('"""\n\nimport ml_collections\n\n\ndef get_config():\n'
            f'  return ml_collections.ConfigDict({pprint.pformat(resolved, indent=2)})\n')


def _list(value: str, cast=str) -> list:
  items = [v.strip() for v in value.split(",") if v.strip()]
  if cast is bool:
    bad = [v for v in items if v.lower() not in ("true", "false")]
    if bad:
      raise ValueError(f"--scan takes true/false values, got {bad}")
    return [v.lower() == "true" for v in items]
  return [cast(v) for v in items]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax

  import aot_tpu
  aot_tpu.compile_only_environment()
  config, topology = _CONFIG.value, _TOPOLOGY.value
  # The overrides given as --config.x=v reach each compile too (the base config is re-read there).
  extra = [a for a in sys.argv[1:] if a.startswith("--config.")]
  try:
    from spjax.parallel import layouts
    names = _list(_LAYOUTS.value)
    unknown = [n for n in names if n not in layouts.PRESETS]
    if unknown:
      raise ValueError(f"--layouts {unknown}: not presets ({', '.join(layouts.PRESETS)})")
    cands = candidates(config, names, _list(_REMAT.value), _list(_BATCHES.value, int),
                       _list(_SCAN.value, bool), _list(_LOSS_CHUNK.value, int))
    chip = topology.split(":")[0]
    if chip not in aot_tpu.CHIPS:
      raise ValueError(f"unknown TPU generation {chip!r} in --topology; known: "
                       f"{', '.join(aot_tpu.CHIPS)}")
    devices = aot_tpu.topology_devices(topology, _NUM_SLICES.value)
  except ValueError as e:
    print(f"plan: {e}", file=sys.stderr)
    sys.exit(2)
  rows = ranked(search(config, _CONFIG_ARG(), topology, _NUM_SLICES.value, cands, devices,
                       aot_tpu.CHIPS[chip]["hbm"], _MARGIN.value, _CACHE_DIR.value,
                       extra_flags=extra, log=lambda m: print(m, file=sys.stderr, flush=True)))
  print(table(rows))
  best = rows[0] if rows and rows[0][2] and not rows[0][3] else None
  if best is None:
    print("plan: no candidate fits", file=sys.stderr)
    sys.exit(1)
  write_config(_OUT.value, config, best[0], best[2])
  print(f"\nwinner: {' '.join(best[0].flags())}\nwritten to {_OUT.value}")


def _CONFIG_ARG() -> str:
  """The --config value as given (path[:size]), for the compile processes."""
  for i, a in enumerate(sys.argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  raise app.UsageError("--config is required")


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Base config: path[:size].",
                                            lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v5p:4x4x4.")
  _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology over DCN.")
  _LAYOUTS = flags.DEFINE_string("layouts", "fsdp,fsdp_tp", "Layout presets to try.")
  _REMAT = flags.DEFINE_string("remat", "full,save_dots_no_batch,save_projections_attention",
                               "Remat policies to try.")
  _BATCHES = flags.DEFINE_string("batches", "2,4,8", "Per-chip microbatch sizes to try.")
  _SCAN = flags.DEFINE_string("scan", "true", "model.scan_layers values to try (true,false).")
  _LOSS_CHUNK = flags.DEFINE_string("loss_chunk", "0", "loss_chunk_size values to try.")
  _MARGIN = flags.DEFINE_float("estimate_margin", 1.3, "Skip candidates whose shape-only "
                               "estimate exceeds this x HBM (it ran 0.9-1.6x the compiled "
                               "figure on the 1B).")
  _CACHE_DIR = flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/spjax-plan"),
                                   "Compile results, by hash of flags and source.")
  _OUT = flags.DEFINE_string("out", "planned.py", "Where to write the winning config.")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
