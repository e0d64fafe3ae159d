"""train_and_evaluate(config, workdir): build the program, restore or init the state, loop."""

import math
import os
import time

import jax
import numpy as np

from spjax import checkpoint as checkpoint_lib
from spjax import metrics as metrics_lib
from spjax import program as program_lib
from spjax.data import pipeline
from spjax.data import tokenizer as tokenizer_lib


def train_and_evaluate(config, workdir: str) -> dict:
  # ================================================================================================
  # Config, tokenizer, mesh and layout: every check here runs before anything compiles.
  # ================================================================================================
  prog = program_lib.build(config)
  model_cfg, mesh = prog.model_cfg, prog.mesh
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}); raise model.vocab_size")
  flops_per_token = metrics_lib.flops_per_token(model_cfg, config.seq_len)
  peak_flops = mesh.size * metrics_lib.peak_flops_per_device(jax.devices()[0],
                                                             config.peak_tflops_per_device)
  primary = jax.process_index() == 0
  if primary:
    print(f"spjax: {model_cfg.num_params() / 1e6:.1f}M params, mesh "
          f"{ {a: s for a, s in mesh.shape.items() if s > 1} }, layout {prog.layout.source}\n"
          f"{prog.layout.describe()}", flush=True)

  os.makedirs(workdir, exist_ok=True)
  if primary:
    metrics_lib.write_config(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, config.num_train_steps, is_primary=primary)
  ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                     save_every_steps=config.checkpoint_every_steps)

  # ================================================================================================
  # Data: each process reads its own rows of the global batch.
  # ================================================================================================
  data_kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = iter(pipeline.make_dataset(
      config, "train", tokenizer, batch_size=prog.global_batch // jax.process_count(), **data_kw))
  eval_ds = pipeline.make_dataset(
      config, "validation", tokenizer,
      batch_size=config.per_device_batch_size * mesh.size // jax.process_count(), **data_kw)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(prog.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  with prog.activate():
    # ==============================================================================================
    # State: born sharded by a jit init, or restored straight into the same shardings.
    # ==============================================================================================
    start_step = ckpt.latest_step()
    if start_step is None:
      state, start_step = prog.jit_init()(), 0
    else:
      state = ckpt.restore(start_step, prog.abstract_state(), train_iter)
      print(f"spjax: resumed from {workdir}/checkpoints at step {start_step}", flush=True)
    train_step, eval_step = prog.jit_train_step(), prog.jit_eval_step()

    def evaluate(step):
      sums = [eval_step(state["params"], to_global(batch))  # a fresh pass over the split each time
              for _, batch in zip(range(config.eval_batches), eval_ds)]
      sums = jax.device_get(sums)
      loss = sum(s["nll_sum"] for s in sums) / max(sum(s["tokens"] for s in sums), 1.0)
      out = {"eval/loss": float(loss), "eval/perplexity": float(math.exp(min(loss, 80.0)))}
      writer.write(step, out)
      if primary:
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
        tokens_per_sec = len(window) * prog.global_batch * config.seq_len / elapsed
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
