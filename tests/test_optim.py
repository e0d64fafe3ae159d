"""make_optimizer: schedule, decay mask, each optimizer descends, config errors name the field."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import default
from spjax.train import optim


def _opt_cfg(**overrides):
  cfg = default.get_config("tiny").optimizer
  cfg.update(overrides)
  return cfg


def test_schedule_warmup_then_cosine_to_end_ratio():
  _, schedule = optim.make_optimizer(
      _opt_cfg(learning_rate=1e-3, warmup_steps=10, end_lr_ratio=0.1), num_train_steps=110)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(5), 0.5e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.55e-3, rtol=1e-5)  # halfway down the cosine
  np.testing.assert_allclose(schedule(110), 1e-4, rtol=1e-5)


def test_decay_steps_limits_the_cosine():
  _, schedule = optim.make_optimizer(
      _opt_cfg(learning_rate=1.0, warmup_steps=10, decay_steps=20, end_lr_ratio=0.0), 1000)
  np.testing.assert_allclose(schedule(30), 0.0, atol=1e-6)
  np.testing.assert_allclose(schedule(500), 0.0, atol=1e-6)


def test_warmup_may_take_the_whole_run():
  _, schedule = optim.make_optimizer(_opt_cfg(learning_rate=1.0, warmup_steps=10), 10)
  np.testing.assert_allclose(schedule(10), 1.0)


class Block(nnx.Module):
  """Two matrices (a kernel, an embedding) and two vectors (a norm scale, a bias)."""

  def __init__(self, rngs: nnx.Rngs):
    del rngs  # nnx.vmap needs an argument to map over
    def param(shape, names):
      return nnx.Param(jnp.ones(shape), out_sharding=names, eager_sharding=False)
    self.kernel = param((4, 8), ("embed", "mlp"))
    self.embedding = param((16, 4), ("vocab", "embed"))
    self.scale = param((4,), ("embed",))
    self.bias = param((8,), ("mlp",))


def _params(layers: int = 0):
  """Block's params; with `layers`, a stack built the way the model's scanned layers are."""
  if not layers:
    return nnx.split(Block(nnx.Rngs(0)), nnx.Param)[1]
  stack = nnx.vmap(Block, transform_metadata={nnx.PARTITION_NAME: "layers"})
  return nnx.split(stack(nnx.Rngs(0).split(layers)), nnx.Param)[1]


@pytest.mark.parametrize("layers", [0, 3])
def test_decay_mask_only_matrices(layers):
  params = _params(layers)
  if layers:
    assert params["scale"].shape == (3, 4)  # 2-D, yet a vector per layer
  mask = optim.decay_mask(params)
  assert dict(mask) == {"kernel": True, "embedding": True, "scale": False, "bias": False}


def test_decay_mask_can_leave_the_token_embedding_out():
  mask = optim.decay_mask(_params(3), embeddings=False)
  assert dict(mask) == {"kernel": True, "embedding": False, "scale": False, "bias": False}


def test_decay_mask_without_axis_names_uses_ndim():
  mask = optim.decay_mask({"w": jnp.ones((2, 3)), "b": jnp.ones((3,))})
  assert mask == {"w": True, "b": False}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_optimizer_lowers_a_quadratic(name):
  params = _params(layers=2)
  params = jax.tree.map(lambda x: x * 3.0, params)
  loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731
  tx, _ = optim.make_optimizer(_opt_cfg(name=name, learning_rate=0.1, warmup_steps=1), 20)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  start = loss(params)
  for _ in range(5):
    params, opt_state = step(params, opt_state)
  assert loss(params) < 0.9 * start


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_weight_decay_skips_vectors(name):
  """With zero gradients only weight decay moves params: matrices shrink, vectors stay."""
  params = _params(layers=2)
  tx, schedule = optim.make_optimizer(
      _opt_cfg(name=name, learning_rate=0.5, warmup_steps=0, weight_decay=0.1), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["kernel"][...], -0.5 * 0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["embedding"][...], -0.5 * 0.1, rtol=1e-5)
  np.testing.assert_allclose(updates["scale"][...], 0.0)
  np.testing.assert_allclose(updates["bias"][...], 0.0)


def test_adam_has_no_weight_decay():
  params = _params()
  tx, _ = optim.make_optimizer(_opt_cfg(name="adam", warmup_steps=0, weight_decay=0.1), 10)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))


def test_clipping_comes_first():
  params = {"w": jnp.zeros((2, 2))}
  tx, _ = optim.make_optimizer(
      _opt_cfg(name="sgd", learning_rate=1.0, warmup_steps=0, momentum=0.0, grad_clip_norm=1.0), 10)
  updates, _ = tx.update({"w": jnp.full((2, 2), 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(jnp.linalg.norm(updates["w"]), 1.0, rtol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("name", "lion", r"optimizer\.name='lion'.*adamw, adam, sgd, adafactor"),
    ("learning_rate", -1.0, r"optimizer\.learning_rate"),
    ("warmup_steps", -1, r"optimizer\.warmup_steps=-1: must be >= 0"),
    ("b1", 1.0, r"optimizer\.b1=1\.0.*\[0, 1\)"),
    ("b2", -0.1, r"optimizer\.b2"),
    ("weight_decay", -0.1, r"optimizer\.weight_decay"),
])
def test_bad_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(_opt_cfg(**{field: value}), num_train_steps=200)


def test_biases_are_not_decayed_even_when_2d():
  from spjax.model import model as model_lib
  import dataclasses
  from flax import nnx
  cfg = dataclasses.replace(model_lib.SIZES["tiny"], attn_bias=True, mlp_bias=True)
  _, params = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  mask = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(optim.decay_mask(params))}
  assert mask["blocks/attn/q_bias"] is False and mask["blocks/attn/q"] is True
  assert mask["blocks/mlp/down_bias"] is False and mask["blocks/attn_norm/scale"] is False
