"""What pruning costs in quality: eval loss of pruned vs dense training, same model, data and steps.

  python benchmarks/prune_quality.py [--steps 300] [--batch 16] [--settings dense,50%,...] \
      [--set model.d_model=256 --set ...] [--json OUT]

Trains the `tiny` model on the embedded corpus (one CPU device, batch 16 x 128 by default, fp32)
once dense and once per pruning setting: 50%, 75% and 90% unstructured magnitude pruning on the
cubic schedule (from 20% to 60% of the steps, masks every 10 steps) and 2:4 (pruned once at 20%). The remaining
steps train the sparse model. Same seed, data order and steps for all; prints the final eval loss
(16 held-out batches), its ratio to dense, and the sparsity measured on the saved matrices.
`--set KEY=VALUE` overrides any config key in every run (a larger model, the learning rate).
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from spjax.compress import prune  # noqa: E402
from spjax.convert import workdir as workdir_lib  # noqa: E402
from spjax.train import loop  # noqa: E402
from config_overrides import override  # noqa: E402

SETTINGS = {"dense": {}, "50%": {"prune.sparsity": 0.5}, "75%": {"prune.sparsity": 0.75},
            "90%": {"prune.sparsity": 0.9}, "2:4": {"prune.pattern": "2:4"}}


def run(name: str, steps: int, batch: int, workdir: str, overrides: dict) -> dict:
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({**overrides,
      "num_train_steps": steps, "eval_every_steps": steps, "eval_batches": 16,
      "checkpoint_every_steps": steps, "log_every_steps": 50, "layout": "dp",
      "per_device_batch_size": batch, "model.dtype": "float32",
      "prune.start_step": steps // 5, "prune.end_step": steps * 3 // 5, "prune.every_steps": 10,
      **SETTINGS[name]})
  final = loop.train_and_evaluate(cfg, workdir)
  model, _ = workdir_lib.load(workdir)
  rows = prune.sparsity_report(nnx.state(model, nnx.Param), cfg.prune.exclude)
  zeros = sum(f * n for _, f, n in rows) / sum(n for _, _, n in rows)
  return {"eval_loss": final["eval/loss"], "perplexity": final["eval/perplexity"],
          "sparsity": zeros}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per step")
  parser.add_argument("--settings", default=",".join(SETTINGS),
                      help=f"comma-separated subset of {', '.join(SETTINGS).replace('%', '%%')} "
                      "(runs are deterministic, so subsets run apart give the same numbers)")
  parser.add_argument("--set", type=override, action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run, e.g. model.d_model=256")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  overrides = dict(args.set)
  logging.set_verbosity(logging.WARNING)
  unknown = set(args.settings.split(",")) - set(SETTINGS)
  if unknown:
    parser.error(f"unknown settings {sorted(unknown)}; valid: {', '.join(SETTINGS)}")
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.settings.split(","):
      results[name] = run(name, args.steps, args.batch, os.path.join(tmp, name.replace(":", "_")),
                          overrides)
  dense = results["dense"]["eval_loss"] if "dense" in results else float("nan")
  print(f"\ntiny model {overrides or ''}, {args.steps} steps, batch {args.batch} x 128, embedded corpus")
  print(f"{'setting':<8} {'sparsity':>9} {'eval loss':>10} {'perplexity':>11} {'loss / dense':>13}")
  for name, r in results.items():
    r["loss_ratio"] = r["eval_loss"] / dense
    print(f"{name:<8} {r['sparsity']:>9.1%} {r['eval_loss']:>10.4f} {r['perplexity']:>11.2f} "
          f"{r['loss_ratio']:>13.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"steps": args.steps, "overrides": overrides, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
