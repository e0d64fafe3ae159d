"""Models in and out of spjax: Hugging Face checkpoints (`hf`) and training workdirs (`workdir`).

Both load params straight into the layout that is active when they are called (`Program.activate()`
or `jax.set_mesh` + `nnx.logical_axis_rules`), so a model too big for one device never sits on one.
"""

import json
import os

import jax
from flax.core import spmd as flax_spmd

from spjax.parallel import sharding


def active_layout():
  """(mesh, Layout) set by `jax.set_mesh` + `nnx.logical_axis_rules`, or None outside them."""
  mesh, rules = jax.sharding.get_mesh(), flax_spmd.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  return mesh, sharding.Layout.from_rules(dict(rules), "the active layout")


def target_shardings(abstract_params):
  """Shardings for an abstract param State: the active layout's (validated), else one device."""
  active = active_layout()
  if active is None:
    device = jax.sharding.make_single_device_sharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, abstract_params)
  return sharding.param_shardings(abstract_params, *active)  # ValueError names a bad tensor


def read_config_json(directory: str, kind: str) -> dict:
  """directory/config.json as a dict; ValueError naming `kind` (what the directory should be)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{directory} is not {kind}: it has no config.json")
  with open(path) as f:
    return json.load(f)
