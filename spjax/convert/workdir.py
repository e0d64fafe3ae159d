"""The trained model of an spjax workdir: WORKDIR/config.json and the params of a checkpoint.

Only the params are read (not the optimizer moments, twice their size), each array straight into the
active layout's sharding. A LoRA run's checkpoints hold only its adapters: its base weights are
rebuilt from where the checkpoint says they came from (init_from, else the seed) and the adapters
merged into them, so callers always get a plain Transformer.
"""

import dataclasses
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from spjax import convert
from spjax.convert import hf
from spjax.model import model as model_lib
from spjax.tune import lora


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

  adapted = bool(config.get("lora") and config.lora.rank)  # runs before LoRA existed have no lora
  def make_model():
    model = model_lib.Transformer(model_cfg, nnx.Rngs(0))
    return lora.attach(model, config.lora, 0) if adapted else model
  graphdef, abstract = nnx.split(nnx.eval_shape(make_model), nnx.Param)
  if adapted:
    abstract = nnx.filter_state(abstract, lora.ADAPTERS)  # all a LoRA checkpoint holds
  target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract, convert.target_shardings(abstract))}
  restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(checkpoints, str(step), "state"),
      args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  if not adapted:
    return nnx.merge(graphdef, restored["params"]), config
  base = _base_params(model_cfg, _base_record(checkpoints, step))
  return lora.merge(nnx.merge(graphdef, base, restored["params"])), config


def _base_record(checkpoints: str, step: int) -> dict:
  """{"init_from", "seed"} a LoRA checkpoint was saved with (spjax.train.program.Program.save)."""
  path = os.path.join(checkpoints, str(step), "info")
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint {checkpoints}/{step} of a LoRA run has no record of its base "
                     "weights (info/); it was not written by a LoRA run")
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)["lora_base"]


def _base_params(model_cfg: model_lib.ModelConfig, record: dict) -> nnx.State:
  """The frozen weights a LoRA run trained on, in the active layout: init_from's, else the seed's.
  """
  if record["init_from"]:
    run_as = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
              if f.name not in hf.ARCHITECTURE_FIELDS}
    hf.check_matches(record["init_from"], model_cfg)
    model, _ = hf.from_pretrained(record["init_from"], **run_as)
    return nnx.state(model, nnx.Param)
  def init():  # the same values as the run's jitted init: the seed decides them, not the layout
    return nnx.state(model_lib.Transformer(model_cfg, nnx.Rngs(record["seed"])), nnx.Param)
  return jax.jit(init, out_shardings=convert.target_shardings(jax.eval_shape(init)))()
