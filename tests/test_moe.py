"""Mixture of experts: routing against a per-token loop, aux losses by hand, fsdp_ep like dp."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.convert import hf
from spjax.data import pipeline, tokenizer
from spjax.model import model as model_lib
from spjax.model import moe
from spjax.train import metrics, program
from spjax.train import step as step_lib

import residuals

E, K = 4, 2
MOE = dataclasses.replace(model_lib.SIZES["tiny"], num_experts=E, experts_per_token=K,
                          dtype="float32")


def layer_and_input(capacity_factor, seq_len=8):
  cfg = dataclasses.replace(MOE, capacity_factor=capacity_factor)
  layer = moe.MoE(cfg, nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(1), (2, seq_len, cfg.d_model), jnp.float32)
  segments = np.ones((2, seq_len), np.int32)
  segments[1, -3:] = 0  # padding at the end of row 1
  return cfg, layer, x, jnp.asarray(segments)


def forward(cfg, layer, x, segments):
  """(y [B, T, D], the layer's stats from the sums it returns)."""
  y, sums = layer(x, segments)
  return y, moe.layer_stats(cfg, sums)


def reference(cfg, layer, x, segments):
  """Token by token, in the capacity path's priority order: (output [B, T, D], dropped share)."""
  x, segments = np.asarray(x, np.float64), np.asarray(segments)
  w = {n: np.asarray(getattr(layer, n)[...], np.float64) for n in ("router", "gate", "up", "down")}
  b, t, _ = x.shape
  cap = moe.capacity(cfg, t) if cfg.capacity_factor > 0 else t * K
  out, kept, total = np.zeros_like(x), 0, 0
  for row in range(b):
    logits = x[row] @ w["router"]  # [T, E]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :K]  # [T, K]
    load = np.zeros(E, int)
    for choice in range(K):  # every first choice before any second choice
      for pos in range(t):
        if segments[row, pos] == 0:
          continue
        total += 1
        e = top[pos, choice]
        if load[e] >= cap:
          continue
        load[e] += 1
        kept += 1
        h = x[row, pos]
        silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
        y = (silu(h @ w["gate"][e]) * (h @ w["up"][e])) @ w["down"][e]
        out[row, pos] += probs[pos, e] / probs[pos, top[pos]].sum() * y
  return out, 1 - kept / total


@pytest.mark.parametrize("capacity_factor", [E / K, 0.0], ids=["capacity", "dropless"])
def test_forward_matches_a_per_token_loop(capacity_factor):
  cfg, layer, x, segments = layer_and_input(capacity_factor)
  if capacity_factor:
    assert moe.capacity(cfg, x.shape[1]) == x.shape[1]  # room for every token: nothing drops
  y, stats = forward(cfg, layer, x, segments)
  want, dropped = reference(cfg, layer, x, segments)
  np.testing.assert_allclose(y, want, atol=1e-5)
  assert dropped == 0 and float(stats["dropped_fraction"]) == 0
  assert not np.any(np.asarray(y)[1, -3:])  # padding goes to no expert


def test_small_capacity_drops_the_right_tokens():
  cfg, layer, x, segments = layer_and_input(0.5, seq_len=16)
  assert moe.capacity(cfg, 16) == 4
  y, stats = forward(cfg, layer, x, segments)
  want, dropped = reference(cfg, layer, x, segments)
  assert dropped > 0.1
  np.testing.assert_allclose(float(stats["dropped_fraction"]), dropped, rtol=1e-6)
  np.testing.assert_allclose(y, want, atol=1e-5)


def test_aux_losses_equal_the_hand_computation():
  cfg, layer, x, segments = layer_and_input(0.0)
  _, stats = forward(cfg, layer, x, segments)
  valid = np.asarray(segments).reshape(-1) > 0
  logits = (np.asarray(x, np.float64).reshape(-1, cfg.d_model) @
            np.asarray(layer.router[...], np.float64))[valid]  # [n, E], real tokens only
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1)[:, :K]
  share = np.bincount(top.reshape(-1), minlength=E) / top.size
  np.testing.assert_allclose(float(stats["lb_loss"]), E * np.sum(share * probs.mean(0)),
                             rtol=1e-5)
  z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(stats["z_loss"]), np.mean(z**2), rtol=1e-5)


def test_the_objective_adds_the_weighted_aux_losses():
  cfg = dataclasses.replace(MOE, moe_lb_loss_weight=0.5, moe_z_loss_weight=0.25)
  graphdef, params = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((2, 8), jnp.int32), "loss_mask": jnp.ones((2, 8)),
           "positions": jnp.broadcast_to(jnp.arange(8), (2, 8))}
  objective, (nll_sum, count, logged) = step_lib.loss_sums(params, graphdef, batch, None, 0.0,
                                                           1 / 16)
  assert set(logged) == {"moe_lb_loss", "moe_z_loss", "moe_dropped_fraction"}
  want = nll_sum / 16 + 0.5 * logged["moe_lb_loss"] + 0.25 * logged["moe_z_loss"]
  np.testing.assert_allclose(objective, want, rtol=1e-6)
  assert float(count) == 16 and float(logged["moe_lb_loss"]) >= 1.0 - 1e-6  # balanced is 1
  # The router learns from the objective (through the aux losses and the top-k weights).
  grads = jax.grad(lambda p: step_lib.loss_sums(p, graphdef, batch, None, 0.0, 1 / 16)[0])(params)
  assert float(jnp.abs(grads["blocks"]["mlp"]["router"][...]).max()) > 0


def test_interleaved_moe_layers_without_scan():
  cfg = dataclasses.replace(MOE, num_layers=4, moe_every=2, scan_layers=False)
  model = model_lib.Transformer(cfg, nnx.Rngs(0))
  assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE", "MLP", "MoE"]
  model(jnp.ones((1, 8), jnp.int32))
  assert set(model.moe_aux.get_value()) == set(moe.STATS)
  counted = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert cfg.num_params() == counted


def test_param_counts_and_flops_count_active_experts():
  counted = sum(v.size for v in jax.tree.leaves(
      nnx.state(model_lib.Transformer(MOE, nnx.Rngs(0)), nnx.Param)))
  assert MOE.num_params() == counted
  dense = model_lib.SIZES["tiny"]
  mlp = 3 * dense.d_model * dense.mlp_dim
  router = dense.d_model * E
  assert MOE.num_active_params() == dense.num_params() + dense.num_layers * ((K - 1) * mlp + router)
  extra = 6 * dense.num_layers * ((K - 1) * mlp + router)
  assert metrics.flops_per_token(MOE, 128) == metrics.flops_per_token(dense, 128) + extra


# ---------------------------------------------------------------------------------------------------
# Layouts: expert parallelism trains exactly like data parallelism
# ---------------------------------------------------------------------------------------------------


def step_hlo(prog) -> str:
  """The compiled train step's HLO text under prog's layout (8 simulated devices)."""
  with prog.activate():
    return prog.jit_train_step().lower(prog.abstract_state(),
                                       prog.abstract_batch()).compile().as_text()


def tiny_moe(layout, **overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"layout": layout, "model.dtype": "float32",
                                  "model.num_experts": E, "model.experts_per_token": K,
                                  **overrides})
  return cfg


def run(layout, steps=20, **overrides):
  """(losses, dropped fractions, initial params, state) of fp32 steps on embedded-corpus batches."""
  prog = program.build(tiny_moe(layout, seq_len=64, **overrides))  # short rows: a fast test
  batches = iter(pipeline.make_dataset(prog.config, "train", tokenizer.load(""),
                                       batch_size=prog.global_batch))
  with prog.activate():
    state = prog.jit_init()()
    init = jax.device_get(state["params"])
    step_fn, losses, dropped = prog.jit_train_step(), [], []
    for _ in range(steps):
      batch = {k: jax.device_put(v, prog.batch_sharding) for k, v in next(batches).items()}
      state, out = step_fn(state, batch)
      losses.append(float(out["loss"]))
      dropped.append(float(out["moe_dropped_fraction"]))
  return np.array(losses), np.array(dropped), init, state


# capacity_factor E / K: every expert has a slot for every token of the row, so nothing drops.
@pytest.mark.parametrize("capacity_factor", [E / K, 0.0], ids=["capacity", "dropless"])
def test_fsdp_ep_gives_the_dp_losses_and_init(capacity_factor):
  ref_losses, ref_dropped, ref_init, _ = run("dp", **{"model.capacity_factor": capacity_factor})
  losses, dropped, init, state = run("fsdp_ep", **{"model.capacity_factor": capacity_factor})
  jax.tree.map(np.testing.assert_array_equal, init, ref_init)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert not dropped.any() and not ref_dropped.any()
  assert ref_losses[-1] < ref_losses[0] - 0.5  # and it learns
  up = state["params"]["blocks"]["mlp"]["up"][...]  # [L, E, D, F]: experts over expert=2
  assert up.addressable_shards[0].data.shape == (2, E // 2, 128 // 4, 512)


GOLDEN_EP = {  # hand-written: the MoE tiny's parameters under fsdp_ep (trailing None dropped)
    "blocks/attn/q": (None, "fsdp"), "blocks/attn/k": (None, "fsdp"),
    "blocks/attn/v": (None, "fsdp"), "blocks/attn/o": (None, None, None, "fsdp"),
    "blocks/attn_norm/scale": (None, "fsdp"), "blocks/mlp_norm/scale": (None, "fsdp"),
    "blocks/mlp/router": (None, "fsdp"),
    "blocks/mlp/gate": (None, "expert", "fsdp"), "blocks/mlp/up": (None, "expert", "fsdp"),
    "blocks/mlp/down": (None, "expert", None, "fsdp"), "embed": (None, "fsdp"),
    "final_norm/scale": ("fsdp",), "unembed": ("fsdp",),
}


def trim(spec):
  entries = [tuple(e) if isinstance(e, list) else e for e in spec]
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


def test_fsdp_ep_places_experts_and_tokens_as_designed():
  prog = program.build(tiny_moe("fsdp_ep"))
  assert {a: s for a, s in prog.mesh.shape.items() if s > 1} == {"fsdp": 4, "expert": 2}
  placed = {"/".join(map(str, path)): trim(var.get_value().spec)
            for path, var in nnx.to_flat_state(prog.state_shardings["params"])}
  assert placed == GOLDEN_EP
  assert trim(prog.batch_sharding.spec) == (("data", "fsdp", "expert"),)
  # Inside the block the dispatched tokens [B, E, C, D] split by expert, the batch by the rest.
  with prog.activate():
    spec = jax.jit(lambda x: moe.constrain_dispatched(x, "act_embed")).lower(
        jax.ShapeDtypeStruct((16, E, 8, 128), jnp.float32)).compile().output_shardings.spec
  assert trim(spec) == ("fsdp", "expert")  # data (size 1) is dropped by the compiler


# ---------------------------------------------------------------------------------------------------
# Bad configs fail with a sentence naming the field
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,match", [
    ({"model.moe_every": 2}, "model.moe_every=2 needs model.scan_layers=False"),
    ({"model.experts_per_token": 5}, r"model.experts_per_token must be in \[1, model.num_experts"),
    ({"model.capacity_factor": -1.0}, "model.capacity_factor must be >= 0"),
    ({"model.num_experts": -2}, "model.num_experts must be >= 0"),
    ({"model.mlp_bias": True}, "model.mlp_bias is not supported"),
    ({"model.num_experts": 3, "mesh.ici.expert": 2}, r"model.num_experts \(3\) must be divisible"),
])
def test_bad_moe_configs_fail_before_compiling(overrides, match):
  with pytest.raises(ValueError, match=match):
    program.build(tiny_moe("fsdp_ep", **overrides))


def test_hf_export_writes_mixtral_and_refuses_what_it_cannot_express():
  assert hf.config_to_hf(MOE)["architectures"] == ["MixtralForCausalLM"]
  with pytest.raises(ValueError, match="MixtralForCausalLM needs model.moe_every=1"):
    hf.config_to_hf(dataclasses.replace(MOE, moe_every=2))


def test_training_logs_the_moe_stats(tmp_path):
  from spjax.train import loop
  cfg = tiny_moe("fsdp_ep", seq_len=32, num_train_steps=2, log_every_steps=1, eval_every_steps=2,
                 eval_batches=1, **{"model.capacity_factor": 1.0})
  loop.train_and_evaluate(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  assert len(rows) == 2
  for row in rows:
    assert row["train/moe_lb_loss"] >= 1.0 - 1e-6 and row["train/moe_z_loss"] > 0
    assert 0.0 <= row["train/moe_dropped_fraction"] < 1.0


def test_fsdp_ep_capacity_path_exchanges_tokens_by_all_to_all():
  # The dispatched slots go to their experts' shard and back by the explicit all-to-alls of
  # MoE._exchanged: two in the layer's forward, their two transposes in its backward, each moving
  # one device's [b, E, C, D] slots (left to GSPMD, the partitioner gathered tokens instead).
  from spjax.parallel import hlo
  seq = 32
  prog = program.build(tiny_moe("fsdp_ep", seq_len=seq, **{"model.capacity_factor": 1.0}))
  text = step_hlo(prog)
  exchanges = [line for line in text.splitlines()
               if " all-to-all(" in line and "shard_map/all_to_all" in line]
  assert len(exchanges) == 4  # in the scanned layer's body: once per MoE layer
  rows = prog.global_batch // prog.mesh.size
  slots = rows * E * moe.capacity(prog.model_cfg, seq) * prog.model_cfg.d_model * 4  # bytes
  for line in exchanges:
    assert hlo.shape_bytes(re.match(r"\s*%\S+ = (.*?) all-to-all\(", line).group(1)) == slots


@pytest.mark.parametrize("capacity_factor", [E / K, 0.0], ids=["capacity", "dropless"])
def test_save_dots_no_batch_keeps_the_experts_projections(capacity_factor):
  """The experts' gate and up outputs are named as a dense MLP's, so the policy keeps them (the
  dropless ones from inside the per-shard shard_map too); gradients are those of no remat."""
  def build(policy):
    return program.build(tiny_moe("fsdp", seq_len=32, **{  # unrolled: residuals print their names
        "model.capacity_factor": capacity_factor, "model.remat_policy": policy,
        "model.scan_layers": False}))
  prog = build("save_dots_no_batch")
  batch = {k: jax.device_put(v, prog.batch_sharding) for k, v in
           next(iter(pipeline.make_dataset(prog.config, "train", tokenizer.load(""),
                                           batch_size=prog.global_batch))).items()}
  def grads(prog):
    with prog.activate():
      params = prog.jit_init()()["params"]
      loss = lambda p: step_lib.loss_sums(p, prog.graphdef, batch, None, 0.0)[0]
      return jax.jit(prog._under_layout(jax.grad(loss)))(params), params, loss
  saved, params, loss = grads(prog)
  # fp32 rounding of each tensor's scale: recomputed products are fused differently
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max()),
               saved, grads(build("none"))[0])
  with prog.activate():
    kept = residuals.saved(prog._under_layout(loss), params)
  names = [r.name for r in kept if r.name]
  layers, f = prog.model_cfg.num_layers, prog.model_cfg.mlp_dim
  assert names.count("proj/q") == names.count("proj/k") == layers
  if capacity_factor:
    assert names.count("proj/gate") == names.count("proj/up") == layers
  else:  # what shard_map's body keeps leaves it as outputs: gate and up of every assignment
    assignments = prog.global_batch * 32 * K
    outputs = [r for r in kept if r.type == f"f32[{assignments},{f}]"
               and "output of shard_map" in r.line]
    assert len(outputs) == 2 * layers


def test_fsdp_ep_dropless_runs_each_expert_on_its_own_shard():
  # Expert parallel without a capacity: each device holds E / ep experts (their kernels gathered
  # over fsdp only), gathers its expert group's tokens and routing, runs its own experts on the
  # group's ep * n * k assignment rows, and a reduce-scatter over the group sums the outputs back.
  seq = 48
  prog = program.build(tiny_moe("fsdp_ep", seq_len=seq, **{"model.capacity_factor": 0.0}))
  text = step_hlo(prog)
  ep, rows = prog.mesh.shape["expert"], prog.global_batch // prog.mesh.size
  cfg = prog.model_cfg
  gathered = set(re.findall(r"= [fs]32\[([\d,]+)\]\{[\d,]+\} all-gather\(", text))
  assert f"1,{E // ep},{cfg.d_model},{cfg.mlp_dim}" in gathered  # one layer's gate / up
  assert not any(s.startswith(f"1,{E},") for s in gathered)  # never every expert
  assert {f"{ep * rows},{seq},{cfg.d_model}", f"{ep * rows},{seq},{K}"} <= gathered
  dots = set(re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} dot\(", text))
  assert (str(ep * rows * seq * K), str(cfg.mlp_dim)) in dots
  # The expert group is each pair of neighbouring devices; XLA spells those groups as a list
  # (jax 0.10), an iota ([4,2]<=[8]) or, from jax 0.12, the mesh and the axis it reduces over.
  n = prog.mesh.size
  pairs = "{" + ",".join("{%d,%d}" % (i, i + 1) for i in range(0, n, ep)) + "}"
  groups = (f"replica_groups={pairs},", f"replica_groups=[{n // ep},{ep}]<=[{n}],", "] {'expert'}, ")
  summed = [line for line in text.splitlines() if f"f32[{rows},{seq},{cfg.d_model}]" in line
            and " reduce-scatter(" in line and any(g in line for g in groups)]
  assert summed and ep == 2


def test_dropless_sorts_each_batch_shard_on_its_own_device():
  # Under fsdp over 8 devices each device runs the grouped matmuls on its own rows' n * k
  # assignments, not on the whole batch's N * k (what a global sort left to the partitioner did).
  prog = program.build(tiny_moe("fsdp", seq_len=48, **{"model.capacity_factor": 0.0}))
  text = step_hlo(prog)
  everyone = prog.global_batch * 48 * K  # N * k
  mine = everyone // prog.mesh.size
  f = prog.model_cfg.mlp_dim
  dots = set(re.findall(r"= f32\[(\d+),(\d+)\]\{1,0\} dot\(", text))
  assert (str(mine), str(f)) in dots  # the up/gate projections of the local assignments
  assert not any(int(rows) == everyone for rows, _ in dots)
  assert "sort(" in text and prog.mesh.size == 8
