"""build(config) -> Program: the validated mesh, layout, shardings and jit-compiled steps of a run.

Everything here works on shapes only: a bad config or layout fails in `build` with a ValueError, before
anything is traced. Tools (layout report, TPU ahead-of-time compile, benchmarks) use the same Program as
training, so what they measure is what trains.
"""

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spjax.convert import hf
from spjax.model import attention
from spjax.model import model as model_lib
from spjax.model import moe
from spjax.parallel import layouts, sharding
from spjax.train import optim
from spjax.train import step as step_lib


def check_config(config) -> model_lib.ModelConfig:
  """Raises ValueError naming the first config field that cannot work."""
  positive = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batches",
              "checkpoint_every_steps", "max_checkpoints_to_keep", "per_device_batch_size",
              "seq_len", "grad_accum_steps")
  for name in positive:
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {config[name]}")
  if config.z_loss < 0:
    raise ValueError(f"config.z_loss must be >= 0, got {config.z_loss}")
  if config.nan_policy not in ("skip", "abort"):
    raise ValueError(f"config.nan_policy must be 'skip' or 'abort', got {config.nan_policy!r}")
  if config.keep_checkpoint_every_steps < 0:
    raise ValueError(f"config.keep_checkpoint_every_steps must be >= 0, got "
                     f"{config.keep_checkpoint_every_steps}")
  if config.peak_tflops_per_device < 0:
    raise ValueError(f"config.peak_tflops_per_device must be >= 0, got "
                     f"{config.peak_tflops_per_device}")
  return model_lib.ModelConfig.from_config(config.model)


@dataclasses.dataclass(frozen=True)
class Program:
  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  layout: sharding.Layout
  mesh: Mesh
  graphdef: nnx.GraphDef
  abstract_params: nnx.State  # shapes and logical names, no arrays
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: dict  # {"step", "params", "opt_state"} -> NamedSharding trees
  batch_sharding: NamedSharding

  @property
  def global_batch(self) -> int:
    """Sequences per optimizer step (all microbatches, all processes)."""
    return self.config.per_device_batch_size * self.mesh.size * self.config.grad_accum_steps

  @contextlib.contextmanager
  def activate(self):
    """The mesh and logical rules, for eager work and tools; the jitted steps below carry their own."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.layout.flax_rules()):
      yield

  def _under_layout(self, fn):
    """`fn` traced with the mesh and rules in scope, wherever it is called from.

    Without them the model's activation constraints are silently skipped and XLA picks layouts on
    its own (under fsdp: an all-reduce after every matmul, several times slower).
    """
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), \
          nnx.logical_axis_rules(self.layout.flax_rules()):
        return fn(*args, **kwargs)
    return traced

  def init_state(self, params=None):
    """Step 0: `params` (default: freshly initialised from the seed) and new optimizer moments."""
    if params is None:
      params = nnx.state(model_lib.Transformer(self.model_cfg, nnx.Rngs(self.config.seed)),
                         nnx.Param)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

  def jit_init(self):
    """Params born sharded: each device computes only its own shards."""
    return jax.jit(self._under_layout(self.init_state), out_shardings=self.state_shardings)

  def pretrained_state(self):
    """Step 0 from `config.init_from`'s weights, read straight into the layout's shardings."""
    run_as = {f.name: getattr(self.model_cfg, f.name) for f in dataclasses.fields(self.model_cfg)
              if f.name not in hf.ARCHITECTURE_FIELDS}  # dtypes, scan, remat, attention
    model, _ = hf.from_pretrained(self.config.init_from, **run_as)
    init = jax.jit(self._under_layout(self.init_state), in_shardings=(self.state_shardings["params"],),
                   out_shardings=self.state_shardings, donate_argnums=0)
    return init(nnx.state(model, nnx.Param))

  def abstract_state(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(self.init_state), self.state_shardings)

  def abstract_batch(self, rows: int | None = None):
    shape = (rows or self.global_batch, self.config.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in ("inputs", "targets", "segment_ids", "positions")}

  def jit_train_step(self):
    """(state, batch) -> (state, metrics); the state is donated so it updates in place."""
    c = self.config
    fn = functools.partial(step_lib.train_step, graphdef=self.graphdef, tx=self.tx,
                           schedule=self.schedule, seed=c.seed,
                           grad_accum_steps=c.grad_accum_steps, z_loss=c.z_loss)
    return jax.jit(self._under_layout(fn), in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def jit_eval_step(self):
    return jax.jit(self._under_layout(functools.partial(step_lib.eval_step, graphdef=self.graphdef)),
                   in_shardings=(self.state_shardings["params"], self.batch_sharding))


def build(config, devices=None) -> Program:
  """Validates config, layout and mesh against every parameter and activation shape."""
  model_cfg = check_config(config)
  if config.init_from:
    hf.check_matches(config.init_from, model_cfg)
  layout = layouts.parse(config.layout)
  mesh = sharding.make_mesh(config.mesh, layout, devices)
  moe.check_layout(model_cfg, layout, mesh)
  # Resolved before the model is built: the graphdef carries the attention the steps will trace.
  model_cfg = dataclasses.replace(model_cfg, attention=attention.choose(
      model_cfg, config.seq_len, layout, mesh))
  abstract_model = nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  param_shardings = sharding.param_shardings(abstract_params, mesh, layout)
  micro_batch = config.per_device_batch_size * mesh.size
  for name, (shape, names) in model_lib.activation_shapes(model_cfg, micro_batch,
                                                          config.seq_len).items():
    sharding.validate_tensor(layout, mesh, name, shape, names)
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
  return Program(config, model_cfg, layout, mesh, graphdef, abstract_params, tx, schedule,
                 _state_shardings(abstract_params, param_shardings, tx, mesh, layout),
                 NamedSharding(mesh, layout.spec(("batch", "length"))))


def _state_shardings(abstract_params, param_shardings, tx, mesh, layout):
  """Optimizer moments follow their parameter (they carry its logical names); the rest replicates."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def leaf_sharding(leaf):
    if not isinstance(leaf, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())  # counters: scalars
    names = leaf.get_metadata().get("out_sharding")
    spec = layout.spec(names) if names and len(names) == len(leaf.shape) else PartitionSpec()
    return leaf.replace(NamedSharding(mesh, spec))  # factored moments (adafactor) replicate
  opt = jax.tree.map(leaf_sharding, abstract_opt, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {"step": NamedSharding(mesh, PartitionSpec()), "params": param_shardings,
          "opt_state": opt}
