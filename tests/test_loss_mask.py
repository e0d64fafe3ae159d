"""The batch's loss_mask: masked targets weigh nothing, the count spans the global batch, and
pretraining batches (all-ones mask on real tokens) give the loss the segment ids gave before."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import default
from spjax.data import pipeline, tokenizer
from spjax.train import program
from spjax.train import step as step_lib


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"model.dtype": "float32", **overrides})
  return cfg


def hand_batch(prog, seed=0):
  """Random tokens, two documents per row, and a mask that trains only part of each."""
  b, t = prog.global_batch, prog.config.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, prog.model_cfg.vocab_size, (b, t + 1), dtype=np.int32)
  segment_ids = np.where(np.arange(t) < t // 2, 1, 2).astype(np.int32)[None].repeat(b, 0)
  segment_ids[:, -5:] = 0  # padding
  positions = np.where(segment_ids == 2, np.arange(t) - t // 2, np.arange(t)) * (segment_ids > 0)
  loss_mask = (rng.random((b, t)) < 0.4) & (segment_ids > 0)
  loss_mask[0] = False  # a row with nothing trained (a prompt longer than the row, say)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
          "positions": positions.astype(np.int32), "loss_mask": loss_mask.astype(np.int32)}


def put(prog, batch):
  return {k: jax.device_put(v, prog.batch_sharding) for k, v in batch.items()}


def reference_masked_ce(prog, params, batch):
  """Cross-entropy of the trained targets, by optax, averaged over their number."""
  import optax
  model = nnx.merge(prog.graphdef, params)
  logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["targets"]))
  mask = jnp.asarray(batch["loss_mask"], jnp.float32)
  return float(jnp.sum(ce * mask) / jnp.sum(mask))


def test_loss_is_the_masked_cross_entropy_and_ignores_masked_targets():
  prog = program.build(tiny(layout="dp"))
  batch = hand_batch(prog)
  with prog.activate():
    state = prog.jit_init()()
    params = jax.device_get(state["params"])
    eval_step = prog.jit_eval_step()
    sums = jax.device_get(eval_step(state["params"], put(prog, batch)))
    assert sums["tokens"] == batch["loss_mask"].sum()
    np.testing.assert_allclose(sums["nll_sum"] / sums["tokens"],
                               reference_masked_ce(prog, params, batch), rtol=1e-5)
    # Any other target where the mask is 0: the loss and the update are exactly the same.
    changed = dict(batch, targets=np.where(batch["loss_mask"] == 1, batch["targets"],
                                           (batch["targets"] + 7) % prog.model_cfg.vocab_size))
    assert (changed["targets"] != batch["targets"]).any()
    train_step = prog.jit_train_step()
    out = []
    for b in (batch, changed):
      s, m = train_step(prog.jit_init()(), put(prog, b))
      out.append((jax.device_get(s["params"]), float(m["loss"])))
    assert out[0][1] == out[1][1]
    jax.tree.map(np.testing.assert_array_equal, out[0][0], out[1][0])


def test_microbatches_divide_by_the_trained_tokens_of_the_whole_batch():
  # One batch of 32 rows with uneven masks, as one step and as 2 accumulated microbatches of 16.
  whole = program.build(tiny(layout="fsdp", per_device_batch_size=4))
  accum = program.build(tiny(layout="fsdp", per_device_batch_size=2, grad_accum_steps=2))
  batch = hand_batch(whole, seed=3)
  results = []
  for prog in (whole, accum):
    with prog.activate():
      state, metrics = prog.jit_train_step()(prog.jit_init()(), put(prog, batch))
      results.append((float(metrics["loss"]), jax.device_get(state["params"])))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7),
               results[1][1], results[0][1])


def test_pretraining_loss_is_bit_identical_to_the_segment_id_mask():
  """The loss before loss_mask existed, computed from segment_ids: the same bits on real batches."""
  cfg = tiny(layout="fsdp", grad_accum_steps=2, per_device_batch_size=1)
  prog = program.build(cfg)

  def segment_id_loss(params, batch):  # the former step.loss_sums, kept here as the reference
    logits = nnx.merge(prog.graphdef, params)(batch["inputs"], batch["positions"],
                                              batch["segment_ids"])
    mask = (batch["segment_ids"] > 0).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target) * mask), jnp.sum(mask)

  def masked_loss(params, batch):
    _, (nll, tokens, _) = step_lib.loss_sums(params, prog.graphdef, batch, None, 0.0)
    return nll, tokens

  data = pipeline.make_dataset(cfg, "train", tokenizer.load(""), batch_size=prog.global_batch)
  with prog.activate():
    params = prog.jit_init()()["params"]
    old, new = jax.jit(segment_id_loss), jax.jit(masked_loss)
    for batch in itertools.islice(data, 3):
      batch = put(prog, batch)
      want, got = jax.device_get(old(params, batch)), jax.device_get(new(params, batch))
      assert want[0] == got[0] and want[1] == got[1]
