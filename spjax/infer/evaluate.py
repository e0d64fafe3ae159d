"""Held-out loss and perplexity per domain: the one evaluation the train loop and `spjax-eval` share.

  spjax-eval --workdir=/tmp/run [--step=N] [--ema] [--json=eval.json] [--config.data.source=...]

`spjax-eval` reads the run's config.json (any `--config.<key>=value` overrides it, e.g. another
data source, `eval_batches` or mesh sizes), restores one checkpoint's params (the raw ones, or with
`--ema` the moving average) straight into the layout's shardings and prints the loss per domain. It
takes plain, quantized (tools/quantize.py) and merged (tools/merge.py) workdirs alike, so each is
compared on the same batches as its original. `--json` writes one object with the keys of
metrics.jsonl's eval lines (`eval/loss`, `eval/perplexity`, `eval/<domain>/loss`, ...) plus `step`.

Exit status 2, with one line naming the problem, for a bad workdir, step or override.
"""

import json
import math
import sys

import jax
import numpy as np

from spjax.data import pipeline


class Evaluation:
  """The validation batches of every domain of `config.data`, and the mixture's weights."""

  def __init__(self, config, tokenizer, batch_sharding, *, batch_size: int, process_index: int = 0,
               process_count: int = 1):
    self.batches = config.eval_batches
    self.sets = pipeline.eval_datasets(  # {domain: batches of its validation split}
        config, tokenizer, batch_size=batch_size, process_index=process_index,
        process_count=process_count)
    self.weights = pipeline.eval_weights(config, tokenizer)  # the training mixture's shares
    self._sharding = batch_sharding

  def _to_global(self, batch):
    return {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v))
            for k, v in batch.items()}

  def __call__(self, eval_step, params, prefix: str = "eval") -> tuple[dict, dict]:
    """(metrics {f"{prefix}/loss", f"{prefix}/perplexity", per domain when several}, {domain:
    loss}): a fresh pass over `eval_batches` batches of each validation split."""
    out, losses = {}, {}
    for domain, ds in self.sets.items():
      sums = jax.device_get([eval_step(params, self._to_global(batch))
                             for _, batch in zip(range(self.batches), ds)])
      losses[domain] = sum(s["nll_sum"] for s in sums) / max(sum(s["tokens"] for s in sums), 1.0)
      if len(self.sets) > 1:
        out[f"{prefix}/{domain}/loss"] = float(losses[domain])
        out[f"{prefix}/{domain}/perplexity"] = math.exp(min(losses[domain], 80.0))
    loss = float(sum(w * losses[d] for d, w in self.weights.items()))
    out |= {f"{prefix}/loss": loss, f"{prefix}/perplexity": math.exp(min(loss, 80.0))}
    return out, losses


def summary(step: int, out: dict, losses: dict, prefix: str = "eval") -> str:
  """One printed line: total loss and perplexity, then each domain's loss."""
  name = "eval" if prefix == "eval" else prefix.replace("/", " ")
  domains = "".join(f" | {d} {float(losses[d]):.3f}" for d in losses) if len(losses) > 1 else ""
  return (f"{name} at step {step} | loss {out[f'{prefix}/loss']:.3f} | perplexity "
          f"{out[f'{prefix}/perplexity']:.1f}{domains}")


def evaluate_workdir(config, workdir: str, step: int | None = None, ema: bool = False) -> dict:
  """The eval metrics (and "step") of one checkpoint of `workdir` under `config`."""
  from spjax.convert import workdir as workdir_lib
  from spjax.data import tokenizer as tokenizer_lib
  from spjax.train import program as program_lib
  prog = program_lib.build(config)
  tokenizer = tokenizer_lib.load(config.data.tokenizer)
  evaluation = Evaluation(config, tokenizer, prog.batch_sharding,
                          batch_size=config.per_device_batch_size * prog.mesh.size)
  with prog.activate():
    params, shardings, step = workdir_lib.load_params(workdir, step, ema=ema)
    out, losses = evaluation(prog.jit_eval_step(shardings), params)
  print(summary(step, out, losses), flush=True)
  return {"step": step, **out}


def main(argv):
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  FLAGS = flags.FLAGS
  try:
    config = FLAGS.config
    config.init_from = ""  # the weights are the checkpoint's
    out = evaluate_workdir(config, FLAGS.workdir, FLAGS.step, FLAGS.ema)
  except ValueError as e:
    print(f"spjax-eval: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=2)


def run(argv=None):
  """Flags, with `--config` the workdir's own config.json, so `--config.<key>=value` overrides it."""
  import ml_collections
  from absl import app, flags, logging
  from ml_collections import config_flags

  from spjax.convert import workdir as workdir_lib
  argv = sys.argv if argv is None else argv
  workdir = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1:] or [None])[0]
                  for i, a in enumerate(argv) if a.split("=")[0] == "--workdir"), None)
  if workdir is None:
    print("spjax-eval: --workdir=DIR is required (a spjax run directory)", file=sys.stderr)
    sys.exit(2)
  try:
    saved = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  except ValueError as e:
    print(f"spjax-eval: {e}", file=sys.stderr)
    sys.exit(2)
  flags.DEFINE_string("workdir", None, "spjax run directory (config.json, checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
  flags.DEFINE_bool("ema", False, "Evaluate the moving average of the params (config.ema_decay).")
  flags.DEFINE_string("json", "", "Write the metrics to this JSON file.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every array at INFO

  def fail(e):  # a bad --config.<key> override or flag: one line, no traceback
    while isinstance(e.__context__, KeyError):  # the locked config's did-you-mean is innermost
      e = e.__context__
    message = f"unknown config key {e.args[0]}" if isinstance(e, KeyError) else str(e)
    print(f"spjax-eval: {message}", file=sys.stderr)
    sys.exit(2)

  def parse(args):
    try:
      return flags.FLAGS(args)
    except Exception as e:
      fail(e)
  try:  # the overrides are applied here already, when the flag is defined
    config_flags.DEFINE_config_dict("config", saved, "The run's config; override keys with "
                                    "--config.<key>=value.", lock_config=True)
  except Exception as e:
    fail(e)
  app.run(main, argv=argv, flags_parser=parse)


if __name__ == "__main__":
  run()
