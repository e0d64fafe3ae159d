"""The Transformer alone: shapes, causality, packed-document isolation, scan == unrolled, remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spjax.model import layers
from spjax.model import model as model_lib

import residuals

CFG = dataclasses.replace(model_lib.SIZES["tiny"], dtype="float32", num_layers=3)


def make(cfg=CFG, seed=0):
  return model_lib.Transformer(cfg, nnx.Rngs(seed))


@nnx.jit
def forward(model, x, positions=None, segments=None, key=None):
  return model(x, positions, segments, dropout_key=key)


def tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, CFG.vocab_size)


def test_logits_shape_and_dtype():
  logits = forward(make(), tokens((2, 16)))
  assert logits.shape == (2, 16, CFG.vocab_size) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_bf16_compute_with_fp32_params():
  model = make(dataclasses.replace(CFG, dtype="bfloat16"))
  assert model.blocks.attn.q[...].dtype == jnp.float32
  assert forward(model, tokens((1, 8))).dtype == jnp.float32  # logits upcast for the loss


def test_causal_future_tokens_do_not_change_past_logits():
  model, x = make(), tokens((1, 16))
  y = x.at[0, 10].set((x[0, 10] + 1) % CFG.vocab_size)
  a, b = forward(model, x), forward(model, y)
  np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
  assert not np.allclose(a[0, 10:], b[0, 10:], atol=1e-4)


def test_packed_documents_do_not_attend_to_each_other():
  model = make()
  doc1, doc2 = tokens((1, 6), seed=2), tokens((1, 10), seed=3)
  packed = jnp.concatenate([doc1, doc2], axis=1)  # [1, 16]
  segments = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  logits = forward(model, packed, positions, segments)
  alone = forward(model, doc2)  # the second document in a row of its own
  np.testing.assert_allclose(logits[0, 6:], alone[0], atol=1e-5)
  other = packed.at[0, :6].set((doc1[0] + 7) % CFG.vocab_size)  # change the first document only
  np.testing.assert_allclose(forward(model, other, positions, segments)[0, 6:], logits[0, 6:], atol=1e-6)


def test_scan_and_unrolled_stacks_compute_the_same_function():
  scanned = make()
  unrolled = make(dataclasses.replace(CFG, scan_layers=False), seed=5)
  stacked = nnx.state(scanned.blocks)
  for i, block in enumerate(unrolled.blocks):  # copy layer i of the stack into block i
    nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
  for name in ("embed", "unembed"):
    getattr(unrolled, name)[...] = getattr(scanned, name)[...]
  x = tokens((2, 12))
  np.testing.assert_allclose(forward(scanned, x), forward(unrolled, x), atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_dots_no_batch", "save_projections",
                                    "save_projections_attention"])
def test_remat_policies_leave_gradients_unchanged(policy):
  def grads(cfg):
    graphdef, params = nnx.split(make(cfg), nnx.Param)
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(tokens((2, 8))) ** 2)
    return jax.jit(jax.grad(loss))(params)
  base, remat = grads(CFG), grads(dataclasses.replace(CFG, remat_policy=policy))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), base, remat)


@pytest.mark.parametrize("policy,with_o", [("save_dots_no_batch", False),
                                           ("save_projections", True),
                                           ("save_projections_attention", True)])
def test_projection_policies_keep_the_projections_the_backward_pass_reads(policy, with_o):
  # Per layer: q, k, v, gate and up ([B, T, F]) are kept, and the attention output projection's
  # [B, T, D] by the save_projections*; the down projection's never (nothing in the backward pass
  # reads it). (The einsum attention of this model has no kernel residuals to keep.)
  cfg = dataclasses.replace(CFG, remat_policy=policy, scan_layers=False)
  graphdef, params = nnx.split(make(cfg), nnx.Param)
  x = tokens((2, 8))
  kept = [(r.type, r.name) for r in
          residuals.saved(lambda p: jnp.sum(nnx.merge(graphdef, p).hidden(x)), params) if r.name]
  heads, kv = f"f32[2,8,{cfg.num_heads},{cfg.head_dim}]", f"f32[2,8,{cfg.num_kv_heads},{cfg.head_dim}]"
  mlp = f"f32[2,8,{cfg.mlp_dim}]"
  per_layer = [(heads, "proj/q"), (kv, "proj/k"), (kv, "proj/v"), (mlp, "proj/gate"),
               (mlp, "proj/up")] + [(f"f32[2,8,{cfg.d_model}]", "proj/o")] * with_o
  assert sorted(kept) == sorted(per_layer * cfg.num_layers)


def test_dropout_only_with_a_key_and_tied_embeddings():
  cfg = dataclasses.replace(CFG, dropout_rate=0.5, tie_embeddings=True)
  model, x = make(cfg), tokens((1, 8))
  assert not hasattr(model, "unembed")
  np.testing.assert_array_equal(forward(model, x), forward(model, x))  # eval: deterministic
  assert not np.allclose(forward(model, x, key=jax.random.key(0)), forward(model, x), atol=1e-4)


def test_num_params_matches_the_built_model():
  for cfg in (CFG, dataclasses.replace(CFG, tie_embeddings=True)):
    _, params = nnx.split(make(cfg), nnx.Param)
    assert sum(p.size for p in jax.tree.leaves(params)) == cfg.num_params()


@pytest.mark.parametrize("field,value,needle", [
    ("num_kv_heads", 3, "model.num_kv_heads"),
    ("remat_policy", "some", "model.remat_policy"),
    ("head_dim", 15, "model.head_dim"),
    ("dtype", "int8", "model.dtype"),
    ("d_model", 0, "model.d_model"),
])
def test_bad_model_config_names_the_field(field, value, needle):
  with pytest.raises(ValueError, match=needle):
    model_lib.ModelConfig.from_config(dataclasses.replace(CFG, **{field: value}).to_config())


def rotate_half_rope(x, positions, theta, rotary_dim, scale=1.0):
  """RoPE as transformers writes it (rotate_half), in x's dtype, in the layout x [B, T, N, Dh]."""
  half = rotary_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # float32, as spjax's
  angles = jnp.asarray(positions, jnp.float32)[:, :, None, None] * inv_freq
  sin, cos = ((scale * f(angles)).astype(x.dtype) for f in (jnp.sin, jnp.cos))
  x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin,
                          rest * jnp.asarray(scale, x.dtype)], axis=-1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("rotary_dim,scale", [(16, 1.0), (16, 0.25), (8, 0.25)])
def test_rope_is_rotate_half_to_the_bit_in_either_head_order(dtype, rotary_dim, scale):
  # layers.rope turns x by a matmul with a signed permutation (a TPU speed-up): the products must
  # stay exact, the scale must reach the pass-through features, and [B, N, T, Dh] must work too.
  x = jax.random.normal(jax.random.key(0), (2, 24, 3, 16), dtype)
  positions = np.arange(24)[None] + np.array([[0], [1000]])  # [B, T]; large angles in row 1
  want = rotate_half_rope(x, positions, 500.0, rotary_dim, scale)
  got = layers.rope(x, jnp.asarray(positions)[:, :, None], 500.0, rotary_dim, scale)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=0, atol=0)
  heads_first = layers.rope(x.transpose(0, 2, 1, 3), jnp.asarray(positions)[:, None, :], 500.0,
                            rotary_dim, scale)
  np.testing.assert_array_equal(heads_first.transpose(0, 2, 1, 3), got)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("activation", sorted(layers.ACTIVATIONS))
def test_gated_unit_is_act_times_up_with_autodiffs_gradients(activation, dtype):
  # layers.gated's backward pass hands its gradients back through an optimization barrier (a TPU
  # fusion choice, BENCHMARKS.md): the value and both gradients must be autodiff's of act(g) * u,
  # bit for bit. Op by op: compiled, XLA may keep a bf16 intermediate in float32 on one side of a
  # barrier and not the other.
  act = layers.ACTIVATIONS[activation]
  g, u, t = (jax.random.normal(jax.random.key(i), (2, 8, 16), dtype) for i in range(3))
  loss = lambda f: jax.value_and_grad(lambda g, u: jnp.sum((f(g, u) * t).astype(jnp.float32)),
                                      argnums=(0, 1))
  value, grads = loss(layers.gated(activation))(g, u)
  want_value, want_grads = loss(lambda g, u: act(g) * u)(g, u)
  assert value == want_value
  for got, want in zip(grads, want_grads):
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
