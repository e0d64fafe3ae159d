"""Checkpointer: sharded save, restore on another mesh, retention, data iterator, mismatches."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from spjax.train.checkpoint import Checkpointer

AUTO = jax.sharding.AxisType.Auto


class Toy(nnx.Module):

  def __init__(self, mlp: int):
    self.kernel = nnx.Param(jnp.arange(8 * mlp, dtype=jnp.float32).reshape(8, mlp),
                            out_sharding=("embed", "mlp"), eager_sharding=False)
    self.scale = nnx.Param(jnp.linspace(0.0, 1.0, 8), out_sharding=("embed",), eager_sharding=False)


def _by_param(fn, tree, specs):
  """Maps `fn(leaf, spec)` over a State of Params; `specs` is keyed by param name."""
  return jax.tree_util.tree_map_with_path(lambda path, x: fn(x, specs[path[0].key]), tree)


def _state(mesh, specs, mlp=16):
  """{"params", "opt_state", "step"} with params and Adam moments placed by `specs` on `mesh`."""
  _, params = nnx.split(Toy(mlp), nnx.Param)
  params = _by_param(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  tx = optax.adam(1e-3)
  # One update so the moments are not zeros: a round trip can't pass by restoring a fresh init.
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  return {"params": params, "opt_state": opt_state, "step": jnp.array(7, jnp.int32)}


def _abstract(state, mesh, specs):
  """ShapeDtypeStructs of `state`: params and moments sharded by `specs`, scalars replicated."""
  def shard(x, spec=P()):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  adam = state["opt_state"][0]
  return {
      "params": _by_param(shard, state["params"], specs),
      "opt_state": (adam._replace(count=shard(adam.count), mu=_by_param(shard, adam.mu, specs),
                                  nu=_by_param(shard, adam.nu, specs)), optax.EmptyState()),
      "step": shard(state["step"]),
  }


def test_restore_onto_another_mesh(tmp_path):
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  state = _state(mesh8, {"kernel": P("fsdp", None), "scale": P("fsdp")})
  assert len(state["params"]["kernel"][...].sharding.device_set) == 8
  ckpt = Checkpointer(tmp_path, max_to_keep=3, save_every_steps=10)
  assert ckpt.save(10, state)
  ckpt.close()

  # A fresh Checkpointer, as in a resumed run, onto a 4x2 mesh with other specs.
  mesh42 = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AUTO, AUTO))
  specs = {"kernel": P("tensor", "data"), "scale": P("data")}
  ckpt = Checkpointer(tmp_path, max_to_keep=3, save_every_steps=10)
  restored = ckpt.restore(10, _abstract(state, mesh42, specs))
  ckpt.close()

  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["params"]["kernel"][...].sharding == NamedSharding(mesh42, P("tensor", "data"))
  assert restored["opt_state"][0].nu["scale"][...].sharding == NamedSharding(mesh42, P("data"))
  assert restored["step"].sharding == NamedSharding(mesh42, P())


def test_interval_force_latest_step_and_retention(tmp_path):
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  state = _state(mesh8, {"kernel": P("fsdp", None), "scale": P()})
  ckpt = Checkpointer(tmp_path, max_to_keep=2, save_every_steps=5)
  assert ckpt.latest_step() is None
  assert [step for step in range(1, 21) if ckpt.save(step, state)] == [5, 10, 15, 20]
  assert not ckpt.save(20, state, force=True)  # the interval already saved the last step
  assert ckpt.save(23, state, force=True)
  ckpt.wait()
  assert ckpt.latest_step() == 23
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [20, 23]
  ckpt.close()


def test_data_iterator_round_trip(tmp_path):
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  specs = {"kernel": P(), "scale": P()}
  state = _state(mesh8, specs)
  data_iter = iter(grain.MapDataset.range(100).to_iter_dataset())
  for _ in range(5):
    next(data_iter)
  ckpt = Checkpointer(tmp_path, max_to_keep=1, save_every_steps=1)
  ckpt.save(1, state, data_iter)
  for _ in range(3):
    next(data_iter)
  ckpt.restore(1, _abstract(state, mesh8, specs), data_iter)
  assert next(data_iter) == 5
  ckpt.close()


def test_mismatch_names_the_parameter(tmp_path):
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  specs = {"kernel": P(), "scale": P()}
  state = _state(mesh8, specs, mlp=16)
  ckpt = Checkpointer(tmp_path, max_to_keep=1, save_every_steps=1)
  ckpt.save(1, state)

  wider = _abstract(_state(mesh8, specs, mlp=24), mesh8, specs)
  with pytest.raises(ValueError, match=r"at params/kernel/value: checkpoint shape \(8, 16\), "
                                       r"model shape \(8, 24\) \(2 more"):
    ckpt.restore(1, wider)

  no_step = _abstract(state, mesh8, specs)
  del no_step["step"]
  with pytest.raises(ValueError, match=r"at step: checkpoint shape \(\), model shape absent"):
    ckpt.restore(1, no_step)
  ckpt.close()


def test_arrays_may_be_donated_once_save_returns(tmp_path):
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AUTO,))
  specs = {"kernel": P("fsdp", None), "scale": P()}
  state = _state(mesh8, specs)
  expected = jax.tree.map(np.asarray, state)
  abstract = _abstract(state, mesh8, specs)
  ckpt = Checkpointer(tmp_path, max_to_keep=1, save_every_steps=1)
  ckpt.save(1, state)
  jax.tree.map(lambda x: x.delete(), state)  # what donating the state to the next step does
  jax.tree.map(np.testing.assert_array_equal, ckpt.restore(1, abstract), expected)
  ckpt.close()
