"""Every layout (and remat policy) for one model on one TPU topology: memory and estimated MFU.

  python experiments/layout_sweep.py --config=configs/default.py:1b --topology=v5e:4x4 \
      --config.per_device_batch_size=8 [--rules=my_rules.json,...] [--remat=full,save_dots]

Every preset includes the pipeline ones (pp, fsdp_pp: their stages, microbatches and repeats from
--config.mesh.ici.stage and --config.pipeline.*, which the other layouts ignore).

Runs tools/aot_tpu.py once per (layout, remat policy), each in its own process (libtpu state and
compile memory go away with it), and writes under --out_dir:
  <name>.json  every result as the AOT tool reports it
  <name>.md    one table row per run
  <name>.png   memory per device against the chip's HBM, and estimated MFU
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's spjax, installed or not

import matplotlib  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spjax.parallel import hlo  # noqa: E402
from spjax.parallel import layouts  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of the topology (for hsdp).")
_LAYOUTS = flags.DEFINE_list("layouts", [], "Layouts to run; default: every preset.")
_RULES = flags.DEFINE_list("rules", [], "Extra layout rules files (.json/.py) to run too.")
_REMAT = flags.DEFINE_list("remat", [], "Remat policies to cross with the layouts; default: the "
                           "config's.")
_OUT_DIR = flags.DEFINE_string("out_dir", os.path.join(REPO, "experiments", "results"),
                               "Where the table, chart and JSON go.")
_NAME = flags.DEFINE_string("name", None, "File name stem; default layout_sweep_<size>_<topology>.")
flags.mark_flags_as_required(["config", "topology"])


def config_args(argv) -> list[str]:
  """The --config=... and --config.key=value flags given to this script, passed on verbatim."""
  return [a for a in argv if a.startswith(("--config=", "--config."))]


def run_one(args, layout: str, remat: str, out_json: str) -> dict:
  cmd = [sys.executable, os.path.join(REPO, "tools", "aot_tpu.py"), *args,
         f"--config.layout={layout}", f"--config.model.remat_policy={remat}",
         f"--topology={_TOPOLOGY.value}", f"--num_slices={_NUM_SLICES.value}", f"--json={out_json}"]
  print(f"== {layout} remat={remat}", flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    # A layout that cannot place this model (e.g. heads not divisible) is a row, not a crash.
    reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
    print(f"   {reason}", flush=True)
    return {"layout": layout, "model": {"remat_policy": remat}, "error": reason}
  with open(out_json) as f:
    result = json.load(f)
  mfu = result["estimated_mfu"]
  print(f"   {result['memory_gib_per_device']:.2f} GiB/device, estimated MFU "
        f"{'—' if mfu is None else f'{mfu:.3f}'}", flush=True)
  return result


def table(results) -> str:
  lines = ["| layout | remat | mesh | memory GiB/device | fits | compile s | est. step s | "
           "est. MFU | all-gather | reduce-scatter | all-reduce |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    remat = r["model"]["remat_policy"]
    if "error" in r:
      lines.append(f"| {r['layout']} | {remat} | {r['error']} |" + " — |" * 8)
      continue
    mesh = " ".join(f"{a}={s}" for a, s in r["mesh"].items())
    coll = r.get("collectives", {}).get("bytes_per_device", {})
    cells = [f"{r['memory_gib_per_device']:.2f}", "yes" if r["fits"] else "no",
             f"{r['compile_seconds']:.0f}"]
    if r["estimated_step_seconds"] is None:  # the compiler ran out of memory: nothing to estimate
      cells += ["—", "—"]
    else:
      cells += [f"{r['estimated_step_seconds']:.3f}", f"{r['estimated_mfu']:.3f}"]
    cells += [hlo.fmt_bytes(coll[k]) if k in coll else "—"
              for k in ("all-gather", "reduce-scatter", "all-reduce")]
    lines.append(f"| {r['layout']} | {remat} | {mesh} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def chart(results, title: str, path: str):
  ok = [r for r in results if "error" not in r]
  remats = {r["model"]["remat_policy"] for r in ok}
  if len(remats) == 1:  # one policy for all: say it once, in the title
    title += f", remat {remats.pop()}"
    labels = [r["layout"] for r in ok]
  else:
    labels = [f"{r['layout']}\n{r['model']['remat_policy']}" for r in ok]
  fig, (mem, mfu) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(ok)) * 1.6, 4.5))
  colors = ["tab:blue" if r["fits"] else "tab:red" for r in ok]
  mem.bar(labels, [r["memory_gib_per_device"] for r in ok], color=colors)
  if ok:
    mem.axhline(ok[0]["hbm_gib_per_device"], color="black", linestyle="--", label="HBM per chip")
    mem.legend()
  mem.set_ylabel("GiB per device (red: does not fit)")
  mem.set_title("memory per device (compiled)")
  mfu.bar(labels, [r["estimated_mfu"] or 0.0 for r in ok], color=colors)
  mfu.set_ylabel("estimated MFU")
  mfu.set_ylim(0, 1)
  mfu.set_title("estimated MFU (XLA cost model, an estimate)")
  for ax in (mem, mfu):
    ax.tick_params(axis="x", labelsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write(results, name: str, title: str):
  """Table, chart and JSON of the runs so far: a long sweep leaves results even if stopped."""
  with open(os.path.join(_OUT_DIR.value, f"{name}.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(_OUT_DIR.value, f"{name}.md"), "w") as f:
    flags_env = os.environ.get("LIBTPU_INIT_ARGS")  # compiler flags change the results
    env = f'LIBTPU_INIT_ARGS="{flags_env}" ' if flags_env else ""
    f.write(f"# Layout sweep: {title}\n\nCommand: `{env}python experiments/layout_sweep.py "
            f"{' '.join(sys.argv[1:])}`\n\nMemory is the compiled step's per-device total (the "
            "compiler's out-of-memory figure where it does not fit). Step time and MFU are "
            "ESTIMATES from XLA's TPU cost model (tools/aot_tpu.py states the method).\n\n")
    f.write(table(results) + "\n")
  chart(results, title, os.path.join(_OUT_DIR.value, f"{name}.png"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  size = next(a for a in sys.argv if a.startswith("--config=")).split(":")[-1]  # e.g. "1b"
  name = _NAME.value or f"layout_sweep_{size}_{_TOPOLOGY.value.replace(':', '-')}"
  title = (f"{size} on {_TOPOLOGY.value} x{_NUM_SLICES.value}: batch "
           f"{config.per_device_batch_size}/device x {config.seq_len} x {config.grad_accum_steps} "
           f"accum, {config.model.attention} attention")
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  args = [a for a in config_args(sys.argv[1:])
          if not a.startswith(("--config.layout=", "--config.model.remat_policy="))]
  results = []
  for layout in (_LAYOUTS.value or list(layouts.PRESETS)) + _RULES.value:
    for remat in _REMAT.value or [config.model.remat_policy]:
      out_json = os.path.join(_OUT_DIR.value, f".{name}.{os.path.basename(layout)}.{remat}.json")
      results.append(run_one(args, layout, remat, out_json))
      if os.path.exists(out_json):  # its content goes into the combined JSON
        os.remove(out_json)
      write(results, name, title)
  print(table(results))


if __name__ == "__main__":
  app.run(main)
