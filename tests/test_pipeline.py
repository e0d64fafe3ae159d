"""Pipeline parallelism: the pipelined stack is the sequential stack; pp layouts train as dp does."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.model import model as model_lib
from spjax.parallel import pipeline
from spjax.train import loop as train
from spjax.train import program
from spjax.train import step as step_lib
import residuals
from test_train import read_metrics, run_layout


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict(overrides)
  return cfg


def packed_batch(rows: int, seq_len: int, vocab: int):
  """Random tokens, two documents per row (cut at a different place in each row) and padding, so
  rows that changed places inside the pipeline would show in the outputs."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, vocab, (rows, seq_len + 1))
  cut = rng.integers(4, seq_len - 8, rows)[:, None]
  t = np.arange(seq_len)[None]
  segments = np.where(t < cut, 1, 2) * (t < seq_len - 3)  # the last 3 slots are padding
  positions = np.where(t < cut, t, t - cut)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
          "positions": positions, "loss_mask": segments > 0}


@pytest.mark.parametrize("repeats,microbatches,remat", [(1, 8, "none"), (2, 4, "full")])
def test_pipelined_stack_equals_the_sequential_stack(repeats, microbatches, remat):
  cfg = tiny(layout="pp", **{"model.num_layers": 8, "model.dtype": "float32", "mesh.ici.stage": 4,
                             "pipeline.repeats": repeats, "pipeline.microbatches": microbatches,
                             "model.remat_policy": remat})
  prog = program.build(cfg)
  assert prog.pipeline.layers_per_stage == 8 // (4 * repeats)
  params = nnx.state(model_lib.Transformer(prog.model_cfg, nnx.Rngs(0)), nnx.Param)
  batch = {k: jnp.asarray(v, jnp.int32)
           for k, v in packed_batch(prog.global_batch, 32, cfg.model.vocab_size).items()}

  def logits_and_grads(params, batch):
    model = nnx.merge(prog.graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    grads, _ = jax.grad(step_lib.loss_sums, has_aux=True)(params, prog.graphdef, batch, None, 0.0)
    return logits, grads

  sequential = jax.jit(logits_and_grads)(params, batch)  # no mesh, no pipeline: the plain scan
  with prog.activate():
    args = (jax.device_put(params, prog.state_shardings["params"]),
            jax.device_put(batch, prog.batch_sharding))
    compiled = jax.jit(prog._under_layout(logits_and_grads)).lower(*args).compile()
    pipelined, text = compiled(*args), compiled.as_text()
  np.testing.assert_allclose(pipelined[0], sequential[0], rtol=1e-5, atol=1e-5)
  # Gradients sum over microbatches in another order than one batched matmul: equal to fp32
  # rounding of each tensor's scale.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()),
               pipelined[1], sequential[1])
  assert "collective-permute" in text  # the shift between stages


# Pipeline stages with the experts also split over `expert` (expert parallelism inside each stage).
PP_EP = "batch:stage,data,fsdp,expert;expert:expert;layers:stage;embed:fsdp"


@pytest.mark.parametrize("layout,capacity_factor", [
    ("pp", 2.0), ("fsdp_pp", 0.0), (PP_EP, 2.0), (PP_EP, 0.0)],
    ids=["pp-capacity", "fsdp_pp-dropless", "pp_ep-capacity", "pp_ep-dropless"])
def test_moe_layers_in_the_pipeline_equal_the_sequential_stack(layout, capacity_factor):
  """MoE layers as pipeline stages: each layer's routing sums add up over the microbatches that
  pass it, so the load-balance and z losses, the dropped share, the objective and its gradients
  are the whole batch's, as in the sequential stack (capacity 2.0 = E / k: nothing drops)."""
  ep = layout == PP_EP
  cfg = tiny(layout=layout, **{
      "model.num_layers": 8, "model.dtype": "float32", "mesh.ici.stage": 2 if ep else 4,
      "pipeline.repeats": 2, "pipeline.microbatches": 4, "model.remat_policy": "full",
      "model.num_experts": 4, "model.experts_per_token": 2,
      "model.capacity_factor": capacity_factor} | (
          {"mesh.ici.expert": 2, "mesh.ici.fsdp": 2} if ep else {}))
  prog = program.build(cfg)
  params = nnx.state(model_lib.Transformer(prog.model_cfg, nnx.Rngs(0)), nnx.Param)
  batch = {k: jnp.asarray(v, jnp.int32)
           for k, v in packed_batch(prog.global_batch, 32, cfg.model.vocab_size).items()}

  def objective(params, batch):  # the aux losses weigh 1 here: their gradients show
    (obj, (_, _, logged)), grads = jax.value_and_grad(step_lib.loss_sums, has_aux=True)(
        params, prog.graphdef, batch, None, 0.0, 1 / 256)
    return obj, logged, grads

  sequential = jax.jit(objective)(params, batch)
  with prog.activate():
    args = (jax.device_put(params, prog.state_shardings["params"]),
            jax.device_put(batch, prog.batch_sharding))
    compiled = jax.jit(prog._under_layout(objective)).lower(*args).compile()
    pipelined, text = compiled(*args), compiled.as_text()
  np.testing.assert_allclose(pipelined[0], sequential[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), pipelined[1],
               sequential[1])
  assert float(sequential[1]["moe_lb_loss"]) > 0 and float(sequential[1]["moe_z_loss"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()),
               pipelined[2], sequential[2])
  if ep:  # the stage's experts exchange tokens with their expert shard (moe.py's shard_map)
    op = " all-to-all(" if capacity_factor else " reduce-scatter("
    assert any(op in line and "shard_map" in line for line in text.splitlines())


def test_save_dots_no_batch_keeps_the_projections_inside_the_pipeline():
  """The stage vmap gives every matmul a batch dimension; the policy picks the projections by
  name, so each iteration still keeps q, k, v, gate and up of every layer of every stage."""
  cfg = tiny(layout="pp", **{"model.num_layers": 8, "model.dtype": "float32", "mesh.ici.stage": 4,
                             "pipeline.microbatches": 8, "model.remat_policy": "save_dots_no_batch"})
  prog = program.build(cfg)
  m, sched = prog.model_cfg, prog.pipeline
  with prog.activate():
    loss = lambda p, batch: step_lib.loss_sums(p, prog.graphdef, batch, None, 0.0)[0]
    kept = residuals.saved(prog._under_layout(loss), prog.abstract_state()["params"],
                           prog.abstract_batch())
  # per iteration, layer of the stage, stage, microbatch row and position: f32[11,2,4,2,128,...]
  lead = (sched.iterations, sched.layers_per_stage, sched.stages,
          prog.global_batch // sched.microbatches, cfg.seq_len)
  kept = sorted(r.shape[len(lead):] for r in kept
                if r.dtype == "f32" and r.shape[:len(lead)] == lead)
  heads, kv = (m.num_heads, m.head_dim), (m.num_kv_heads, m.head_dim)
  # besides each layer's input (d_model wide): q, k, v and the MLP's gate and up
  assert kept == sorted([heads, kv, kv, (m.mlp_dim,), (m.mlp_dim,), (m.d_model,)])


def test_pipeline_without_a_mesh_and_its_dropout():
  """The transform alone, on one device: equal to the scan in eval; with dropout every layer and
  microbatch draws its own mask from the step's key, so a key gives one answer."""
  cfg = dataclasses.replace(model_lib.ModelConfig.from_config(tiny().model), dtype="float32")
  sched = pipeline.Schedule(stages=2, microbatches=4, repeats=1, layers_per_stage=1, batch_split=1,
                            inner_rules=())
  batch = packed_batch(8, 16, 1024)
  def forward(cfg, key):
    model = model_lib.Transformer(cfg, nnx.Rngs(0))
    return model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=key)
  def pipelined(cfg, key):
    with pipeline.scope(sched):
      return jax.jit(forward, static_argnums=0)(cfg, key)
  np.testing.assert_allclose(pipelined(cfg, None), forward(cfg, None), rtol=1e-5, atol=1e-5)
  dropped = dataclasses.replace(cfg, dropout_rate=0.2)
  a, b = pipelined(dropped, jax.random.key(1)), pipelined(dropped, jax.random.key(2))
  np.testing.assert_array_equal(a, pipelined(dropped, jax.random.key(1)))
  assert not np.allclose(a, b) and not np.allclose(a, pipelined(cfg, None))


@pytest.fixture(scope="module")
def dp8_run():
  return run_layout("dp", **{"model.num_layers": 8})


@pytest.mark.parametrize("layout,overrides", [
    ("pp", {"mesh.ici.stage": 4, "pipeline.microbatches": 8}),
    ("fsdp_pp", {"mesh.ici.stage": 4, "pipeline.microbatches": 8}),
    # Stages across two (simulated) slices, each stage holding two slices of the stack.
    ("pp", {"mesh.dcn.stage": 2, "mesh.ici.stage": 1, "pipeline.repeats": 2,
            "pipeline.microbatches": 4}),
])
def test_pipeline_layouts_give_the_dp_losses_and_init(dp8_run, layout, overrides):
  losses, params, state = run_layout(layout, **{"model.num_layers": 8}, **overrides)
  ref_losses, ref_params, _ = dp8_run
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  q = state["params"]["blocks"]["attn"]["q"][...]
  stages = overrides["mesh.ici.stage"] * overrides.get("mesh.dcn.stage", 1)
  fsdp = 2 if layout == "fsdp_pp" else 1
  assert q.addressable_shards[0].data.shape == (8 // stages, 128 // fsdp, 8, 16)


def trim(spec):
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


# Hand-written, as tests/test_sharding.py's GOLDEN: the stack's "layers" axis over stage, and in
# fsdp_pp every weight's d_model over fsdp as under fsdp.
GOLDEN = {
    "pp": {"blocks/attn/q": ("stage",), "blocks/attn/k": ("stage",), "blocks/attn/v": ("stage",),
           "blocks/attn/o": ("stage",), "blocks/attn_norm/scale": ("stage",),
           "blocks/mlp_norm/scale": ("stage",), "blocks/mlp/gate": ("stage",),
           "blocks/mlp/up": ("stage",), "blocks/mlp/down": ("stage",), "embed": (),
           "final_norm/scale": (), "unembed": ()},
    "fsdp_pp": {
        "blocks/attn/q": ("stage", "fsdp"), "blocks/attn/k": ("stage", "fsdp"),
        "blocks/attn/v": ("stage", "fsdp"), "blocks/attn/o": ("stage", None, None, "fsdp"),
        "blocks/attn_norm/scale": ("stage", "fsdp"), "blocks/mlp_norm/scale": ("stage", "fsdp"),
        "blocks/mlp/gate": ("stage", "fsdp"), "blocks/mlp/up": ("stage", "fsdp"),
        "blocks/mlp/down": ("stage", None, "fsdp"), "embed": (None, "fsdp"),
        "final_norm/scale": ("fsdp",), "unembed": ("fsdp",)},
}
MESHES = {"pp": {"data": 4, "stage": 2}, "fsdp_pp": {"fsdp": 4, "stage": 2}}


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_pipeline_preset_places_every_parameter_as_designed(preset):
  prog = program.build(tiny(layout=preset))
  assert {a: s for a, s in prog.mesh.shape.items() if s > 1} == MESHES[preset]
  placed = {"/".join(map(str, path)): trim(var.get_value().spec)
            for path, var in nnx.to_flat_state(prog.state_shardings["params"])}
  assert placed == GOLDEN[preset]
  assert prog.batch_sharding.spec[0] == ("stage", "data", "fsdp")  # stage is a batch axis outside
  assert prog.pipeline.describe() == ("pipeline: 2 stages x 1 repeats, 1 layers per stage, 2 "
                                      "microbatches; bubble 1/3 iterations = 33.3%")


@pytest.mark.parametrize("overrides,needle", [
    ({"model.num_layers": 6}, r"model.num_layers \(6\) is not divisible by the pipeline's stages x "
                              r"config.pipeline.repeats \(4 x 1 = 4\)"),
    ({"pipeline.repeats": 3}, r"model.num_layers \(8\) is not divisible .* \(4 x 3 = 12\)"),
    ({"pipeline.microbatches": 6}, r"config.pipeline.microbatches \(6\) must be a multiple of the "
                                   r"pipeline's 4 stages"),
    ({"pipeline.microbatches": 12}, r"the batch of 16 rows \(config.per_device_batch_size 2 x 8 "
                                    r"devices\) is not divisible by config.pipeline.microbatches"),
    ({"pipeline.microbatches": 16}, r"has 1 rows, which do not split over the batch's other mesh "
                                    r"axes \(data=2"),
    ({"pipeline.repeats": 0}, r"config.pipeline.repeats must be >= 1"),
    ({"model.scan_layers": False}, r"needs model.scan_layers=True"),
    ({"layout": "batch:data,stage;layers:stage"}, r"the 'batch' rule must start with it"),
    ({"layout": "batch:stage,data;layers:stage;embed:stage"}, r"maps 'embed' to 'stage'"),
])
def test_pipeline_config_errors_name_the_field(overrides, needle):
  cfg = tiny(**{"layout": "pp", "model.num_layers": 8, "mesh.ici.stage": 4} | overrides)
  with pytest.raises(ValueError, match=needle):
    program.build(cfg)


def test_pipeline_schedule_is_none_without_layers_on_stage():
  prog = program.build(tiny(layout="fsdp"))
  assert prog.pipeline is None and pipeline.current() is None


def test_a_run_saved_under_fsdp_pp_resumes_under_fsdp_and_back(tmp_path, capsys):
  """Checkpoints hold the canonical [layers, ...] stack: changing layout mid-run changes nothing."""
  common = {"model.num_layers": 4, "model.dtype": "float32", "log_every_steps": 1,
            "eval_every_steps": 100, "eval_batches": 1, "checkpoint_every_steps": 2}
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(tiny(layout="fsdp", num_train_steps=6, **common), ref)
  run = str(tmp_path / "run")
  for layout, steps in (("fsdp_pp", 2), ("fsdp", 4), ("fsdp_pp", 6)):
    train.train_and_evaluate(tiny(layout=layout, num_train_steps=steps, **common), run)
  assert "bubble 1/3 iterations" in capsys.readouterr().out  # the banner states the schedule
  curve = lambda w: {m["step"]: m["train/loss"] for m in read_metrics(w) if "train/loss" in m}
  resumed, straight = curve(run), curve(ref)
  assert sorted(resumed) == list(range(1, 7))
  np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                             [straight[s] for s in range(1, 7)], rtol=1e-5)


def test_layout_report_shows_stages_and_the_shifts_between_them():
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tools"))
  import layout_report  # noqa: E402  (tools/ is a folder of scripts)
  prog = program.build(tiny(layout="pp", **{"model.num_layers": 4, "pipeline.repeats": 2}))
  r = layout_report.report(prog)
  # Activations move stage to stage every iteration, forward and backward.
  assert r["collectives"].count["collective-permute"] >= 2 * prog.pipeline.iterations
  text = layout_report.format_one(prog, r)
  assert "pipeline: 2 stages x 2 repeats, 1 layers per stage, 2 microbatches" in text
  assert "stage 0: layers [0, 2]" in text and "stage 1: layers [1, 3]" in text
  assert "(layers, embed, heads, head_dim)" in text and "(stage, None, None, None)" in text
