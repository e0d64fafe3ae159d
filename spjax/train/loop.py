"""train_and_evaluate(config, workdir): build the program, restore or init the state, loop."""

import contextlib
import os
import time

import jax
import numpy as np

from spjax.data import instruct
from spjax.data import pipeline
from spjax.data import tokenizer as tokenizer_lib
from spjax.infer import evaluate as evaluate_lib
from spjax.infer import exact_match
from spjax.train import checkpoint as checkpoint_lib
from spjax.train import metrics as metrics_lib
from spjax.train import plots
from spjax.train import preemption
from spjax.train import program as program_lib


class BadStepError(RuntimeError):
  """A step had a non-finite loss or gradient and config.nan_policy is "abort"."""


def run_dir(config, workdir: str) -> str:
  """`workdir/run_name`, refusing a run name that would leave `workdir`."""
  base = os.path.abspath(workdir)
  path = os.path.abspath(os.path.join(base, config.run_name))
  if os.path.commonpath([base, path]) != base:
    raise ValueError(f"config.run_name {config.run_name!r} escapes --workdir {workdir!r}; use a "
                     "relative name without '..'")
  return path


def train_and_evaluate(config, workdir: str) -> dict:
  # ================================================================================================
  # Config, tokenizer, mesh and layout: every check here runs before anything compiles.
  # ================================================================================================
  workdir = run_dir(config, workdir)
  prog = program_lib.build(config)
  model_cfg, mesh = prog.model_cfg, prog.mesh
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"model.vocab_size ({model_cfg.vocab_size}) is smaller than the tokenizer's "
                     f"vocabulary ({tokenizer.vocab_size}); raise model.vocab_size")
  # config.json records the chat template the run trains with, for spjax-generate --prompts_file.
  config.data.chat_template = instruct.resolve_template(config.data.chat_template, tokenizer)
  flops_per_token = prog.flops_per_token()  # LoRA-aware: a frozen base does no weight gradients
  peak_flops = mesh.size * metrics_lib.peak_flops_per_device(jax.devices()[0],
                                                             config.peak_tflops_per_device)
  primary = jax.process_index() == 0
  if config.plot_every_eval:
    plots.require()
  if primary:
    print(f"spjax: {model_cfg.num_params() / 1e6:.1f}M params, mesh "
          f"{ {a: s for a, s in mesh.shape.items() if s > 1} }, layout {prog.layout.source}\n"
          f"{prog.layout.describe()}", flush=True)
    if prog.pipeline:
      print(f"spjax: {prog.pipeline.describe()}", flush=True)

  os.makedirs(workdir, exist_ok=True)
  if primary:
    metrics_lib.write_config(workdir, config)
  # Closed however the run ends, an exception too: the SIGTERM handler is put back, the last
  # async checkpoint finished, TensorBoard's queue flushed before the interpreter shuts down.
  with contextlib.ExitStack() as cleanup:
    writer = metrics_lib.MetricWriter(workdir, config.num_train_steps, is_primary=primary)
    cleanup.callback(writer.close)
    ckpt = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.max_checkpoints_to_keep,
                                       save_every_steps=config.checkpoint_every_steps,
                                       keep_every_steps=config.keep_checkpoint_every_steps)
    cleanup.callback(ckpt.close)
    watcher = preemption.Watcher(ckpt)
    cleanup.callback(watcher.close)

    # ==============================================================================================
    # Data: each process reads its own rows of the global batch.
    # ==============================================================================================
    data_kw = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = iter(pipeline.make_dataset(
        config, "train", tokenizer, batch_size=prog.global_batch // jax.process_count(), **data_kw))
    evaluation = evaluate_lib.Evaluation(
        config, tokenizer, prog.batch_sharding,
        batch_size=config.per_device_batch_size * mesh.size // jax.process_count(), **data_kw)
    em_examples = exact_match.held_out(config, tokenizer, jax.process_count())  # [] unless sft

    def to_global(batch):
      return {k: jax.make_array_from_process_local_data(prog.batch_sharding, np.asarray(v))
              for k, v in batch.items()}

    with prog.activate():
      # ============================================================================================
      # State: born sharded by a jit init, or restored straight into the same shardings.
      # ============================================================================================
      start_step = ckpt.latest_step()
      if start_step is None:
        if config.init_from:
          state = prog.pretrained_state()
          print(f"spjax: starting from the weights of {config.init_from}", flush=True)
        else:
          state = prog.jit_init()()
        start_step = 0
      else:
        state = prog.restore(ckpt, start_step, train_iter)
        print(f"spjax: resumed from {workdir}/checkpoints at step {start_step}", flush=True)
      train_step, eval_step = prog.jit_train_step(), prog.jit_eval_step()

      def evaluate(step):
        """Loss per domain (a fresh pass over each validation split) and their mixture-weighted sum;
        the same for the moving average of the params when there is one."""
        out = {}
        for key, prefix in (("params", "eval"), ("ema_params", "eval/ema")):
          if key in state:
            metrics, losses = evaluation(eval_step, state[key], prefix)
            out |= metrics
            if primary:
              print(evaluate_lib.summary(step, metrics, losses, prefix), flush=True)
        writer.write(step, out)
        if primary and config.plot_every_eval:  # WORKDIR/metrics.png, redrawn with every eval
          plots.plot([workdir], os.path.join(workdir, "metrics.png"))
        return out

      def log_window(step, window, elapsed):
        """Writes the mean metrics of the steps since the last log; applies config.nan_policy."""
        finite = [m for m in window if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])]
        skipped = int(jax.device_get(state["opt_state"].total_notfinite))  # over the whole run
        if len(finite) < len(window) and config.nan_policy == "abort":
          prog.save(ckpt, step, state, train_iter, force=True)  # bad updates were never applied
          ckpt.wait()
          raise BadStepError(
              f"{len(window) - len(finite)} step(s) up to step {step} had a non-finite loss or "
              f"gradient (config.nan_policy='abort'); their updates were not applied and the "
              f"state after step {step} is saved in {workdir}/checkpoints. Set "
              "config.nan_policy='skip' to train through such steps.")
        tokens_per_sec = len(window) * prog.global_batch * config.seq_len / elapsed
        out = {
            "train/loss": float(np.mean([m["loss"] for m in finite])) if finite else float("nan"),
            "train/grad_norm": float(finite[-1]["grad_norm"]) if finite else float("nan"),
            "train/learning_rate": float(window[-1]["learning_rate"]),
            "train/tokens_per_sec": tokens_per_sec,
            "train/mfu": tokens_per_sec * flops_per_token / peak_flops,
            "train/skipped_steps": skipped,
            "train/tokens": step * prog.global_batch * config.seq_len,  # seen so far (plot x-axis)
        }
        for name in sorted(window[-1].keys() - {"loss", "grad_norm", "learning_rate", "tokens"}):
          # the objective's own terms (distillation: kl, ce)
          out[f"train/{name}"] = (float(np.mean([m[name] for m in finite])) if finite
                                  else float("nan"))
        writer.write(step, out)
        writer.progress(step, out["train/loss"], tokens_per_sec)
        return out

      # ============================================================================================
      # Train loop.
      # ============================================================================================
      pending, window_start, final, stop = [], time.perf_counter(), {}, False
      for step in range(start_step, config.num_train_steps):
        state, metrics = train_step(state, to_global(next(train_iter)))
        pending.append(metrics)  # fetched only when logging, so steps stay asynchronous
        done = step + 1
        if done % config.log_every_steps == 0 or done == config.num_train_steps:
          final = log_window(done, jax.device_get(pending), time.perf_counter() - window_start)
          pending, window_start = [], time.perf_counter()
        if done % config.eval_every_steps == 0 or done == config.num_train_steps:
          final |= evaluate(done)
          window_start = time.perf_counter()  # eval time is not training throughput
        stop = watcher.should_stop(done)
        prog.save(ckpt, done, state, train_iter, force=stop or done == config.num_train_steps)
        if stop:
          if pending:
            log_window(done, jax.device_get(pending), time.perf_counter() - window_start)
          if primary:
            print(f"spjax: preempted; saved step {done}. Rerun the same command to resume.",
                  flush=True)
          break

      if em_examples and not stop:
        score, _ = exact_match.for_params(
            prog.graphdef, state["params"], em_examples, tokenizer, config.data.chat_template,
            max_prompt_tokens=config.seq_len, batch_size=config.per_device_batch_size * mesh.size)
        step = int(jax.device_get(state["step"]))
        final["eval/exact_match"] = score
        writer.write(step, {"eval/exact_match": score})
        if primary:
          print(f"exact match at step {step}: {score:.3f} on {len(em_examples)} held-out prompts",
                flush=True)

    ckpt.wait()
  return final
