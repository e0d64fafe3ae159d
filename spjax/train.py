"""train_and_evaluate(config, workdir): config -> mesh -> layout -> born-sharded state -> jit -> loop."""

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spjax import checkpoint as checkpoint_lib
from spjax import metrics as metrics_lib
from spjax import model as model_lib
from spjax import optim
from spjax import sharding
from spjax import step as step_lib
from spjax.data import pipeline
from spjax.data import tokenizer as tokenizer_lib


def check_config(config):
  """Raises ValueError naming the first config field that cannot work (before any compile)."""
  positive = ("num_train_steps", "log_every_steps", "eval_every_steps", "eval_batches",
              "checkpoint_every_steps", "max_checkpoints_to_keep", "per_device_batch_size",
              "seq_len", "grad_accum_steps")
  for name in positive:
    if config[name] <= 0:
      raise ValueError(f"config.{name} must be a positive integer, got {config[name]}")
  if config.z_loss < 0:
    raise ValueError(f"config.z_loss must be >= 0, got {config.z_loss}")
  if config.peak_tflops_per_device < 0:
    raise ValueError(f"config.peak_tflops_per_device must be >= 0, got "
                     f"{config.peak_tflops_per_device}")
  return model_lib.ModelConfig.from_config(config.model)


def build(config, devices=None):
  """Everything a step needs, validated on shapes only: (model_cfg, layout, mesh, abstract params)."""
  model_cfg = check_config(config)
  layout = sharding.Layout.parse(config.layout)
  mesh = sharding.make_mesh(config.mesh, layout, devices)
  micro_batch = config.per_device_batch_size * mesh.size
  for name, (shape, names) in model_lib.activation_shapes(model_cfg, micro_batch,
                                                          config.seq_len).items():
    sharding.validate_tensor(layout, mesh, name, shape, names)
  abstract_model = nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(config.seed)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  param_shardings = sharding.param_shardings(abstract_params, mesh, layout)
  return model_cfg, layout, mesh, graphdef, abstract_params, param_shardings


def state_shardings(abstract_params, param_shardings, tx, mesh, layout):
  """Shardings of {"step", "params", "opt_state"}: optimizer moments follow their parameter."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)

  def leaf_sharding(leaf):
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    if names and len(names) == len(leaf.shape):
      return NamedSharding(mesh, layout.spec(names))
    return NamedSharding(mesh, PartitionSpec())  # counters, factored moments: small, replicated
  opt = jax.tree.map(leaf_sharding, abstract_opt, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return {"step": NamedSharding(mesh, PartitionSpec()), "params": param_shardings,
          "opt_state": opt}


def train_and_evaluate(config, workdir: str) -> dict:
  # ================================================================================================
  # Config, tokenizer, mesh and layout: every check here runs before anything compiles.
  # ================================================================================================
  model_cfg, layout, mesh, graphdef, abstract_params, param_shardings = build(config)
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}); raise model.vocab_size")
  tx, schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
  shardings = state_shardings(abstract_params, param_shardings, tx, mesh, layout)
  batch_sharding = NamedSharding(mesh, layout.spec(("batch", "length")))
  rules = layout.flax_rules()
  flops_per_token = metrics_lib.flops_per_token(model_cfg, config.seq_len)
  peak_flops = mesh.size * metrics_lib.peak_flops_per_device(jax.devices()[0],
                                                             config.peak_tflops_per_device)
  if jax.process_index() == 0:
    print(f"spjax: {model_cfg.num_params() / 1e6:.1f}M params, mesh "
          f"{ {a: s for a, s in mesh.shape.items() if s > 1} }, layout {layout.source}\n"
          f"{layout.describe()}", flush=True)

  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  if primary:
    metrics_lib.write_config(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, config.num_train_steps, is_primary=primary)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                     save_every_steps=config.checkpoint_every_steps)

  # ================================================================================================
  # Data: each process reads its own rows of the global batch.
  # ================================================================================================
  global_batch = config.per_device_batch_size * mesh.size * config.grad_accum_steps
  process_rows = global_batch // jax.process_count()
  data_kw = dict(batch_size=process_rows, process_index=jax.process_index(),
                 process_count=jax.process_count())
  train_iter = iter(pipeline.make_dataset(config, "train", tokenizer, **data_kw))
  eval_rows = config.per_device_batch_size * mesh.size // jax.process_count()
  eval_ds = pipeline.make_dataset(config, "validation", tokenizer, **(data_kw | {
      "batch_size": eval_rows}))

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  # ================================================================================================
  # State, born sharded: init is jit-compiled with the layout's out_shardings, so no device ever
  # holds the whole model; on resume the same shardings are the restore target.
  # ================================================================================================
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    def init_state():
      params = nnx.state(model_lib.Transformer(model_cfg, nnx.Rngs(config.seed)), nnx.Param)
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    start_step = ckpt.latest_step()
    if start_step is None:
      state = jax.jit(init_state, out_shardings=shardings)()
      start_step = 0
    else:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              jax.eval_shape(init_state), shardings)
      state = ckpt.restore(start_step, abstract, train_iter)
      logging.info("resumed from %s/checkpoints at step %d", workdir, start_step)

    # ==============================================================================================
    # Compiled steps: explicit shardings in and out, state donated (updated in place).
    # ==============================================================================================
    train_step = jax.jit(
        functools.partial(step_lib.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                          seed=config.seed, grad_accum_steps=config.grad_accum_steps,
                          z_loss=config.z_loss),
        in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef),
                        in_shardings=(param_shardings, batch_sharding))

    def evaluate(step):
      sums = []
      for _, batch in zip(range(config.eval_batches), eval_ds):  # a fresh pass each time
        sums.append(eval_step(state["params"], to_global(batch)))
      sums = jax.device_get(sums)
      loss = sum(s["nll_sum"] for s in sums) / max(sum(s["tokens"] for s in sums), 1.0)
      out = {"eval/loss": float(loss), "eval/perplexity": float(math.exp(min(loss, 80.0)))}
      writer.write(step, out)
      if jax.process_index() == 0:
        print(f"eval at step {step} | loss {out['eval/loss']:.3f} | "
              f"perplexity {out['eval/perplexity']:.1f}", flush=True)
      return out

    # ==============================================================================================
    # Train loop.
    # ==============================================================================================
    pending, window_start, final = [], time.perf_counter(), {}
    for step in range(start_step, config.num_train_steps):
      state, metrics = train_step(state, to_global(next(train_iter)))
      pending.append(metrics)  # fetched only when logging, so steps stay asynchronous
      done = step + 1
      if done % config.log_every_steps == 0 or done == config.num_train_steps:
        window = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = len(window) * global_batch * config.seq_len / elapsed
        final = {
            "train/loss": float(np.mean([m["loss"] for m in window])),
            "train/grad_norm": float(window[-1]["grad_norm"]),
            "train/learning_rate": float(window[-1]["learning_rate"]),
            "train/tokens_per_sec": tokens_per_sec,
            "train/mfu": tokens_per_sec * flops_per_token / peak_flops,
        }
        if not all(map(math.isfinite, (final["train/loss"], final["train/grad_norm"]))):
          raise FloatingPointError(f"loss or gradient norm is not finite at step {done}: {final}")
        writer.write(done, final)
        writer.progress(done, final["train/loss"], tokens_per_sec)
        pending, window_start = [], time.perf_counter()
      if done % config.eval_every_steps == 0 or done == config.num_train_steps:
        final |= evaluate(done)
        window_start = time.perf_counter()  # eval time is not training throughput
      ckpt.save(done, state, train_iter, force=done == config.num_train_steps)

  ckpt.close()
  writer.close()
  return final
