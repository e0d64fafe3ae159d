"""The trained model of an spjax workdir: WORKDIR/config.json and the params of a checkpoint.

Only the params are read (not the optimizer moments, twice their size), each array straight into the
active layout's sharding.
"""

import json
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


def _checkpoint(workdir: str, step: int | None) -> tuple[str, int]:
  """(path of the checkpoint's state, its step): `step`, by default the newest one."""
  checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(s) for s in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else [])
                 if s.isdigit() and os.path.exists(os.path.join(checkpoints, s, "state")))
  if not steps:
    raise ValueError(f"{workdir} has no checkpoints yet")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {steps}")
  return os.path.join(checkpoints, str(step), "state"), step


def restore_params(workdir: str, step: int | None, abstract_params, shardings):
  """The params State of a checkpoint, each array read straight into its sharding."""
  path, _ = _checkpoint(workdir, step)
  target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract_params, shardings)}
  restored = ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return restored["params"]


def load(workdir: str, step: int | None = None):
  """(model, run config) of the checkpoint at `step`, by default the newest one."""
  config = ml_collections.ConfigDict(read_config(workdir))
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  _checkpoint(workdir, step)  # no checkpoint: say so before building anything
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)
  params = restore_params(workdir, step, abstract, convert.target_shardings(abstract))
  return nnx.merge(graphdef, params), config


# Fields that decide the params' shapes and meaning: a run started from a workdir must match them.
MATCHED_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "mlp_dim", "rope_theta", "rotary_pct", "norm", "norm_eps", "mlp_activation",
                  "gated_mlp", "parallel_residual", "attn_bias", "mlp_bias", "tie_embeddings",
                  "scan_layers")


def init_source(spec: str) -> tuple[str, int | None] | None:
  """`init_from` -> (spjax workdir, step or None = newest), or None when it is no spjax workdir.

  A spjax workdir is a directory whose config.json has a "model" section (a Hugging Face one has
  "model_type" instead); `DIR@STEP` names a step.
  """
  directory, at, step = spec.rpartition("@")
  if not (at and step.isdigit()):
    directory, step = spec, None
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      is_workdir = isinstance(json.load(f).get("model"), dict)
  except (OSError, ValueError, AttributeError):
    is_workdir = False
  if not is_workdir and step is not None:
    raise ValueError(f"init_from={spec}: {directory} is not an spjax workdir (no config.json with "
                     f"a model section), so it has no step {step} to start from")
  return (directory, None if step is None else int(step)) if is_workdir else None


def check_matches(spec: str, cfg: model_lib.ModelConfig) -> None:
  """Raises ValueError listing every `model.*` field that differs from the workdir's model, and
  one if the named checkpoint does not exist."""
  directory, step = init_source(spec)
  theirs = read_config(directory)["model"]
  wrong = [f"--config.model.{f}={theirs[f]} (config has {getattr(cfg, f)})"
           for f in MATCHED_FIELDS if f in theirs and theirs[f] != getattr(cfg, f)]
  if wrong:
    raise ValueError(f"init_from={spec} holds a different model; to load it set " + ", ".join(wrong))
  _checkpoint(directory, step)
