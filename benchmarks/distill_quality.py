"""What distillation buys: a student a quarter of the teacher's size, distilled vs trained on CE alone.

  python benchmarks/distill_quality.py [--teacher_steps 1200] [--steps 400] [--batch 16] \
      [--kd 0.5:1.0,0.5:2.0,0.9:1.0] [--skip_ce] [--dir DIR] [--teacher WORKDIR] [--json OUT] \
      [--student_set model.d_model=128 --student_set ...]

Trains a teacher (the `tiny` shape with 3 layers: d_model 128, mlp 512, 1.00M params) on the
embedded corpus, evaluated 5 times on the way (how near its plateau it is), then students a quarter
of its size (d_model 64, 2 layers, 4 heads, mlp 256: 0.26M params) for the same steps on the same
data order from the same init: one on the cross-entropy alone, the others on
alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE for each --kd alpha:T (the full
distribution, logits in chunks of 32 positions). One CPU device, batch 16 x 128 by default, fp32.
Prints each model's final eval loss on 16 held-out batches and each distilled student's ratio to
the CE-only one.

Runs live in DIR/<name> with --dir (teacher, ce_<steps>, kd_<steps>_a<alpha>_T<T>), and one already
finished there is read back rather than trained again, so a teacher is trained once
(`--skip_ce --kd ''` trains only it) and each student can be its own invocation. --teacher
distills from any existing spjax workdir instead of training one, and `--student_set KEY=VALUE`
overrides the students' config (its shape, learning rate) for a larger teacher.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402
from absl import logging  # noqa: E402

from configs import default  # noqa: E402
from spjax.model import model as model_lib  # noqa: E402
from spjax.train import loop  # noqa: E402
from config_overrides import override  # noqa: E402

TEACHER = {"model.num_layers": 3}
STUDENT = {"model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 4,
           "model.mlp_dim": 256}
CHUNK = {"distill.chunk_size": 32}


def config(steps: int, batch: int, evals: int = 1, **overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({
      "num_train_steps": steps, "eval_every_steps": max(steps // evals, 1), "eval_batches": 16,
      "checkpoint_every_steps": steps, "log_every_steps": 50, "layout": "dp",
      "per_device_batch_size": batch, "model.dtype": "float32", **overrides})
  return cfg


def evals_of(workdir: str) -> list:
  """(step, eval/loss) of every evaluation in a run's metrics.jsonl."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval/loss" in row:
        out.append((row["step"], row["eval/loss"]))
  return out


def finished(workdir: str, steps: int) -> bool:
  """Whether `workdir` holds a run evaluated at its last step (`steps`)."""
  return (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and
          any(step == steps for step, _ in evals_of(workdir)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher_steps", type=int, default=1200)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per step")
  parser.add_argument("--kd", default="0.5:1.0,0.5:2.0,0.9:1.0",
                      help="distilled students to train, as alpha:temperature[,alpha:temperature]")
  parser.add_argument("--skip_ce", action="store_true", help="no CE-only student (with --kd '': "
                                                             "train the teacher only)")
  parser.add_argument("--dir", default="",
                      help="keep every run in DIR/<name> (default: a temporary directory); a run "
                           "already finished there is read back, not trained again")
  parser.add_argument("--teacher", default="",
                      help="an existing teacher workdir to distill from (not trained here)")
  parser.add_argument("--student_set", type=override, action="append", default=[],
                      metavar="KEY=VALUE", help="a config override of every student")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  student = STUDENT | dict(args.student_set)
  logging.set_verbosity(logging.WARNING)

  with tempfile.TemporaryDirectory() as tmp:
    root = args.dir or tmp
    teacher_dir = os.path.abspath(args.teacher or os.path.join(root, "teacher"))
    runs = {}
    if not args.teacher:  # 5 evaluations on the way: how close to its plateau the teacher is
      runs["teacher"] = (config(args.teacher_steps, args.batch, evals=5, **TEACHER), teacher_dir)
    if not args.skip_ce:
      runs["student, CE only"] = (config(args.steps, args.batch, **student),
                                  os.path.join(root, f"ce_{args.steps}"))
    for pair in filter(None, args.kd.split(",")):
      alpha, temperature = map(float, pair.split(":"))
      kd = {"distill.teacher": teacher_dir, "distill.alpha": alpha,
            "distill.temperature": temperature, **CHUNK}
      runs[f"distilled a={alpha:g} T={temperature:g}"] = (
          config(args.steps, args.batch, **student, **kd),
          os.path.join(root, f"kd_{args.steps}_a{alpha:g}_T{temperature:g}"))
    results = {}
    for name, (cfg, workdir) in runs.items():
      start = time.time()
      if not finished(workdir, cfg.num_train_steps):
        loop.train_and_evaluate(cfg, workdir)
      params = model_lib.ModelConfig.from_config(cfg.model).num_params()
      history = evals_of(workdir)
      results[name] = {"params": params, "steps": cfg.num_train_steps, "eval_loss": history[-1][1],
                       "perplexity": math.exp(history[-1][1]), "evals": history,
                       "seconds": time.time() - start}
      print(f"{name}: eval loss {history[-1][1]:.4f} ({time.time() - start:.0f} s)", flush=True)
    if args.teacher:
      saved = json.load(open(os.path.join(teacher_dir, "config.json")))
      params = model_lib.ModelConfig.from_config(
          ml_collections.ConfigDict(saved["model"])).num_params()
      history = evals_of(teacher_dir)
      results = {"teacher": {"params": params, "steps": history[-1][0],
                             "eval_loss": history[-1][1], "perplexity": math.exp(history[-1][1]),
                             "evals": history}} | results

  print(f"\nembedded corpus, batch {args.batch} x 128, logits in chunks of 32 positions")
  print(f"{'model':<22} {'params':>8} {'steps':>6} {'eval loss':>10} {'perplexity':>11}")
  for name, r in results.items():
    print(f"{name:<22} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['eval_loss']:>10.4f} "
          f"{r['perplexity']:>11.2f}")
  print("teacher's eval loss on the way: " +
        ", ".join(f"{s}: {l:.4f}" for s, l in results["teacher"]["evals"]))
  ce = results.get("student, CE only")
  for name, r in results.items():
    if name.startswith("distilled") and ce:
      print(f"{name}: eval loss / CE-only student's {r['eval_loss'] / ce['eval_loss']:.4f}")
  for r in [r for n, r in results.items() if n != "teacher"][:1]:
    print(f"student / teacher params: {r['params'] / results['teacher']['params']:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "steps": args.steps, "batch": args.batch,
                 "student_set": dict(args.student_set)}, f, indent=2)


if __name__ == "__main__":
  main()
