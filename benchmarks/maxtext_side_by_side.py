"""spjax and MaxText 0.2.5 compiled for the same TPU topology by the same libtpu, side by side.

Each row compiles one train step on this CPU (no TPU) for a described topology: spjax through
tools/aot_tpu.py, MaxText through its own `train_compile` entry (its `main`, with the compiled
object kept). Both programs' HLO then go through the same two estimators (spjax.parallel.hlo, as
tools/aot_tpu.py applies them):
  - XLA: `cost_analysis()["optimal_seconds"]`, +1 s per custom call it sums at -1 s; refused (no
    number) for programs with loops or Pallas kernels, with the raw figure kept beside the refusal;
  - cycle sum: XLA's per-op cycles over the executed ops, Pallas kernels charged their FLOPs at
    --kernel_efficiency of peak.
Memory per chip is `memory_analysis()` with donated state counted once, for both.

Same model, batch and settings on both sides: Llama blocks (RMSNorm, RoPE, SwiGLU, GQA), vocab
32000, seq 2048, fp32 params and Adam moments, bf16 compute, AdamW, FSDP over every chip,
unrolled layers, splash attention. Remat "full" is full on both; "saved" is spjax's
`save_dots_no_batch` against MaxText's `minimal` (each one's matmul-saving policy); "projections"
is spjax's `save_projections` against `minimal`, and "context" spjax's `save_projections_attention`
against `minimal_with_context`: the same saved tensors on both sides.

Setup (MaxText 0.2.5 wants Python 3.12; a virtualenv outside the repository, spjax installed
into it without its own pins so that both share MaxText's jax and libtpu):
  python3.12 -m venv ~/venv-maxtext && ~/venv-maxtext/bin/pip install "maxtext[tpu]==0.2.5"
  ~/venv-maxtext/bin/pip install --no-deps -e .
Run (W: windowed einsums off, as in BENCHMARKS.md; one row at a time, each in a subprocess):
  LIBTPU_INIT_ARGS="$W" ~/venv-maxtext/bin/python benchmarks/maxtext_side_by_side.py \
      --workloads=1b --remats=full,saved --json=side_by_side.json
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

# (b) and (a) of issue 17, and a small one to check the script in minutes.
WORKLOADS = {
    "1b": {"topology": "v5e:4x4", "maxtext_topology": "v5e-16", "batch": 8, "d_model": 2048,
           "layers": 16, "heads": 16, "kv_heads": 8, "head_dim": 128, "mlp": 8192},
    "7b": {"topology": "v5p:4x4x4", "maxtext_topology": "v5p-128", "batch": 4, "d_model": 4096,
           "layers": 32, "heads": 32, "kv_heads": 32, "head_dim": 128, "mlp": 11008},
    "small": {"topology": "v5e:2x2", "maxtext_topology": "v5e-4", "batch": 2, "d_model": 512,
              "layers": 2, "heads": 4, "kv_heads": 4, "head_dim": 128, "mlp": 1024},
}
# (spjax, MaxText): "saved" is each one's matmul-saving policy as issue 17 compares them;
# "projections" the same saved set on both sides (every projection kept, attention recomputed);
# "context" the same again with the attention output kept too.
REMATS = {"full": ("full", "full"), "saved": ("save_dots_no_batch", "minimal"),
          "projections": ("save_projections", "minimal"),
          "context": ("save_projections_attention", "minimal_with_context")}
VOCAB, SEQ = 32000, 2048
# MaxText's train_compile appends this to LIBTPU_INIT_ARGS itself; set for both so the compiler
# flags are the same (it only touches random-number ops, which neither step has without dropout).
RNG_FLAG = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"

_WORKLOADS = flags.DEFINE_list("workloads", ["1b"], f"Of {', '.join(WORKLOADS)}.")
_REMATS = flags.DEFINE_list("remats", ["full", "saved"], f"Of {', '.join(REMATS)}.")
_SYSTEMS = flags.DEFINE_list("systems", ["maxtext", "spjax"], "Which sides to compile.")
_KERNEL_EFFICIENCY = flags.DEFINE_float("kernel_efficiency", 0.5, "Assumed kernel rate / peak.")
_JSON = flags.DEFINE_string("json", None, "Write every row here.")
_HLO_DIR = flags.DEFINE_string("hlo_dir", None, "Keep each row's compiled HLO here.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Override the workloads' layer count (0: theirs); a "
                               "2-layer 1b compiles in minutes, to read where two steps differ.")
_ROW = flags.DEFINE_string("row", None, "Internal: compile one row (SYSTEM:WORKLOAD:REMAT) and "
                                        "print its JSON.")


def spjax_overrides(w: dict, remat: str) -> dict:
  """configs/default.py:1b's fields set to the row's shapes and settings."""
  model = {"d_model": w["d_model"], "num_layers": w["layers"], "num_heads": w["heads"],
           "num_kv_heads": w["kv_heads"], "head_dim": w["head_dim"], "mlp_dim": w["mlp"],
           "vocab_size": VOCAB, "scan_layers": False, "remat_policy": REMATS[remat][0],
           "attention": "splash", "dropout_rate": 0.0}
  return {"seq_len": SEQ, "per_device_batch_size": w["batch"], "layout": "fsdp",
          **{f"model.{k}": v for k, v in model.items()}}


def maxtext_argv(w: dict, remat: str, workdir: str) -> list[str]:
  from maxtext.configs import pyconfig  # noqa: F401  (fails early if MaxText is missing)
  import maxtext
  base = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  settings = {
      "run_name": "side_by_side", "base_output_directory": workdir,
      "compile_topology": w["maxtext_topology"], "compile_topology_num_slices": 1,
      "skip_jax_distributed_system": True, "enable_checkpointing": False,
      "dataset_type": "synthetic", "decoder_block": "llama2",
      "base_emb_dim": w["d_model"], "base_num_decoder_layers": w["layers"],
      "base_num_query_heads": w["heads"], "base_num_kv_heads": w["kv_heads"],
      "head_dim": w["head_dim"], "base_mlp_dim": w["mlp"], "vocab_size": VOCAB,
      "max_target_length": SEQ, "per_device_batch_size": w["batch"],
      "scan_layers": False, "attention": "flash", "remat_policy": REMATS[remat][1],
      "dtype": "bfloat16", "weight_dtype": "float32", "opt_type": "adamw",
      "ici_fsdp_parallelism": -1, "dropout_rate": 0.0,
  }
  return ["train_compile", base] + [f"{k}={v}" for k, v in settings.items()]


def estimate(executable, seconds: float, spjax_row: dict, w: dict) -> dict:
  """tools/aot_tpu.py's numbers for an executable compiled elsewhere (MaxText's): its memory and
  both estimators, kernels costed with the FLOPs of spjax's Program of the same shapes."""
  import aot_tpu
  from spjax.parallel import hlo
  chip = w["topology"].split(":")[0]
  clock = aot_tpu.CHIPS[chip]["clock"]
  mem = aot_tpu.memory(aot_tpu.Compiled(seconds, executable))
  text = executable.as_text()
  keep_hlo(text, "maxtext", w)
  summed = hlo.cycle_sum(text)
  kernels = aot_tpu.kernel_seconds(spjax_row["prog"], text,
                                   spjax_row["peak"] * _KERNEL_EFFICIENCY.value)
  coll = hlo.collectives(text)
  compute = sum(summed.cycles.values()) / clock + sum(kernels.values())
  comm = sum(aot_tpu._WIRE[k] * b for k, b in coll.bytes.items()) / aot_tpu.CHIPS[chip]["ici"]
  xla = hlo.xla_estimate(executable.cost_analysis().get("optimal_seconds"), text, clock)
  return {"compile_seconds": seconds, "memory_gib_per_device": mem["total"] / aot_tpu.GIB,
          "memory_breakdown_gib": {k: v / aot_tpu.GIB for k, v in mem.items() if k != "total"},
          "estimated_step_seconds": max(compute, comm), "kernel_seconds": kernels,
          "cycle_sum_unestimated_ops": [op for op, _, _ in summed.sentinels],
          "xla_estimate": {"raw_optimal_seconds": xla.raw_seconds, "step_seconds": xla.seconds,
                           "uncosted_custom_calls": xla.uncosted_calls,
                           "refused": xla.refusal or None}}


def keep_hlo(text: str, system: str, w: dict) -> None:
  if _HLO_DIR.value:
    os.makedirs(_HLO_DIR.value, exist_ok=True)
    with open(os.path.join(_HLO_DIR.value, f"{system}_{w['name']}.hlo"), "w") as f:
      f.write(text)


def spjax_program(w: dict, remat: str):
  """spjax's config and Program of the row on the topology's devices (no compile), and its peak."""
  import aot_tpu
  from configs import default
  from spjax.train import metrics, program
  config = default.get_config("1b")
  config.update_from_flattened_dict(spjax_overrides(w, remat))
  devices = aot_tpu.topology_devices(w["topology"])
  return config, program.build(config, devices), metrics.peak_flops_per_device(devices[0])


def compile_row(system: str, workload: str, remat: str) -> dict:
  import aot_tpu
  aot_tpu.compile_only_environment()
  from spjax.train import metrics
  w = {**WORKLOADS[workload], "name": f"{workload}_{remat}"}
  if _LAYERS.value:
    w.update(layers=_LAYERS.value, name=f"{workload}_{_LAYERS.value}layers_{remat}")
  config, prog, peak = spjax_program(w, remat)
  tokens = prog.global_batch * SEQ
  flops = metrics.flops_per_token(config.model, SEQ) * tokens
  row = {"system": system, "workload": workload, "layers": w["layers"],
         "remat": REMATS[remat][system == "maxtext"],
         "topology": w["topology"], "chips": prog.mesh.size, "tokens_per_step": tokens,
         "model_flops_per_step": flops}
  if system == "spjax":
    hlo_path = _HLO_DIR.value and os.path.join(_HLO_DIR.value, f"spjax_{w['name']}.hlo")
    if hlo_path:
      os.makedirs(_HLO_DIR.value, exist_ok=True)
    real = aot_tpu.run(config, w["topology"], 1, hlo_path or None,
                       kernel_efficiency=_KERNEL_EFFICIENCY.value)
    row.update({k: real.get(k) for k in ("compile_seconds", "memory_gib_per_device",
                                         "memory_breakdown_gib", "estimated_step_seconds",
                                         "kernel_seconds", "cycle_sum_unestimated_ops",
                                         "compile_error")})
    row["xla_estimate"] = real.get("xla_estimate")
  else:
    from maxtext.trainers.pre_train import train_compile
    kept = {}
    def keep(*args, **kwargs):
      kept["compiled"] = compile_fn(*args, **kwargs)
      return kept["compiled"]
    compile_fn, train_compile.jit_and_compile = train_compile.jit_and_compile, keep
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      train_compile.main(maxtext_argv(w, remat, workdir))
      seconds = time.perf_counter() - start
    row.update(estimate(kept["compiled"], seconds, {"prog": prog, "peak": peak}, w))
  mfu = lambda s: flops / (s * prog.mesh.size * peak) if s else None
  row["estimated_mfu"] = mfu(row.get("estimated_step_seconds"))
  if row.get("xla_estimate"):
    row["xla_estimate"]["mfu"] = mfu(row["xla_estimate"]["step_seconds"])
  return row


def table(rows: list[dict]) -> str:
  fmt = lambda v, f: "-" if v is None else format(v, f)
  lines = ["| workload | system | remat | XLA est. step / MFU | cycle-sum est. step / MFU | "
           "memory / chip | compile s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    x = r.get("xla_estimate") or {}
    xla = (f"{fmt(x.get('step_seconds'), '.3f')} s / {fmt(x.get('mfu'), '.3f')}"
           if x.get("step_seconds") else
           f"refused (raw {fmt(x.get('raw_optimal_seconds'), '.3f')} s): {x.get('refused')}")
    lines.append(f"| {r['workload']} | {r['system']} | {r['remat']} | {xla} | "
                 f"{fmt(r.get('estimated_step_seconds'), '.3f')} s / "
                 f"{fmt(r.get('estimated_mfu'), '.3f')} | "
                 f"{fmt(r.get('memory_gib_per_device'), '.2f')} GiB | "
                 f"{fmt(r.get('compile_seconds'), '.0f')} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if RNG_FLAG not in os.environ.get("LIBTPU_INIT_ARGS", ""):
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") + " " + RNG_FLAG)
  if _ROW.value:
    print("ROW " + json.dumps(compile_row(*_ROW.value.split(":"))), flush=True)
    return
  bad = ([w for w in _WORKLOADS.value if w not in WORKLOADS] +
         [r for r in _REMATS.value if r not in REMATS] +
         [s for s in _SYSTEMS.value if s not in ("maxtext", "spjax")])
  if bad:
    raise app.UsageError(f"unknown --workloads/--remats/--systems values: {bad}")
  rows = []
  for workload in _WORKLOADS.value:
    for remat in _REMATS.value:
      for system in _SYSTEMS.value:
        print(f"compiling {system} {workload} remat={remat} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, f"--row={system}:{workload}:{remat}",
                              f"--kernel_efficiency={_KERNEL_EFFICIENCY.value}",
                              f"--layers={_LAYERS.value}"] +
                             ([f"--hlo_dir={_HLO_DIR.value}"] if _HLO_DIR.value else []),
                             cwd=REPO, capture_output=True, text=True)
        found = [line[4:] for line in out.stdout.splitlines() if line.startswith("ROW ")]
        if out.returncode or not found:
          tail = "\n".join(out.stderr.splitlines()[-15:])
          rows.append({"system": system, "workload": workload, "remat": remat,
                       "error": tail})
          print(f"  failed:\n{tail}", file=sys.stderr)
          continue
        rows.append(json.loads(found[0]))
        if _JSON.value:  # after every row: a long run keeps what it has
          with open(_JSON.value, "w") as f:
            json.dump({"libtpu_init_args": os.environ["LIBTPU_INIT_ARGS"], "rows": rows}, f,
                      indent=2)
  print(table([r for r in rows if "error" not in r]))


if __name__ == "__main__":
  app.run(main)
