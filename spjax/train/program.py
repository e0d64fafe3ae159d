"""build(config) -> Program: the validated mesh, layout, shardings and jit-compiled steps of a run.

Everything here works on shapes only: a bad config or layout fails in `build` with a ValueError, before
anything is traced. Tools (layout report, TPU ahead-of-time compile, benchmarks) use the same Program as
training, so what they measure is what trains.
"""

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spjax.convert import hf
from spjax.convert import workdir
from spjax.model import attention
from spjax.model import model as model_lib
from spjax.model import moe
from spjax.parallel import layouts, pipeline, sharding
from spjax.train import metrics
from spjax.train import optim
from spjax.train import step as step_lib
from spjax.tune import distill
from spjax.tune import lora


def check_config(config) -> model_lib.ModelConfig:
  """Raises ValueError naming the first config field that cannot work."""
  positive = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batches",
              "checkpoint_every_steps", "max_checkpoints_to_keep", "per_device_batch_size",
              "seq_len", "grad_accum_steps")
  for name in positive:
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {config[name]}")
  if config.loss_chunk_size < 0 or (config.loss_chunk_size and
                                     config.seq_len % config.loss_chunk_size):
    raise ValueError(f"config.loss_chunk_size must be 0 (off) or a positive divisor of seq_len "
                     f"({config.seq_len}), got {config.loss_chunk_size}")
  if config.z_loss < 0:
    raise ValueError(f"config.z_loss must be >= 0, got {config.z_loss}")
  if config.nan_policy not in ("skip", "abort"):
    raise ValueError(f"config.nan_policy must be 'skip' or 'abort', got {config.nan_policy!r}")
  if config.keep_checkpoint_every_steps < 0:
    raise ValueError(f"config.keep_checkpoint_every_steps must be >= 0, got "
                     f"{config.keep_checkpoint_every_steps}")
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1) (0 = no moving average), got "
                     f"{config.ema_decay}")
  if config.peak_tflops_per_device < 0:
    raise ValueError(f"config.peak_tflops_per_device must be >= 0, got "
                     f"{config.peak_tflops_per_device}")
  if config.neftune_alpha < 0:
    raise ValueError(f"config.neftune_alpha must be >= 0 (0 = off), got {config.neftune_alpha}")
  model_cfg = model_lib.ModelConfig.from_config(config.model)
  lora.validate(config.lora, model_cfg)
  return model_cfg


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
  teacher: distill.Teacher | None = None  # config.distill.teacher, run inside the train step

  @property
  def global_batch(self) -> int:
    """Sequences per optimizer step (all microbatches, all processes)."""
    return self.config.per_device_batch_size * self.mesh.size * self.config.grad_accum_steps

  @property
  def pipeline(self) -> pipeline.Schedule | None:
    """The pipeline schedule when the layout maps layers to stage (spjax/parallel/pipeline.py)."""
    return pipeline.schedule(self.config, self.model_cfg, self.layout, self.mesh)

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
          nnx.logical_axis_rules(self.layout.flax_rules()), pipeline.scope(self.pipeline):
        return fn(*args, **kwargs)
    return traced

  @property
  def trainable(self):
    """Filter of the params that get gradients and optimizer state: LoRA adapters, else all."""
    return _trainable(self.config)

  def flops_per_token(self) -> float:
    """Training FLOPs per token of this run (spjax.train.metrics.flops_per_token): under LoRA the
    frozen base does no weight gradients and the adapters train, so their count goes in; a
    distillation teacher runs forward only, a third of its training FLOPs (2 of 6 per weight)."""
    adapters = nnx.filter_state(self.abstract_params, lora.ADAPTERS) if self.config.lora.rank else {}
    flops = metrics.flops_per_token(self.model_cfg, self.config.seq_len,
                                    sum(p.size for p in jax.tree.leaves(adapters)))
    if self.teacher:
      flops += metrics.flops_per_token(self.teacher.model_cfg, self.config.seq_len) / 3
    return flops

  def init_state(self, params=None):
    """Step 0: `params` (default: freshly initialised from the seed) and new optimizer moments.

    Under LoRA `params` are the base model's, and fresh adapters are added beside its kernels.
    """
    if params is None:
      params = nnx.state(model_lib.Transformer(self.model_cfg, nnx.Rngs(self.config.seed)),
                         nnx.Param)
    if self.config.lora.rank:
      params = lora.with_adapters(params, self.model_cfg, self.config.lora, self.config.seed)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": self.tx.init(nnx.filter_state(params, self.trainable))}
    if self.config.ema_decay > 0:  # the moving average starts at the initial params
      state["ema_params"] = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return state

  def jit_init(self):
    """Params born sharded: each device computes only its own shards."""
    return jax.jit(self._under_layout(self.init_state), out_shardings=self.state_shardings)

  def pretrained_state(self):
    """Step 0 from `config.init_from`'s weights, read straight into the layout's shardings."""
    run = workdir.init_source(self.config.init_from)
    if run:  # an spjax workdir: its checkpoint's params, restored as this run's
      params = workdir.restore_params(*run, self.abstract_params, self.state_shardings["params"])
      init = jax.jit(self._under_layout(self.init_state), out_shardings=self.state_shardings,
                     donate_argnums=0)
      return init(params)
    run_as = {f.name: getattr(self.model_cfg, f.name) for f in dataclasses.fields(self.model_cfg)
              if f.name not in hf.ARCHITECTURE_FIELDS}  # dtypes, scan, remat, attention
    model, _ = hf.from_pretrained(self.config.init_from, **run_as)
    base = nnx.filter_state(self.state_shardings["params"], lora.BASE)  # no adapters yet
    init = jax.jit(self._under_layout(self.init_state), in_shardings=(base,),
                   out_shardings=self.state_shardings, donate_argnums=0)
    return init(nnx.state(model, nnx.Param))

  def abstract_state(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(self.init_state), self.state_shardings)

  def abstract_batch(self, rows: int | None = None):
    shape = (rows or self.global_batch, self.config.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}

  def jit_train_step(self):
    """(state, batch) -> (state, metrics); the state is donated so it updates in place."""
    c = self.config
    fn = functools.partial(step_lib.train_step, graphdef=self.graphdef, tx=self.tx,
                           schedule=self.schedule, seed=c.seed,
                           grad_accum_steps=c.grad_accum_steps, z_loss=c.z_loss,
                           loss_chunk=c.loss_chunk_size, ema_decay=c.ema_decay,
                           objective=self.teacher and self.teacher.objective(),
                           trainable=self.trainable, neftune_alpha=c.neftune_alpha)
    frozen = () if self.teacher is None else (self.teacher.shardings,)
    jitted = jax.jit(self._under_layout(fn),
                     in_shardings=(self.state_shardings, self.batch_sharding, *frozen),
                     out_shardings=(self.state_shardings, None), donate_argnums=0)
    if self.teacher is None:
      return jitted
    return distill.BoundStep(jitted, self.teacher, self.mesh, self.layout)  # called as (state, batch)

  def jit_eval_step(self, param_shardings=None):
    """(params, batch) -> summed loss and tokens; params sharded as `param_shardings` (default the
    train state's; a quantized or EMA State passes its own)."""
    shardings = self.state_shardings["params"] if param_shardings is None else param_shardings
    return jax.jit(self._under_layout(functools.partial(step_lib.eval_step, graphdef=self.graphdef,
                                                        loss_chunk=self._loss_chunk())),
                   in_shardings=(shardings, self.batch_sharding))

  def _loss_chunk(self) -> int:
    """Positions per chunk of the eval loss: a distillation run's is distill.chunk_size (it refuses
    loss_chunk_size), where 0 or >= seq_len means the whole sequence."""
    if self.teacher is None:
      return self.config.loss_chunk_size
    chunk = self.teacher.settings.chunk_size
    return chunk if chunk < self.config.seq_len else 0

  # ----------------------------------------------------------------------------------------------
  # Checkpoints: a LoRA run saves its adapters (and their moments) only, with where its base came from
  # ----------------------------------------------------------------------------------------------

  def save(self, ckpt, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    """`ckpt.save` (a train.checkpoint.Checkpointer) of what this run checkpoints."""
    if not self.config.lora.rank:
      return ckpt.save(step, state, data_iter, force=force)
    return ckpt.save(step, self._without_base(state), data_iter, force=force,
                     info={"lora_base": self._base_record()})

  def restore(self, ckpt, step: int, data_iter=None):
    """The state saved at `step`, in this run's shardings. A LoRA checkpoint's base weights are
    rebuilt as at the start (from init_from, else the seed), once they are known to be the ones
    its adapters were trained on."""
    if set(ckpt.metadata(step)) == {"params"}:  # spjax-merge / tools/quantize.py write these
      raise ValueError(f"checkpoint step {step} holds parameters only (a merged or quantized "
                       "workdir: no optimizer state or data position to resume); train from it "
                       "in a new workdir with --config.init_from=<this workdir>")
    recorded = (ckpt.info(step) or {}).get("lora_base")
    if not self.config.lora.rank:
      if recorded is not None:
        raise ValueError(f"checkpoint step {step} holds LoRA adapters only; resume it with the "
                         "config.lora.* it was trained with (in config.json)")
      return ckpt.restore(step, self.abstract_state(), data_iter)
    if recorded is None:
      raise ValueError(f"checkpoint step {step} is not a LoRA checkpoint (it has no base record); "
                       "resume it with config.lora.rank=0")
    def describe(base):  # the seed decides the base only without init_from
      return base["init_from"] or f"config.seed={base['seed']}"
    if describe(recorded) != describe(self._base_record()):
      raise ValueError(f"checkpoint step {step} holds LoRA adapters trained on the base weights of "
                       f"{describe(recorded)}, but this run's base is "
                       f"{describe(self._base_record())}; resume with the same config.init_from "
                       "(and config.seed)")
    saved = ckpt.restore(step, self._without_base(self.abstract_state()), data_iter)
    fresh = self.pretrained_state() if self.config.init_from else self.jit_init()()
    params = nnx.merge_state(nnx.filter_state(fresh["params"], lora.BASE), saved["params"])
    return {**saved, "params": params}

  def _without_base(self, state):
    return {**state, "params": nnx.filter_state(state["params"], lora.ADAPTERS)}

  def _base_record(self) -> dict:
    init_from = self.config.init_from
    return {"init_from": os.path.abspath(init_from) if init_from else "", "seed": self.config.seed}


def build(config, devices=None) -> Program:
  """Validates config, layout and mesh against every parameter and activation shape."""
  model_cfg = check_config(config)
  if config.init_from and workdir.init_source(config.init_from):
    workdir.check_matches(config.init_from, model_cfg)
  elif config.init_from:
    hf.check_matches(config.init_from, model_cfg)
  layout = layouts.parse(config.layout)
  mesh = sharding.make_mesh(config.mesh, layout, devices)
  pipeline.schedule(config, model_cfg, layout, mesh)  # its checks, before anything is traced
  moe.check_layout(model_cfg, layout, mesh)
  # Resolved before the model is built: the graphdef carries the attention the steps will trace.
  model_cfg = dataclasses.replace(model_cfg, attention=attention.choose(
      model_cfg, config.seq_len, layout, mesh))
  def make_model():  # the graph the steps run: with LoRA, adapters beside the targeted kernels
    model = model_lib.Transformer(model_cfg, nnx.Rngs(config.seed))
    return lora.attach(model, config.lora, config.seed) if config.lora.rank else model
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make_model), nnx.Param)
  param_shardings = sharding.param_shardings(abstract_params, mesh, layout)
  micro_batch = config.per_device_batch_size * mesh.size
  for name, (shape, names) in model_lib.activation_shapes(model_cfg, micro_batch,
                                                          config.seq_len).items():
    sharding.validate_tensor(layout, mesh, name, shape, names)
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps, config.prune)
  return Program(config, model_cfg, layout, mesh, graphdef, abstract_params, tx, schedule,
                 _state_shardings(nnx.filter_state(abstract_params, _trainable(config)),
                                  param_shardings, tx, mesh, layout, config.ema_decay > 0),
                 NamedSharding(mesh, layout.spec(("batch", "length"))),
                 distill.build_teacher(config, model_cfg, layout, mesh))


def _trainable(config):
  return lora.ADAPTERS if config.lora.rank else nnx.Param


def _state_shardings(trainable_params, param_shardings, tx, mesh, layout, ema: bool):
  """Optimizer moments follow their parameter (they carry its logical names), the EMA the params;
  the rest replicates."""
  abstract_opt = jax.eval_shape(tx.init, trainable_params)

  def leaf_sharding(leaf):
    if not isinstance(leaf, nnx.Variable):
      return NamedSharding(mesh, PartitionSpec())  # counters: scalars
    names = leaf.get_metadata().get("out_sharding")
    spec = layout.spec(names) if names and len(names) == len(leaf.shape) else PartitionSpec()
    return leaf.replace(NamedSharding(mesh, spec))  # factored moments (adafactor) replicate
  opt = jax.tree.map(leaf_sharding, abstract_opt, is_leaf=lambda x: isinstance(x, nnx.Variable))
  out = {"step": NamedSharding(mesh, PartitionSpec()), "params": param_shardings, "opt_state": opt}
  if ema:
    out["ema_params"] = param_shardings
  return out
