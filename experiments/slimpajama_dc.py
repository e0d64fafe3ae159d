"""Time and chip-hours to train each SlimPajama-DC configuration (330B tokens) on TPU slices.

  python experiments/slimpajama_dc.py [--topologies=v5p:4x4x4,v5e:8x8,v5e:16x16] [--layouts=fsdp]

For each topology and layout, tools/aot_tpu.py compiles the real train step of
configs/slimpajama_dc.py (libtpu on this CPU; no TPU needed) at the study's global batch of 2048
sequences, split as `batch_for(chips)` says, and estimates its step time. The layout with the
shortest estimated step that fits is used. Time to 330B tokens = steps x estimated step time;
chip-hours = that x chips. These are ESTIMATES from XLA's TPU cost model (see tools/aot_tpu.py).

The six configurations differ only in `data.mixture`, which the compiled step never sees, so each
(topology, layout, batch split, model, compiler flags) compiles once: results are cached as JSON
under --cache_dir, keyed by those, and reused by later runs. Writes the markdown table to --out.
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's spjax and configs, installed or not

from configs import slimpajama_dc  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "slimpajama_dc.py")
TOPOLOGIES = ("v5p:4x4x4", "v5e:8x8", "v5e:16x16")
# Sequences per chip per microbatch: v5p's 95 GiB HBM holds twice v5e's 16 GiB worth.
PER_DEVICE = {"v5p": 8, "v5e": 4, "v4": 4}


def chips_of(topology: str) -> int:
  """'v5e:8x8' -> 64 (one JAX device per chip on v4, v5e and v5p)."""
  gen, _, dims = topology.partition(":")
  try:
    return math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    raise ValueError(f"bad topology {topology!r}: want GEN:AxB[xC], e.g. v5e:8x8") from None


def shared_config(names) -> dict:
  """What the compiled step depends on, identical for every configuration named (else an error)."""
  seen = {}
  for name in names:
    cfg = slimpajama_dc.get_config(name).to_dict()
    cfg.pop("data")  # the mixture and source: read by the input pipeline, not compiled
    seen[name] = cfg
  first = next(iter(seen.values()))
  differ = [n for n, c in seen.items() if c != first]
  if differ:
    raise ValueError(f"{', '.join(differ)} compile a different step from {names[0]}: one compile "
                     "per topology cannot cover them")
  return first


# The config fields the compiled train step depends on (with topology, layout and batch split).
COMPILED = ("model", "optimizer", "seq_len", "z_loss", "mesh")


def cache_key(topology: str, layout: str, per_device: int, accum: int, shared: dict) -> str:
  blob = json.dumps([topology, layout, per_device, accum, {k: shared[k] for k in COMPILED},
                     os.environ.get("LIBTPU_INIT_ARGS", "")], sort_keys=True, default=str)
  return f"{topology.replace(':', '-')}_{layout}_{per_device}x{accum}_" + \
      hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_aot(topology: str, layout: str, per_device: int, accum: int, out_json: str):
  """One compile in its own process (libtpu state and compile memory go away with it)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices
  cmd = [sys.executable, os.path.join(REPO, "tools", "aot_tpu.py"), f"--config={CONFIG}:DC-1",
         f"--config.layout={layout}", f"--config.per_device_batch_size={per_device}",
         f"--config.grad_accum_steps={accum}", f"--topology={topology}", f"--json={out_json}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"aot_tpu failed for {topology} {layout}: "
                       f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def estimate(topology, layouts, shared, cache_dir, runner=run_aot) -> dict:
  """The AOT result of the fastest fitting layout on `topology` (compiling only what is not cached)."""
  chips = chips_of(topology)
  per_device, accum = slimpajama_dc.batch_for(chips, PER_DEVICE[topology.split(":")[0]])
  results = []
  for layout in layouts:
    path = os.path.join(cache_dir, cache_key(topology, layout, per_device, accum, shared) + ".json")
    if os.path.exists(path):
      print(f"== {topology} {layout}: cached {os.path.relpath(path, REPO)}", flush=True)
    else:
      print(f"== {topology} {layout}: compiling ({per_device}/device x {accum} accum) ...",
            flush=True)
      os.makedirs(cache_dir, exist_ok=True)
      runner(topology, layout, per_device, accum, path + ".tmp")
      os.replace(path + ".tmp", path)  # only a finished compile enters the cache
    with open(path) as f:
      results.append(json.load(f))
  ok = [r for r in results if r["fits"] and r["estimated_step_seconds"]]
  if not ok:
    raise RuntimeError(f"no layout of {', '.join(layouts)} fits the model on {topology}")
  best = min(ok, key=lambda r: r["estimated_step_seconds"])
  tokens = slimpajama_dc.GLOBAL_BATCH * slimpajama_dc.SEQ_LEN
  if best["tokens_per_step"] != tokens:
    raise RuntimeError(f"{topology}: the compiled step takes {best['tokens_per_step']} tokens, "
                       f"not the study's {tokens}")
  return best


def rows(names, topologies, layouts, cache_dir, runner=run_aot) -> list[dict]:
  shared = shared_config(names)
  steps = shared["num_train_steps"]
  out = []
  for topology in topologies:
    r = estimate(topology, layouts, shared, cache_dir, runner)
    seconds = steps * r["estimated_step_seconds"]
    for name in names:
      out.append({"config": name, "mixture": slimpajama_dc.get_config(name).data.mixture,
                  "topology": topology, "chips": r["chips"], "layout": r["layout"],
                  "batch": f"{r['per_device_batch_size']} x {r['chips']} x {r['grad_accum_steps']}",
                  "memory_gib": r["memory_gib_per_device"], "step_seconds": r["estimated_step_seconds"],
                  "mfu": r["estimated_mfu"], "steps": steps, "tokens": steps * r["tokens_per_step"],
                  "days": seconds / 86400, "chip_hours": seconds * r["chips"] / 3600,
                  "compile_seconds": r["compile_seconds"]})
  return out


def table(results) -> str:
  lines = ["| config | topology | chips | layout | batch (per device x chips x accum) | "
           "GiB/device | est. step s | est. MFU | steps | est. days | est. chip-hours |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r['config']} | {r['topology']} | {r['chips']} | {r['layout']} | {r['batch']} "
                 f"| {r['memory_gib']:.2f} | {r['step_seconds']:.3f} | {r['mfu']:.3f} | "
                 f"{r['steps']:,} | {r['days']:.1f} | {r['chip_hours']:,.0f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default=",".join(slimpajama_dc.NAMES))
  p.add_argument("--topologies", default=",".join(TOPOLOGIES))
  p.add_argument("--layouts", default="fsdp", help="candidates; the fastest that fits is used")
  p.add_argument("--cache_dir", default=os.path.join(REPO, "experiments", "results",
                                                     "slimpajama_dc_aot"))
  p.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "slimpajama_dc.md"))
  args = p.parse_args(argv)
  names = [n.strip().upper() for n in args.configs.split(",") if n.strip()]
  try:
    results = rows(names, args.topologies.split(","), args.layouts.split(","), args.cache_dir)
  except (ValueError, RuntimeError) as e:
    print(f"slimpajama_dc: {e}", file=sys.stderr)
    return 2
  print(table(results))
  flags_env = os.environ.get("LIBTPU_INIT_ARGS")
  env = f'LIBTPU_INIT_ARGS="{flags_env}" ' if flags_env else ""
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("# SlimPajama-DC on TPU: estimated time and chip-hours to 330B tokens\n\n"
            f"Command: `{env}python experiments/slimpajama_dc.py {' '.join(argv or sys.argv[1:])}".strip()
            + "`"
            "\n\nThe 1.3B model of configs/slimpajama_dc.py (what it shares with the study and what "
            "differs is in that file), 2048 x 2048 tokens per step. Step time and MFU are "
            "ESTIMATES from XLA's TPU cost model on the compiled step (tools/aot_tpu.py states "
            "the method), not measurements; input pipeline, evaluation and checkpoint time are "
            "not included. Layout: the fastest that fits of --layouts (default fsdp, the pick of "
            "the 1B layout sweep on v5e:4x4, layout_sweep_1b_v5e-4x4_splash.md; the study's MLP "
            "width 5461 does not split over tensor-parallel layouts). "
            "The six configurations differ only in their data mixture, so they "
            "share one compile per topology (cached JSON: experiments/results/"
            "slimpajama_dc_aot/).\n\n")
    f.write(table(results) + "\n")
    compiles = {r["topology"]: r["compile_seconds"] for r in results}
    f.write("\nCompile time of each cached step (this 2-core CPU, shared, under nice): " +
            ", ".join(f"{t} {s:.0f} s" for t, s in compiles.items()) + ".\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
