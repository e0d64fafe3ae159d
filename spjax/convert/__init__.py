"""Models in and out of spjax: Hugging Face checkpoints (`hf`) and training workdirs (`workdir`).

Both load params straight into the layout that is active when they are called (`Program.activate()`
or `jax.set_mesh` + `nnx.logical_axis_rules`), so a model too big for one device never sits on one.
"""

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, SingleDeviceSharding

from spjax import sharding


def target_shardings(abstract_params):
  """Shardings for an abstract param State: the active layout's (validated), else one device."""
  mesh, rules = jax.sharding.get_mesh(), flax_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract_params)
  layout = sharding.Layout.from_rules(dict(rules), "the active layout")
  for name, (shape, names) in sharding.logical_names_of(abstract_params).items():
    sharding.validate_tensor(layout, mesh, name, shape, names)  # ValueError names the tensor

  # From each param's logical names, not nnx.get_partition_spec: under active rules that returns
  # mesh axes already, which a layout cannot translate again.
  def place(var):
    return var.replace(NamedSharding(mesh, layout.spec(var.get_metadata()["out_sharding"])))
  return jax.tree.map(place, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
