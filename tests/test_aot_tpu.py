"""tools/aot_tpu.py compiles the real step for a small TPU topology on this CPU and estimates it."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import Mesh, NamedSharding, PartitionSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import aot_tpu  # noqa: E402  (tools/ is a folder of scripts, not a package)

from configs import default  # noqa: E402
from spjax.model import attention  # noqa: E402
from spjax.parallel import hlo  # noqa: E402
from spjax.train import metrics  # noqa: E402

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'): it is the TPU compiler the tool "
           "runs on this CPU; it installs only on Linux x86_64/aarch64")


def aot_tiny(tmp_path, *flags):
  out = tmp_path / "aot.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_tpu.py"),
       "--config=" + os.path.join(REPO, "configs", "default.py") + ":tiny", "--topology=v5e:2x2",
       f"--json={out}", *flags],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text())


@needs_libtpu
def test_tiny_on_v5e_2x2(tmp_path):
  proc, r = aot_tiny(tmp_path, "--config.layout=fsdp_tp", "--config.model.remat_policy=full")
  assert r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["layout"] == "fsdp_tp" and r["mesh"] == {"fsdp": 2, "tensor": 2}
  assert r["model"]["remat_policy"] == "full"
  assert r["model"]["attention"] == "splash" and r["kernel_seconds"]  # "auto" on TPU
  assert r["fits"] and 0 < r["memory_gib_per_device"] < r["hbm_gib_per_device"] == 16
  assert r["compile_seconds"] > 0
  cfg = default.get_config("tiny")
  tokens = cfg.per_device_batch_size * 4 * cfg.seq_len
  assert r["model_flops_per_step"] == metrics.flops_per_token(cfg.model, cfg.seq_len) * tokens
  assert r["estimated_step_seconds"] >= r["compute_seconds"] > 0 and 0 < r["estimated_mfu"] < 1
  assert r["cost_model_time_shares"] and r["collectives"]["count"]["all-gather"] > 0  # fsdp
  assert "ESTIMATE MFU (cycle sum)" in proc.stdout and "fits" in proc.stdout
  assert r["cycle_sum_unestimated_ops"] == []
  # Scanned layers are a while loop: XLA's optimal_seconds is refused, not printed as a step time.
  x = r["xla_estimate"]
  assert x["step_seconds"] is None and "while loop" in x["refused"] and x["raw_optimal_seconds"]
  assert "XLA optimal_seconds" in proc.stdout and "refused: " in proc.stdout


@needs_libtpu
@pytest.mark.parametrize("remat,forward_runs", [("full", 2), ("save_dots_no_batch", 1),
                                                ("save_projections", 2),
                                                ("save_projections_attention", 1)])
def test_splash_kernels_are_costed_per_executed_call(tmp_path, remat, forward_runs):
  # The Mosaic kernels compile for TPU here; the cost model leaves them at zero cycles, so the tool
  # charges their FLOPs at --kernel_efficiency. Under full remat the forward kernel runs twice per
  # layer (forward and recompute), inside the layer scan: the count must see through the loop.
  # The matmul policies keep the kernel's residuals, so it runs forward once; save_projections
  # does not keep them (less memory), so it runs twice; save_projections_attention keeps them.
  proc, r = aot_tiny(tmp_path, "--config.layout=tp", "--config.model.attention=splash",
                     f"--config.model.remat_policy={remat}", "--kernel_efficiency=0.25")
  cfg = default.get_config("tiny")
  rows, heads = cfg.per_device_batch_size * 4, cfg.model.num_heads // 4  # tp: tensor=4
  rate = 0.25 * r["peak_tflops_per_chip"] * 1e12
  one_call = {name: attention.kernel_flops(name, rows, heads, cfg.seq_len, cfg.model.head_dim) / rate
              for name in r["kernel_seconds"]}
  calls = {name.split("_")[2]: r["kernel_seconds"][name] / one_call[name] for name in one_call}
  assert calls == pytest.approx({"fwd": forward_runs * cfg.model.num_layers, "dq": cfg.model.num_layers,
                                 "dkv": cfg.model.num_layers})
  assert r["kernel_efficiency"] == 0.25 and "of which Pallas splash_mha_fwd" in proc.stdout


def test_out_of_memory_message_is_read_as_bytes():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (31.35G) exceeds available HBM (15.75G).")
  assert aot_tpu._oom_bytes(msg) == pytest.approx(31.35 * 1024**3)


# Both estimators on hand-made HLO with a known answer: a conditional whose costly branch holds a
# ConcatBitcast (costed -1 s by XLA), an op with the INT64_MAX "no estimate" sentinel, a costed op.
COND_HLO = """HloModule toy, is_scheduled=true

%skip (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %e = f32[2]{0} exponential(%p), backend_config={"estimated_cycles":"10"}
}

%update (q: f32[2]) -> f32[2] {
  %q = f32[2]{0} parameter(0)
  %l = f32[2]{0} log(%q), backend_config={"estimated_cycles":"30"}
  ROOT %c = f32[2]{0} custom-call(%l), custom_call_target="ConcatBitcast"
}

ENTRY %main (x: f32[2], ok: pred[], i: s32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %ok = pred[] parameter(1)
  %i = s32[2]{0} parameter(2)
  %g = f32[2]{0} gather(%x, %i), metadata={op_name="jit(f)/jvp()/take_along_axis"}, backend_config={"estimated_cycles":"9223372036854775807"}
  %m = f32[2]{0} multiply(%g, %g), backend_config={"estimated_cycles":"5"}
  ROOT %r = f32[2]{0} conditional(%ok, %m, %m), branch_computations={%skip, %update}
}
"""

STRAIGHT_HLO = """HloModule toy, is_scheduled=true

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %a = f32[2]{0} custom-call(%x), custom_call_target="ConcatBitcast"
  %b = f32[2]{0} custom-call(%a), custom_call_target="ConcatBitcast"
  ROOT %m = f32[2]{0} multiply(%b, %b), backend_config={"estimated_cycles":"5"}
}
"""


def test_cycle_sum_takes_the_costliest_branch_and_never_sums_a_sentinel():
  s = hlo.cycle_sum(COND_HLO)
  assert sum(s.cycles.values()) == 5 + 30  # entry multiply + the update branch; not skip's 10
  assert s.sentinels == [("g", "forward: take_along_axis", 1)]


def test_xla_estimate_adds_back_the_minus_one_second_custom_calls():
  x = hlo.xla_estimate(-1.25, STRAIGHT_HLO, clock=1e9)
  assert x.seconds == pytest.approx(0.75) and x.uncosted_calls == 2 and not x.refusal
  assert hlo.xla_estimate(None, STRAIGHT_HLO, clock=1e9).seconds is None


def test_xla_estimate_restores_the_branch_its_max_dropped():
  # At 100 cycles/s the update branch costs 0.3 s, under the 1 s its ConcatBitcast takes off, so
  # XLA's max kept the skip branch (0.1 s): the 0.2 s between them goes back on.
  x = hlo.xla_estimate(2.0, COND_HLO, clock=100)
  assert x.seconds == pytest.approx(2.2) and x.branch_correction == pytest.approx(0.2)
  assert x.uncosted_calls == 0  # the branch's call is not also added back as +1 s
  # At 10 cycles/s the update branch costs 3 s: it may have won the max after all. No number.
  x = hlo.xla_estimate(2.0, COND_HLO, clock=10)
  assert x.seconds is None and "conditional r" in x.refusal


# Two steps that differ in one matmul: B's backward matmul, fused with a side output, costs more.
def _step(backward_cycles: int) -> str:
  return f"""HloModule toy, is_scheduled=true

%side (p: bf16[4,8]) -> (bf16[4,8], f32[8]) {{
  %p = bf16[4,8]{{1,0}} parameter(0)
  %r = f32[8]{{0}} constant(0)
  ROOT %t = (bf16[4,8]{{1,0}}, f32[8]{{0}}) tuple(%p, %r)
}}

ENTRY %main (x: bf16[4,8]) -> (bf16[4,8], f32[8]) {{
  %x = bf16[4,8]{{1,0}} parameter(0)
  %f1 = bf16[4,8]{{1,0:T(8,128)}} multiply(%x, %x), metadata={{op_name="jit(f)/jvp(ab,bc->ac)/dot_general"}}, backend_config={{"estimated_cycles":"100"}}
  %f2 = bf16[2,8]{{1,0}} slice(%f1), slice={{[0:2], [0:8]}}, metadata={{op_name="jit(f)/jvp(ab,bc->ac)/dot_general"}}, backend_config={{"estimated_cycles":"7"}}
  ROOT %b = (bf16[4,8]{{1,0}}, f32[8]{{0}}) fusion(%f1), kind=kOutput, calls=%side, metadata={{op_name="jit(f)/transpose(jvp(ab,bc->ac))/dot_general"}}, backend_config={{"estimated_cycles":"{backward_cycles}"}}
}}
"""


def test_cycle_sum_buckets_by_op_and_output_shape_and_counts_executions():
  by_shape = hlo.cycle_sum(_step(40), key=hlo.op_and_shape).cycles
  assert by_shape == {"forward: dot_general ab,bc->ac bf16[4,8]": 100,
                      "forward: dot_general ab,bc->ac bf16[2,8]": 7,
                      "backward: dot_general ab,bc->ac bf16[4,8]": 40}  # a fusion's first output
  assert hlo.cycle_sum(_step(40)).cycles == {"forward: dot_general ab,bc->ac": 107,
                                              "backward: dot_general ab,bc->ac": 40}
  assert hlo.cycle_sum(_step(40)).executions == {"forward: dot_general ab,bc->ac": 2,
                                                 "backward: dot_general ab,bc->ac": 1}


def test_hlo_diff_puts_the_op_that_differs_first():
  import hlo_diff
  rows = hlo_diff.diff(_step(40), _step(70), "shape", clock=1e3)  # 1 kHz: a cycle is 1 ms
  assert rows[0] == ("backward: dot_general ab,bc->ac bf16[4,8]", 40.0, 1, 70.0, 1)
  assert {r[0]: r[3] - r[1] for r in rows[1:]} == {
      "forward: dot_general ab,bc->ac bf16[4,8]": 0, "forward: dot_general ab,bc->ac bf16[2,8]": 0}


@pytest.fixture(scope="module")
def tpu_env():
  """libtpu loads in this process without a TPU or its metadata server (compile only)."""
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-16"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)


@pytest.fixture(scope="module")
def tpu_compile(tpu_env):
  """fn(*shapes) -> (HLO text, optimal_seconds) compiled for one v5e chip, in this process."""
  from jax.experimental import topologies
  chip = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[:1]
  replicated = NamedSharding(Mesh(np.array(chip), ("x",)), PartitionSpec())

  def compile_(fn, *shapes):
    args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in shapes]
    c = jax.jit(fn).lower(*args).compile()
    return c.as_text(), c.cost_analysis().get("optimal_seconds")
  return compile_


MATRIX = ((512, 512), jnp.bfloat16)


@needs_libtpu
def test_cycle_sum_counts_a_loop_body_per_iteration(tpu_compile):
  def loop(n):
    return lambda a, b: jax.lax.fori_loop(0, n, lambda i, x: x @ b, a)
  totals = [sum(hlo.cycle_sum(tpu_compile(loop(n), MATRIX, MATRIX)[0]).cycles.values())
            for n in (8, 16, 24)]
  assert totals[1] - totals[0] == totals[2] - totals[1] > 0  # 8 more iterations, 8 more bodies


@needs_libtpu
def test_xla_estimate_on_compiled_programs(tpu_compile):
  text, raw = tpu_compile(lambda a, b: (a @ b) @ b, MATRIX, MATRIX)
  assert raw > 0 and hlo.xla_estimate(raw, text, 1.5e9).seconds == raw  # nothing to correct
  # A conditional without -1 s calls: XLA's max over branches stands, and so does the cycle
  # sum's, which counts the two-matmul branch and not both.
  text, raw = tpu_compile(lambda a, b, p: jax.lax.cond(p, lambda: a @ b, lambda: a @ b @ b),
                          MATRIX, MATRIX, ((), jnp.bool_))
  assert hlo.xla_estimate(raw, text, 1.5e9).seconds == raw
  one, two = (sum(hlo.cycle_sum(tpu_compile(f, MATRIX, MATRIX)[0]).cycles.values())
              for f in (lambda a, b: a @ b, lambda a, b: a @ b @ b))
  assert two <= sum(hlo.cycle_sum(text).cycles.values()) < one + two
  text, raw = tpu_compile(lambda a, b: jax.lax.fori_loop(0, 8, lambda i, x: x @ b, a),
                          MATRIX, MATRIX)
  x = hlo.xla_estimate(raw, text, 1.5e9)
  assert x.seconds is None and "while loop" in x.refusal

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2
  double = lambda a: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(a.shape, a.dtype))(a)
  text, raw = tpu_compile(lambda a: double(a) @ a, MATRIX)
  x = hlo.xla_estimate(raw, text, 1.5e9)
  assert x.seconds is None and "Pallas" in x.refusal


def test_wraparound_is_that_of_the_real_slices():
  assert aot_tpu.wraparound("v5p:4x4x4") == aot_tpu.wraparound("v4:4x4x8") == (True,) * 3
  assert aot_tpu.wraparound("v5p:2x4x4") == aot_tpu.wraparound("v4:2x2x1") == (False,) * 3
  assert aot_tpu.wraparound("v5e:16x16") == (True, True, False)
  assert aot_tpu.wraparound("v5e:8x16") == (False, True, False)
  assert aot_tpu.wraparound("v5e:4x4") == (False,) * 3
  for bad in ("v5p", "v5p:4x4xq"):
    with pytest.raises(ValueError, match="expected GENERATION:DIMS"):
      aot_tpu.wraparound(bad)


@needs_libtpu
def test_fsdp_weights_are_all_gathered_on_the_v5p_torus(tpu_env):
  # On v5p:4x4x4 (wraparound on) the compiler all-gathers an fsdp-sharded weight when the mesh's
  # fsdp axis runs in spjax's (physical) device order; in jax.devices() order it all-reduced a
  # zero-padded copy instead (the 7B's gathers, before; BENCHMARKS.md).
  import ml_collections
  from spjax.parallel import layouts, sharding
  devices = aot_tpu.topology_devices("v5p:4x4x4")
  zeros = {a: 0 for a in sharding.MESH_AXES}
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"ici": zeros, "dcn": dict(zeros)}),
                            layouts.parse("fsdp"), devices)
  assert mesh.shape["fsdp"] == 64

  def collectives(m):
    w = jax.ShapeDtypeStruct((512, 1024), jnp.float32,
                             sharding=NamedSharding(m, PartitionSpec("fsdp", None)))
    x = jax.ShapeDtypeStruct((64, 128, 512), jnp.bfloat16,
                             sharding=NamedSharding(m, PartitionSpec("fsdp")))
    text = jax.jit(lambda w, x: x @ w.astype(x.dtype)).lower(w, x).compile().as_text()
    return re.findall(r" (all-gather|all-reduce|reduce-scatter)(?:-start)?\(", text)
  assert collectives(mesh) == ["all-gather"]
  as_listed = Mesh(np.array(devices).reshape(mesh.devices.shape), mesh.axis_names)
  assert collectives(as_listed) == ["all-reduce"]


@needs_libtpu
def test_embedding_gradient_moves_between_layouts_in_bf16_under_fsdp(tpu_env, monkeypatch):
  # Under fsdp the lookup's rows come out split by `embed` and go to the batch layout; the
  # backward all-to-all that moves their gradient back is bf16 since the model pins the rows
  # right after the bf16 cast (spjax/model/model.py). Unpinned, the TPU compiler moved float32.
  from spjax.model import model as model_lib
  from spjax.train import program
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"layout": "fsdp", "seq_len": 128, "model.attention": "xla"})

  def all_to_all_types():
    prog = program.build(cfg, aot_tpu.topology_devices("v5e:2x2"))
    with prog.activate():
      text = prog.jit_train_step().lower(prog.abstract_state(),
                                         prog.abstract_batch()).compile().as_text()
    return {t for t in re.findall(r"= (bf16|f32)\[[^ ]* all-to-all(?:-start)?\(", text)}
  assert all_to_all_types() == {"bf16"}
  monkeypatch.setattr(model_lib, "_lookup_splits_embed", lambda: False)
  assert "f32" in all_to_all_types()  # the control: without the pin the move is float32


def test_context_parallel_kernels_are_charged_their_share_of_each_row():
  # fsdp_sp on 8 devices: batch over fsdp=4, length over sequence=2. A device holds half of the
  # queries of each of its rows, and the balanced order gives it half of each row's causal blocks.
  from spjax.train import program
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"layout": "fsdp_sp", "seq_len": 256})
  prog = program.build(cfg)
  rows = cfg.per_device_batch_size * 8 // 4
  full_rows = attention.kernel_flops("splash_mha_fwd", rows, cfg.model.num_heads, 256,
                                     cfg.model.head_dim)
  seconds = aot_tpu.splash_seconds(prog, {"splash_mha_fwd": 3}, flops_per_second=1.0)
  assert seconds["splash_mha_fwd"] == pytest.approx(3 * full_rows / 2)


@needs_libtpu
def test_pipeline_schedule_and_tokens_per_chip_are_reported(tmp_path):
  # fsdp_pp on 4 chips: 2 stages x 2 fsdp, 4 layers, 4 microbatches -> bubble 1 / (4 + 1).
  proc, r = aot_tiny(tmp_path, "--config.layout=fsdp_pp", "--config.mesh.ici.stage=2",
                     "--config.model.num_layers=4", "--config.pipeline.microbatches=4")
  assert r["mesh"] == {"fsdp": 2, "stage": 2}
  assert r["pipeline"] == {"stages": 2, "microbatches": 4, "repeats": 1, "layers_per_stage": 2,
                           "iterations": 5, "bubble": pytest.approx(0.2)}
  assert "bubble 20.0% of 5 iterations" in proc.stdout
  assert r["collectives"]["count"]["collective-permute"] > 0  # activations passed stage to stage
  assert r["estimated_tokens_per_second_per_chip"] == pytest.approx(
      r["tokens_per_step"] / r["estimated_step_seconds"] / r["chips"])


@needs_libtpu
def test_moe_flops_count_active_parameters(tmp_path):
  # 4 experts, top-2 under fsdp_ep: the model FLOPs (and so MFU) are those of the 2 experts a
  # token visits, not of all 4.
  _, r = aot_tiny(tmp_path, "--config.layout=fsdp_ep", "--config.model.num_experts=4",
                  "--config.model.experts_per_token=2", "--config.model.capacity_factor=1.25")
  cfg = default.get_config("tiny")
  m = cfg.model
  mlp = 3 * m.d_model * m.mlp_dim
  assert r["params"] - r["active_params"] == m.num_layers * 2 * mlp  # 2 experts a token skips
  assert r["pipeline"] is None and r["collectives"]["count"]["all-to-all"] > 0
  cfg.model.num_experts, cfg.model.experts_per_token = 4, 2
  tokens = r["tokens_per_step"]
  assert r["model_flops_per_step"] == metrics.flops_per_token(cfg.model, cfg.seq_len) * tokens
  dense = default.get_config("tiny").model
  extra = 6 * m.num_layers * (mlp + m.d_model * 4)  # one more expert's MLP and the router
  assert r["model_flops_per_step"] == (metrics.flops_per_token(dense, cfg.seq_len) + extra) * tokens


@needs_libtpu
def test_dropless_grouped_matmuls_are_costed_from_their_shapes(tmp_path):
  # jax.lax.ragged_dot becomes Mosaic kernels on TPU. Under fsdp over 4 chips each device sorts
  # its own rows' assignments (n = rows * T * k) and runs, per layer, gate, up and down forward,
  # again in full remat's recompute, and once more for their inputs' gradients: 9 grouped
  # matmuls of 2 n D F FLOPs each (the weight gradients are ordinary XLA ops, costed by XLA).
  proc, r = aot_tiny(tmp_path, "--config.layout=fsdp", "--config.model.num_experts=4",
                     "--config.model.capacity_factor=0", "--config.model.remat_policy=full",
                     "--kernel_efficiency=0.5")
  m, cfg = default.get_config("tiny").model, default.get_config("tiny")
  n = cfg.per_device_batch_size * cfg.seq_len * m.experts_per_token
  rate = 0.5 * r["peak_tflops_per_chip"] * 1e12
  flops = r["kernel_seconds"]["ragged-dot-none"] * rate
  assert flops == pytest.approx(m.num_layers * 9 * 2 * n * m.d_model * m.mlp_dim)
  assert "ragged-dot-metadata" not in r["kernel_seconds"] and r["estimated_step_seconds"] > 0
