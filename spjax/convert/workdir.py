"""The trained model of an spjax workdir: WORKDIR/config.json and the params of a checkpoint.

Only the params are read (not the optimizer moments, twice their size), each array straight into the
active layout's sharding: the raw params, or the moving average (`ema=True`, config.ema_decay). A
quantized workdir (tools/quantize.py; its config.json says how) restores its integers and scales. A
LoRA run's checkpoints hold only its adapters: its base weights are rebuilt from where the
checkpoint says they came from (init_from, else the seed) and the adapters merged into them, so
callers always get a plain Transformer.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from spjax import convert
from spjax.compress import quantize
from spjax.convert import hf
from spjax.model import model as model_lib
from spjax.tune import lora


def read_config(workdir: str) -> dict:
  """The resolved config the run saved, as a dict."""
  return convert.read_config_json(workdir, "an spjax workdir")


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps with a complete checkpoint, oldest first."""
  checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
  return sorted(int(s) for s in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else [])
                if s.isdigit() and os.path.exists(os.path.join(checkpoints, s, "state")))


def state_dir(workdir: str, step: int | None) -> tuple[str, int]:
  """(WORKDIR/checkpoints/STEP/state, STEP), the newest step by default; ValueError if absent."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise ValueError(f"{workdir} has no checkpoints yet")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"{workdir} has no checkpoint at step {step}; it has {steps}")
  return os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"), step


def abstract_params(config):
  """(graphdef, abstract param State) of the workdir's model: quantized if config.json says so."""
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(0))), nnx.Param)
  if config.get(quantize.CONFIG_KEY):
    abstract = quantize.abstract(abstract, quantize.Spec.from_dict(config[quantize.CONFIG_KEY]))
  return graphdef, abstract


def shardings(abstract):
  """Shardings of an abstract (possibly quantized) param State under the active layout."""
  active = convert.active_layout()
  if active is None or not any(isinstance(v.get_raw_value(), quantize.QArray)
                               for _, v in nnx.to_flat_state(abstract)):
    return convert.target_shardings(abstract)
  convert.target_shardings(abstract)  # validates every weight (its scales split as it does)
  return quantize.shardings(abstract, *active)


def load_params(workdir: str, step: int | None = None, *, ema: bool = False):
  """(params State, its shardings, step) of a checkpoint, read into the active layout."""
  config = ml_collections.ConfigDict(read_config(workdir))
  _, step = state_dir(workdir, step)
  _, abstract = abstract_params(config)
  if config.get("lora") and config.lora.rank:  # runs before LoRA existed have no lora section
    if ema:
      raise ValueError(f"{workdir} is a LoRA run: its checkpoints keep no moving average of the "
                       "merged weights; drop --ema")
    return _merged_lora_params(workdir, step, config), shardings(abstract), step
  key = "params"
  if ema:
    if not config.get("ema_decay"):
      raise ValueError(f"{workdir} was trained without a moving average (config.ema_decay is 0); "
                       "drop --ema")
    if config.get(quantize.CONFIG_KEY) or config.get("merged_from"):
      raise ValueError(f"{workdir} holds one set of params (quantized or merged), no moving "
                       "average; drop --ema")
    key = "ema_params"  # float32 whatever param_dtype is
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract)
  target_shardings = shardings(abstract)
  return restore_params(workdir, step, abstract, target_shardings, key), target_shardings, step


def load(workdir: str, step: int | None = None, *, ema: bool = False):
  """(model, run config) of the checkpoint at `step`, by default the newest one."""
  config = ml_collections.ConfigDict(read_config(workdir))
  graphdef, _ = abstract_params(config)
  params, _, _ = load_params(workdir, step, ema=ema)
  return nnx.merge(graphdef, params), config


def restore_params(workdir: str, step: int | None, abstract, target_shardings, key="params"):
  """The params State (or `key`'s, e.g. "ema_params") of a checkpoint, each array read straight
  into its sharding."""
  path, _ = state_dir(workdir, step)
  target = {key: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, target_shardings)}
  restored = ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return restored[key]


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
  state_dir(directory, step)  # ValueError if the named checkpoint does not exist

def _merged_lora_params(workdir: str, step: int, config) -> nnx.State:
  """A LoRA checkpoint's adapters merged into the base weights they were trained on."""
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: lora.attach(model_lib.Transformer(model_cfg, nnx.Rngs(0)), config.lora, 0)), nnx.Param)
  adapters = nnx.filter_state(abstract, lora.ADAPTERS)  # all a LoRA checkpoint holds
  adapters = restore_params(workdir, step, adapters, convert.target_shardings(adapters))
  checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
  base = _base_params(model_cfg, _base_record(checkpoints, step))
  return nnx.state(lora.merge(nnx.merge(graphdef, base, adapters)), nnx.Param)


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
  if record["init_from"] and init_source(record["init_from"]):  # a spjax workdir (`DIR[@STEP]`)
    return load_params(*init_source(record["init_from"]))[0]
  if record["init_from"]:
    run_as = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
              if f.name not in hf.ARCHITECTURE_FIELDS}
    hf.check_matches(record["init_from"], model_cfg)
    model, _ = hf.from_pretrained(record["init_from"], **run_as)
    return nnx.state(model, nnx.Param)
  def init():  # the same values as the run's jitted init: the seed decides them, not the layout
    return nnx.state(model_lib.Transformer(model_cfg, nnx.Rngs(record["seed"])), nnx.Param)
  return jax.jit(init, out_shardings=convert.target_shardings(jax.eval_shape(init)))()
