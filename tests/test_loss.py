"""The chunked cross-entropy (config.loss_chunk_size) gives today's loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.train import loss as loss_lib
from spjax.train import program
from spjax.train import step as step_lib


def build(layout, chunk, z_loss=1e-3):
  cfg = default.get_config("tiny")
  cfg.layout, cfg.loss_chunk_size, cfg.z_loss = layout, chunk, z_loss
  cfg.model.dtype = "float32"  # compare at float32 precision
  return program.build(cfg)


def batch(prog):
  rng = np.random.default_rng(0)
  b, t = prog.global_batch, prog.config.seq_len
  segments = np.ones((b, t), np.int32)
  segments[:, t - 20:] = 0  # padding at the end of each row: masked out of the sums
  segments[0, 40:] = 2  # a second document in row 0
  tokens = rng.integers(0, prog.model_cfg.vocab_size, (b, t), dtype=np.int32)
  loss_mask = (segments > 0).astype(np.int32)
  loss_mask[1, :30] = 0  # a prompt: in the row, not trained (SFT's mask, not padding's)
  return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "segment_ids": segments,
          "loss_mask": loss_mask,
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def loss_and_grads(prog, params, data):
  c = prog.config
  fn = jax.value_and_grad(step_lib.loss_sums, has_aux=True)
  run = jax.jit(prog._under_layout(
      lambda p, d: fn(p, prog.graphdef, d, None, c.z_loss, 1.0 / 1000, loss_chunk=c.loss_chunk_size)))
  with prog.activate():
    (objective, (nll, tokens, _)), grads = run(params, data)
  return objective, nll, tokens, grads


@pytest.mark.parametrize("layout", ["dp", "fsdp_tp"])
def test_chunked_loss_and_gradients_match_the_full_width_loss(layout):
  full, chunked = build(layout, 0), build(layout, 32)  # 4 chunks of the 128 positions
  params = full.jit_init()()["params"]
  data = batch(full)
  want, got = loss_and_grads(full, params, data), loss_and_grads(chunked, params, data)
  for w, g in zip(want[:3], got[:3]):  # objective (with z-loss), nll sum, token count
    np.testing.assert_allclose(g, w, rtol=1e-6)
  flat_w, flat_g = jax.tree.leaves(want[3]), jax.tree.leaves(got[3])
  assert len(flat_w) == len(flat_g) > 0
  for w, g in zip(flat_w, flat_g):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_chunked_gradient_never_holds_the_full_logits():
  # Per device under dp: 2 rows of 128 positions, vocab 1024. The full-width loss has [2, 128,
  # 1024] float32 logits in its compiled gradient; the chunked one only [2, 32, 1024] chunks.
  def compiled_text(chunk):
    prog = build("dp", chunk)
    fn = jax.grad(step_lib.loss_sums, has_aux=True)
    run = jax.jit(prog._under_layout(
        lambda p, d: fn(p, prog.graphdef, d, None, 0.0, 1.0, loss_chunk=chunk)))
    with prog.activate():
      return run.lower(prog.abstract_state()["params"], prog.abstract_batch()).compile().as_text()
  full, chunked = compiled_text(0), compiled_text(32)
  assert "f32[2,128,1024]" in full and "f32[2,32,1024]" not in full
  assert "f32[2,128,1024]" not in chunked and "f32[2,32,1024]" in chunked


def test_bad_chunk_sizes_are_refused_before_compiling():
  with pytest.raises(ValueError, match="loss_chunk_size"):
    build("dp", 48)  # not a divisor of seq_len 128
  with pytest.raises(ValueError, match="loss_chunk_size"):
    loss_lib.chunked_nll_sums(jnp.zeros((1, 8, 4)), jnp.zeros((4, 16)),
                              jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8)), 3, "float32")


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_nll_sums_match_autodiff_of_the_float32_softmax(dtype, tol):
  # The custom VJP against jax.grad of the plain formula (logits cast to float32, logsumexp,
  # the target's logit): sums, and gradients for the hidden states, the table and the mask.
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 32, (2, 16)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (2, 16)), jnp.float32)

  def reference(h, tab, m):
    logits = (h.astype(dtype) @ tab.astype(dtype)).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target) * m), jnp.sum(jnp.square(log_z) * m)

  def ours(h, tab, m):
    return loss_lib.nll_sums(h.astype(dtype), tab, targets, m, dtype)

  for fn in (reference, ours):  # z-loss weight 0.1 in the objective, as train_step combines them
    fn.objective = lambda h, tab, m, fn=fn: fn(h, tab, m)[0] + 0.1 * fn(h, tab, m)[1]
  np.testing.assert_allclose(ours(hidden, table, mask), reference(hidden, table, mask), rtol=tol)
  want = jax.grad(reference.objective, argnums=(0, 1, 2))(hidden, table, mask)
  got = jax.grad(ours.objective, argnums=(0, 1, 2))(hidden, table, mask)
  for w, g in zip(want, got):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())
