"""Where every tensor of a run lives, and what the compiled step communicates.

  python tools/layout_report.py --config=configs/default.py:1b --config.layout=fsdp_tp
  python tools/layout_report.py --config=configs/default.py:tiny --compare=dp,fsdp

Prints per parameter its logical axes, PartitionSpec and bytes per device; totals per device for
parameters, optimizer state, the batch and the compiled step's peak temporaries (activations); and
the collectives in the compiled step's HLO. The step is compiled (never run) for `--devices`
simulated CPU devices, so remat and scan choices (`--config.model.remat_policy`,
`--config.model.scan_layers`) show up in the temporaries and the collectives. For TPU memory and
speed use tools/aot_tpu.py.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spjax.parallel import footprint  # noqa: E402
from spjax.parallel import hlo  # noqa: E402
from spjax.train import program  # noqa: E402


def report(prog) -> dict:
  """Everything the tool prints for one Program: rows, totals per device and collectives."""
  with prog.activate():
    compiled = prog.jit_train_step().lower(prog.abstract_state(), prog.abstract_batch()).compile()
  totals = footprint.state_bytes(prog)
  totals["activations"] = compiled.memory_analysis().temp_size_in_bytes
  return {"rows": footprint.parameter_rows(prog), "totals": totals,
          "collectives": hlo.collectives(compiled.as_text())}


def header(prog) -> str:
  c, m = prog.config, prog.model_cfg
  mesh = " x ".join(f"{a}={s}" for a, s in prog.mesh.shape.items() if s > 1) or "1 device"
  return (f"layout {prog.layout.source} | mesh {mesh} ({prog.mesh.size} simulated devices) | "
          f"scan_layers={m.scan_layers} remat={m.remat_policy} | batch {c.per_device_batch_size}"
          f"/device x {c.seq_len} | {m.num_params() / 1e6:,.1f}M params")


def pipeline_lines(prog, rows) -> list[str]:
  """Under a pipeline layout: the schedule and, per stage, the canonical layers it holds and its
  share of the layer stack's parameters."""
  sched = prog.pipeline
  if sched is None:
    return []
  stack = [row for row in rows if row.name.startswith("blocks/")]
  params = sum(math.prod(row.shape) for row in stack) // sched.stages
  per_device = hlo.fmt_bytes(sum(row.bytes_per_device for row in stack))
  return [sched.describe()] + [
      f"  stage {s}: layers {sched.stage_layers(s)}, {params:,} stack params "
      f"({per_device} per device)" for s in range(sched.stages)] + [""]


def _spec(spec) -> str:
  return "(" + ", ".join("+".join(e) if isinstance(e, tuple) else str(e) for e in spec) + ")"


def format_one(prog, r) -> str:
  fmt_bytes = hlo.fmt_bytes
  w = max(len(row.name) for row in r["rows"])
  lines = [header(prog), "", *pipeline_lines(prog, r["rows"]),
           f"{'parameter':<{w}}  {'shape':<22} {'logical axes':<36} {'PartitionSpec':<28} "
           "per device"]
  for row in r["rows"]:
    lines.append(f"{row.name:<{w}}  {str(row.shape):<22} {_spec(row.logical):<36} "
                 f"{_spec(row.spec):<28} {fmt_bytes(row.bytes_per_device):>10}")
  lines += ["", "per device totals", *_totals([r]), "",
            "collectives in the compiled step (executed count, buffer bytes per device)",
            r["collectives"].format()]
  return "\n".join(lines)


_TOTAL_LABELS = {"params": "parameters", "opt_state": "optimizer state", "batch": "batch",
                 "activations": "activations (step temporaries, XLA CPU)"}


def _totals(reports) -> list[str]:
  fmt_bytes = hlo.fmt_bytes
  lines = []
  for key, label in _TOTAL_LABELS.items():
    cells = "".join(f"{fmt_bytes(r['totals'][key]):>14}" for r in reports)
    lines.append(f"  {label:<40}{cells}")
  lines.append(f"  {'sum':<40}" + "".join(f"{fmt_bytes(sum(r['totals'].values())):>14}"
                                           for r in reports))
  return lines


def format_compare(progs, reports) -> str:
  fmt_bytes = hlo.fmt_bytes
  a, b = reports
  w = max(len(row.name) for row in a["rows"])
  names = [p.layout.source for p in progs]
  lines = [f"A: {header(progs[0])}", f"B: {header(progs[1])}", "",
           *(line for p, r in zip(progs, reports) for line in pipeline_lines(p, r["rows"])),
           f"{'parameter':<{w}}  {'A: ' + names[0]:<28} {'per device':>10}   "
           f"{'B: ' + names[1]:<28} {'per device':>10}"]
  for ra, rb in zip(a["rows"], b["rows"]):
    lines.append(f"{ra.name:<{w}}  {_spec(ra.spec):<28} {fmt_bytes(ra.bytes_per_device):>10}   "
                 f"{_spec(rb.spec):<28} {fmt_bytes(rb.bytes_per_device):>10}")
  lines += ["", f"per device totals {'A':>37}{'B':>14}"] + _totals(reports)
  lines += ["", "collectives (executed count, buffer bytes per device)     A                B"]
  for k in hlo.COLLECTIVES:
    cells = "".join(f"{r['collectives'].count[k]:>6} {fmt_bytes(r['collectives'].bytes[k]):>10}"
                    for r in reports)
    lines.append(f"  {k:<40}{cells}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if len(_COMPARE.value) not in (0, 2):
    raise app.UsageError("--compare takes exactly two layouts: --compare=A,B")
  # jax reads the simulated device count once, when its CPU backend starts: set it before that.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_DEVICES.value}")
  jax.config.update("jax_platforms", "cpu")  # never the TPU runtime, even where libtpu is installed
  config = _CONFIG.value
  try:
    if _COMPARE.value:
      progs = []
      for layout in _COMPARE.value:
        c = config.copy_and_resolve_references()
        c.layout = layout
        progs.append(program.build(c))
      print(format_compare(progs, [report(p) for p in progs]))
    else:
      prog = program.build(config)
      print(format_one(prog, report(prog)))
  except ValueError as e:
    print(f"layout_report: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Flags exist only when run as a script, so tests can import several tools' functions.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                            lock_config=True)
  _DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices the mesh is built from.")
  _COMPARE = flags.DEFINE_list("compare", [], "Two layouts A,B shown side by side (overrides "
                               "--config.layout).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
