"""The trained model of an spjax workdir: WORKDIR/config.json and the params of a checkpoint.

Only the params are read (not the optimizer moments, twice their size), each array straight into the
active layout's sharding.
"""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from spjax import convert
from spjax.model import model as model_lib


def read_config(workdir: str) -> dict:
  """The resolved config the run saved, as a dict."""
  return convert.read_config_json(workdir, "an spjax workdir")


def load(workdir: str, step: int | None = None):
  """(model, run config) of the checkpoint at `step`, by default the newest one."""
  config = ml_collections.ConfigDict(read_config(workdir))
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(s) for s in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else [])
                 if s.isdigit() and os.path.exists(os.path.join(checkpoints, s, "state")))
  if not steps:
    raise ValueError(f"{workdir} has no checkpoints yet")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {steps}")

  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)
  target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract, convert.target_shardings(abstract))}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(checkpoints, str(step), "state"),
      args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return nnx.merge(graphdef, restored["params"]), config
