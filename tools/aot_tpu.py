"""Compile the real train step for a TPU topology on this CPU (libtpu, no TPU needed) and estimate.

  python tools/aot_tpu.py --config=configs/default.py:1b --topology=v5e:4x4 --json=OUT.json \
      [--num_slices=2] [--dump_hlo=STEP.hlo.txt] [--kernel_efficiency=0.5] [--config.key=value ...]

Prints and writes per-device memory (arguments, outputs, temporaries; total against the chip's HBM),
compile time, the collectives of the compiled step, and ESTIMATES of step time and MFU:

- Model FLOPs per step = spjax.train.metrics.flops_per_token (6 N + 6 L T H Dh: every matmul weight twice
  forward and four times backward, plus causal attention; under LoRA 4 N + 6 x the adapters'
  params + the same attention term: frozen weights get no weight gradients; plus a distillation
  teacher's forward, a third of its 6 N + 6 L T H Dh) x tokens per step.
- Compute time = the sum over every op the step executes of the cycles XLA's TPU cost model
  records for it (`estimated_cycles`), over the chip's clock. The cost model costs a scanned loop
  body once, so ops inside a loop (the layer scan, gradient accumulation, windowed einsums) are
  counted once per iteration of the compiled loop, as if unrolled.
  (`--config.model.scan_layers=False` compiles the layers unrolled: on the tiny model, where the
  scan's own bookkeeping weighs most, the scanned estimate is 31% above the unrolled one.) The
  cost model leaves collectives out: they run asynchronously beside compute.
- Pallas kernels (splash attention) are custom calls the cost model gives no cycles: each executed
  call is charged its FLOPs (spjax.model.attention.kernel_flops) at --kernel_efficiency x peak, an
  assumption (default 0.5) printed beside the result and recorded in the JSON.
- Collective time = collective bytes / the chip's ICI bandwidth: a lower bound (DCN not modelled).
- Step time = max(compute, collectives), i.e. collectives hidden behind compute where they fit.
- Estimated MFU = model FLOPs / (step time x chips x the chip's peak bf16 FLOP/s); a mixture of
  experts counts the experts a token visits (active parameters), not all of them.
- Ops whose `estimated_cycles` is a sentinel (INT64_MAX: "no estimate") are listed, not summed;
  a conditional (optax.apply_if_finite's update, in MaxText's step and in spjax's before c718748)
  counts its costliest branch.

A second, labelled estimate is XLA's own `compiled.cost_analysis()["optimal_seconds"]`, the figure
MaxText users quote, corrected by spjax.parallel.hlo.xla_estimate: +1 s for each custom call it sums
at -1 s, and for a conditional branch those calls made XLA's max over branches drop (the update
branch of optax.apply_if_finite) the cycle model's difference to the branch it kept; refused (no
number) where the program has while loops (scanned layers, accumulation: a body is costed once)
or Pallas kernels.

Compiler flags go through the environment as usual (`LIBTPU_INIT_ARGS=...`) and are recorded in the
JSON, e.g. windowed einsum off for FSDP on v5e (BENCHMARKS.md).
"""

import dataclasses
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from spjax.model import attention  # noqa: E402
from spjax.parallel import hlo  # noqa: E402
from spjax.train import metrics  # noqa: E402
from spjax.train import program  # noqa: E402

GIB = 1024**3
# Per chip, from the Cloud TPU datasheets: HBM capacity, TensorCore clock (what the cost model's
# cycles tick at) and ICI bandwidth (all links, both directions, bytes/s). Peak FLOP/s comes from
# spjax.metrics, shared with train/mfu. (On v4 a lone matmul is costed at ~45% of the chip's peak,
# as if on one of its two TensorCores: treat v4 estimates as pessimistic.)
CHIPS = {
    "v4": {"hbm": 32 * GIB, "clock": 1.05e9, "ici": 2400e9 / 8},
    "v5e": {"hbm": 16 * GIB, "clock": 1.5e9, "ici": 1600e9 / 8},
    "v5p": {"hbm": 95 * GIB, "clock": 1.75e9, "ici": 4800e9 / 8},
}
# Bytes a chip sends per buffer byte of each collective (ring algorithms, large groups).
_WIRE = {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 2, "all-to-all": 1,
         "collective-permute": 1}


@dataclasses.dataclass
class Compiled:
  """One compile: the executable, or the compiler's out-of-memory message."""
  seconds: float
  executable: object = None
  oom: str = ""


def compile_step(prog) -> Compiled:
  start = time.perf_counter()
  try:
    with prog.activate():
      lowered = prog.jit_train_step().lower(prog.abstract_state(), prog.abstract_batch())
      executable = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return Compiled(time.perf_counter() - start, oom=str(e).splitlines()[0])
  return Compiled(time.perf_counter() - start, executable)


def _oom_bytes(message: str) -> float:
  """The bytes an out-of-memory message says the program needs ('... temporaries (31.35G) ...')."""
  m = re.search(r"\((\d+(?:\.\d+)?)([KMGT])\)", message)
  return float(m.group(1)) * 1024 ** ("KMGT".index(m.group(2)) + 1) if m else float("nan")


def memory(c: Compiled) -> dict:
  """Per-device bytes of the compiled step. Donated state aliases its outputs: counted once."""
  if c.oom:
    return {"total": _oom_bytes(c.oom)}
  m = c.executable.memory_analysis()
  parts = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
  parts["total"] = (parts["arguments"] + parts["outputs"] - parts["aliased"] +
                    parts["temporaries"] + parts["code"])
  return parts


def kernel_seconds(prog, hlo_text: str, flops_per_second: float) -> dict:
  """{kernel: seconds per step} for the Pallas/Mosaic kernels the step runs, which XLA's cost model
  leaves at zero: their FLOPs at an assumed rate. The splash kernels' FLOPs follow from the
  program's shapes (splash_seconds); the grouped matmuls' (MoE dropless) from the HLO's."""
  seconds = {name: flops / flops_per_second
             for name, flops in hlo.grouped_matmul_flops(hlo_text).items()}
  return seconds | splash_seconds(prog, hlo.kernel_calls(hlo_text), flops_per_second)


def splash_seconds(prog, calls: dict, flops_per_second: float) -> dict:
  """{kernel: seconds per step} of `calls` {splash kernel: executed count}: their FLOPs
  (spjax.model.attention.kernel_flops) for this program's rows and heads per device."""
  cfg, mesh, layout = prog.model_cfg, prog.mesh, prog.layout
  shards = lambda logical: math.prod(mesh.shape[a] for a in layout.axes_for(logical))
  rows = prog.config.per_device_batch_size * mesh.size // shards("batch")
  if sched := prog.pipeline:  # a pipeline's kernels run on one microbatch's rows per call
    rows = prog.config.per_device_batch_size * mesh.size // sched.microbatches // sched.batch_split
  heads = cfg.num_heads // shards("act_heads")
  # Context parallel (`length` sharded): a device holds 1/cp of each row's queries against all its
  # keys, and the load-balanced order gives every device the same 1/cp of the causal blocks.
  cp = shards("length")
  return {name: n * attention.kernel_flops(name, rows, heads, prog.config.seq_len, cfg.head_dim)
          / cp / flops_per_second for name, n in calls.items()}


def wraparound(topology: str) -> tuple[bool, bool, bool]:
  """Which dimensions of a slice have wraparound links, as Cloud TPU builds them: on the 3D tori
  (v4, v5p) all three once every dimension is a multiple of 4 (v5p-128 = 4x4x4 on up), on the 2D
  chips (v5e, v6e) a dimension of 16. get_topology_desc's default is none, a slice that does not
  exist at 4x4x4: there the compiler gathered FSDP weights with all-reduces."""
  try:
    dims = [int(d) for d in topology.split(":")[1].split("x")]
  except (IndexError, ValueError):
    raise ValueError(f"--topology={topology}: expected GENERATION:DIMS, e.g. v5p:4x4x4 or "
                     "v5e:4x4") from None
  if len(dims) == 3:
    return (all(d % 4 == 0 for d in dims),) * 3
  return tuple(d % 16 == 0 for d in dims) + (False,)


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of `num_slices` slices of `topology` ("v5p:4x4x4"), wraparound as on the real slice."""
  return topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices,
                                      wrap=wraparound(topology)).devices


def run(config, topology: str, num_slices: int, hlo_path: str | None = None,
        kernel_efficiency: float = 0.5) -> dict:
  if not 0 < kernel_efficiency <= 1:
    raise ValueError(f"--kernel_efficiency must be in (0, 1], got {kernel_efficiency}")
  chip = topology.split(":")[0]
  if chip not in CHIPS:
    raise ValueError(f"unknown TPU generation {chip!r} in --topology={topology}; known: "
                     f"{', '.join(CHIPS)}")
  devices = topology_devices(topology, num_slices)
  prog = program.build(config, devices)
  print(f"compiling the step for {topology} ...", file=sys.stderr, flush=True)
  real = compile_step(prog)

  chips = len(devices)
  peak = metrics.peak_flops_per_device(devices[0])
  tokens = prog.global_batch * config.seq_len
  model_flops = prog.flops_per_token() * tokens
  result = {
      "topology": topology, "num_slices": num_slices, "chips": chips,
      "device_kind": devices[0].device_kind, "peak_tflops_per_chip": peak / 1e12,
      "layout": prog.layout.source,
      "mesh": {a: s for a, s in prog.mesh.shape.items() if s > 1},
      "model": {k: config.model[k] for k in ("d_model", "num_layers", "num_heads", "num_kv_heads",
                                             "mlp_dim", "vocab_size", "scan_layers",
                                             "remat_policy", "dtype", "param_dtype")}
               | {"attention": prog.model_cfg.attention},  # "auto" resolved
      "params": prog.model_cfg.num_params(),
      "active_params": prog.model_cfg.num_active_params(),  # what a token uses (MoE: k experts)
      "lora_rank": config.lora.rank,  # 0: full fine-tuning (every param trains)
      "trainable_params": sum(p.size for p in jax.tree.leaves(
          nnx.filter_state(prog.abstract_params, prog.trainable))),
      "teacher_params": prog.teacher.model_cfg.num_params() if prog.teacher else 0,  # distill
      "per_device_batch_size": config.per_device_batch_size, "seq_len": config.seq_len,
      "grad_accum_steps": config.grad_accum_steps, "tokens_per_step": tokens,
      "hbm_gib_per_device": CHIPS[chip]["hbm"] / GIB,
      "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),  # compiler flags, if any
      "compile_seconds": real.seconds,
      "model_flops_per_step": model_flops,
      "estimate_method": "sum of XLA's per-op TPU cost-model cycles over the executed ops (loop "
                         "bodies once per iteration) / clock, max with collective bytes / ICI "
                         "bandwidth; an estimate, not a measurement",
  }
  sched = prog.pipeline
  result["pipeline"] = None if sched is None else {
      "stages": sched.stages, "microbatches": sched.microbatches, "repeats": sched.repeats,
      "layers_per_stage": sched.layers_per_stage, "iterations": sched.iterations,
      "bubble": sched.bubble}  # the schedule's idle share, already inside the cycle sum
  mem = memory(real)
  result["memory_gib_per_device"] = mem["total"] / GIB
  result["memory_breakdown_gib"] = {k: v / GIB for k, v in mem.items() if k != "total"}
  result["fits"] = not real.oom and mem["total"] <= CHIPS[chip]["hbm"]
  if real.oom:
    result["compile_error"] = real.oom
    result["estimated_step_seconds"] = result["estimated_mfu"] = None
    return result
  text = real.executable.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(text)
  coll = hlo.collectives(text)
  summed = hlo.cycle_sum(text)
  cycles = dict(summed.cycles)
  kernels = kernel_seconds(prog, text, peak * kernel_efficiency)
  cycles.update({f"kernel: {k}": s * CHIPS[chip]["clock"] for k, s in kernels.items()})
  compute = sum(cycles.values()) / CHIPS[chip]["clock"]
  comm = sum(_WIRE[k] * b for k, b in coll.bytes.items()) / CHIPS[chip]["ici"]
  step = max(compute, comm)
  top = sorted(cycles.items(), key=lambda kv: -kv[1])[:10]
  xla = hlo.xla_estimate(real.executable.cost_analysis().get("optimal_seconds"), text,
                         CHIPS[chip]["clock"])
  mfu = lambda seconds: model_flops / (seconds * chips * peak)
  result.update(
      collectives={"count": coll.count, "bytes_per_device": coll.bytes},
      kernel_seconds=kernels, kernel_efficiency=kernel_efficiency if kernels else None,
      compute_seconds=compute, collective_seconds_lower_bound=comm,
      estimated_step_seconds=step, estimated_mfu=mfu(step),
      estimated_tokens_per_second_per_chip=tokens / step / chips,
      # Ops the cost model gave no estimate (a sentinel such as INT64_MAX): left out of the sum
      # above, which is then a lower bound.
      cycle_sum_unestimated_ops=[{"op": op, "category": cat, "executions": n}
                                 for op, cat, n in summed.sentinels],
      cost_model_time_shares={k: v / sum(cycles.values()) for k, v in top},
      xla_estimate={"method": "compiled.cost_analysis()['optimal_seconds'], +1 s per custom call "
                              "it sums at -1 s (what MaxText users quote)",
                    "raw_optimal_seconds": xla.raw_seconds, "uncosted_custom_calls": xla.uncosted_calls,
                    "branch_correction_seconds": xla.branch_correction,
                    "step_seconds": xla.seconds, "mfu": mfu(xla.seconds) if xla.seconds else None,
                    "refused": xla.refusal or None})
  return result


def table(r: dict) -> str:
  m = r["model"]
  mesh = " x ".join(f"{a}={s}" for a, s in r["mesh"].items()) or "1 device"
  fit = "fits" if r["fits"] else "DOES NOT FIT"
  teacher = f", teacher {r['teacher_params'] / 1e9:.2f}B params" if r["teacher_params"] else ""
  lines = [
      f"{r['topology']} x{r['num_slices']} slice(s): {r['chips']} chips ({r['device_kind']}, "
      f"{r['peak_tflops_per_chip']:.0f} TFLOP/s bf16, {r['hbm_gib_per_device']:.0f} GiB HBM)",
      f"model {r['params'] / 1e9:.2f}B params ({r['active_params'] / 1e9:.2f}B active, "
      f"{r['trainable_params'] / 1e6:.1f}M trainable, LoRA rank {r['lora_rank']}{teacher}), "
      f"d_model {m['d_model']}, {m['num_layers']} layers, "
      f"scan_layers={m['scan_layers']}, remat={m['remat_policy']}, {m['attention']} attention; batch "
      f"{r['per_device_batch_size']}/device x {r['seq_len']} x {r['grad_accum_steps']} accum = "
      f"{r['tokens_per_step']:,} tokens/step",
      f"layout {r['layout']}, mesh {mesh}" + (f", LIBTPU_INIT_ARGS={r['libtpu_init_args']}"
                                              if r["libtpu_init_args"] else ""),
      *([f"{p['stages']} pipeline stages x {p['repeats']} repeats, {p['microbatches']} "
         f"microbatches: bubble {p['bubble']:.1%} of {p['iterations']} iterations (its idle "
         "compute is in the cycle sum)"] if (p := r["pipeline"]) else []),
      "",
      f"  compile time                     {r['compile_seconds']:10.1f} s",
      f"  memory per device                {r['memory_gib_per_device']:10.2f} GiB of "
      f"{r['hbm_gib_per_device']:.0f} GiB HBM: {fit}",
  ]
  lines += [f"    {k:<30} {v:10.2f} GiB" for k, v in r["memory_breakdown_gib"].items()]
  if "compile_error" in r:
    return "\n".join(lines + [f"  compiler: {r['compile_error']}"])
  lines += [
      f"  model FLOPs per step             {r['model_flops_per_step']:10.4g}",
      f"  ESTIMATE compute (cost model)    {r['compute_seconds']:10.4g} s",
      *(f"    of which Pallas {k:<20} {v:10.4g} s  (assumed {r['kernel_efficiency']:.0%} of peak)"
        for k, v in r["kernel_seconds"].items()),
      f"  ESTIMATE collectives (ICI, min)  {r['collective_seconds_lower_bound']:10.4g} s",
      f"  ESTIMATE step time (cycle sum)   {r['estimated_step_seconds']:10.4g} s",
      f"  ESTIMATE MFU (cycle sum)         {r['estimated_mfu']:10.3f}",
      f"  ESTIMATE tokens/s per chip       {r['estimated_tokens_per_second_per_chip']:10.0f}",
      *(f"    NOT SUMMED, no cost-model estimate: {u['op']} ({u['category']}) x{u['executions']}"
        for u in r["cycle_sum_unestimated_ops"]),
  ]
  x = r["xla_estimate"]
  if x["refused"]:
    lines.append(f"  XLA optimal_seconds              {'refused':>10}: {x['refused']}")
  else:
    lines += [f"  XLA optimal_seconds step time    {x['step_seconds']:10.4g} s  (raw "
              f"{x['raw_optimal_seconds']:.4g} s, +1 s for each of {x['uncosted_custom_calls']} "
              f"custom calls costed at -1 s, +{x['branch_correction_seconds']:.4g} s for "
              f"dropped conditional branches)",
              f"  XLA optimal_seconds MFU          {x['mfu']:10.3f}"]
  lines += [
      "  where the cost model spends the step (share of compute cycles):",
  ]
  lines += [f"    {k:<50} {v:6.1%}" for k, v in r["cost_model_time_shares"].items()]
  lines.append("  collectives (executed count, buffer bytes per device):")
  for k, n in r["collectives"]["count"].items():
    size = hlo.fmt_bytes(r["collectives"]["bytes_per_device"][k])
    lines.append(f"    {k:<20} {n:6d}  {size:>10}")
  return "\n".join(lines)


def compile_only_environment() -> None:
  """libtpu compiles for a described topology without TPU hardware; these stop it from asking a
  metadata server. Several compile-only processes may share one machine."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-16"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  jax.config.update("jax_platforms", "cpu")  # the default backend; TPU only as a compile target


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  compile_only_environment()
  try:
    result = run(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value, _DUMP_HLO.value,
                 _KERNEL_EFFICIENCY.value)
  except ValueError as e:
    print(f"aot_tpu: {e}", file=sys.stderr)
    sys.exit(2)
  print(table(result))
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  # Flags exist only when run as a script, so tests can import several tools' functions.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                            lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", None,
                                  "TPU topology, e.g. v5e:4x4, v5p:4x4x4, v4:2x2x2.")
  _NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology joined over DCN "
                                     "(config.mesh.dcn.* places axes across them).")
  _JSON = flags.DEFINE_string("json", None, "Also write the result here as JSON.")
  _DUMP_HLO = flags.DEFINE_string("dump_hlo", None, "Also write the compiled step's HLO text here.")
  _KERNEL_EFFICIENCY = flags.DEFINE_float(
      "kernel_efficiency", 0.5, "Fraction of peak FLOP/s assumed for Pallas kernels (splash "
      "attention), which the cost model does not cost.")
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
