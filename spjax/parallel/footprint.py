"""Bytes per device of a Program's parameters, optimizer state and batch, read from its shardings.

Shapes only: nothing is allocated, so this works for any model size on any (simulated or
compile-only) mesh, and equals the size of the shard each device holds once the state exists.
"""

import dataclasses
import math

import jax
from flax import nnx

from spjax.parallel import sharding


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  """Bytes of the shard one device holds of an array with a NamedSharding."""
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ParamRow:
  name: str  # "blocks/attn/q"
  shape: tuple
  logical: tuple  # logical axis names, one per dimension
  spec: tuple  # mesh axes per dimension (PartitionSpec entries)
  bytes_per_device: int


def parameter_rows(prog) -> list[ParamRow]:
  """One row per parameter, in the State's order."""
  names = sharding.logical_names_of(prog.abstract_params)
  params = prog.abstract_state()["params"]
  rows = []
  for path, var in nnx.to_flat_state(params):
    name = "/".join(map(str, path))
    x = var.get_value()
    rows.append(ParamRow(name, tuple(x.shape), names[name][1], tuple(x.sharding.spec),
                         shard_bytes(x)))
  return rows


def state_bytes(prog) -> dict:
  """{"params", "opt_state", "batch"}: bytes per device of each part of the step's input."""
  state = prog.abstract_state()
  total = lambda tree: sum(shard_bytes(x) for x in jax.tree.leaves(tree))
  return {"params": total(state["params"]), "opt_state": total(state["opt_state"]),
          "batch": total(prog.abstract_batch())}
