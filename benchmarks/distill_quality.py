"""What distillation buys: a student a quarter of the teacher's size, distilled vs trained on CE alone.

  python benchmarks/distill_quality.py [--teacher_steps 300] [--steps 200] [--batch 16] \
      [--kd 0.5:2.0,1.0:1.0] [--skip_ce] [--json OUT]

Trains a teacher (the `tiny` shape with 3 layers: d_model 128, mlp 512, 1.00M params) on the
embedded corpus, then students a quarter of its size (d_model 64, 2 layers, 4 heads, mlp 256:
0.26M params) for the same steps on the same data order from the same init: one on the
cross-entropy alone, the others on alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE for
each --kd alpha:T (the full distribution, logits in chunks of 32 positions). One CPU device, batch
16 x 128 by default, fp32. Prints each model's final eval loss on 16 held-out batches and each
distilled student's ratio to the CE-only one.
"""

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from configs import default  # noqa: E402
from spjax.model import model as model_lib  # noqa: E402
from spjax.train import loop  # noqa: E402

TEACHER = {"model.num_layers": 3}
STUDENT = {"model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 4,
           "model.mlp_dim": 256}
CHUNK = {"distill.chunk_size": 32}


def config(steps: int, batch: int, **overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({
      "num_train_steps": steps, "eval_every_steps": steps, "eval_batches": 16,
      "checkpoint_every_steps": steps, "log_every_steps": 50, "layout": "dp",
      "per_device_batch_size": batch, "model.dtype": "float32", **overrides})
  return cfg


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher_steps", type=int, default=300)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16, help="sequences of 128 tokens per step")
  parser.add_argument("--kd", default="0.5:2.0",
                      help="distilled students to train, as alpha:temperature[,alpha:temperature]")
  parser.add_argument("--skip_ce", action="store_true",
                      help="no CE-only student (runs are deterministic: reuse an earlier one)")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  with tempfile.TemporaryDirectory() as tmp:
    teacher_dir = os.path.join(tmp, "teacher")
    teacher_cfg = config(args.teacher_steps, args.batch, **TEACHER)
    runs = {"teacher": (teacher_cfg, teacher_dir)}
    if not args.skip_ce:
      runs["student, CE only"] = (config(args.steps, args.batch, **STUDENT),
                                  os.path.join(tmp, "ce"))
    for i, pair in enumerate(args.kd.split(",")):
      alpha, temperature = map(float, pair.split(":"))
      kd = {"distill.teacher": teacher_dir, "distill.alpha": alpha,
            "distill.temperature": temperature, **CHUNK}
      runs[f"distilled a={alpha:g} T={temperature:g}"] = (
          config(args.steps, args.batch, **STUDENT, **kd), os.path.join(tmp, f"kd{i}"))
    results = {}
    for name, (cfg, workdir) in runs.items():
      final = loop.train_and_evaluate(cfg, workdir)
      params = model_lib.ModelConfig.from_config(cfg.model).num_params()
      results[name] = {"params": params, "steps": cfg.num_train_steps,
                       "eval_loss": final["eval/loss"], "perplexity": final["eval/perplexity"]}

  print(f"\nembedded corpus, batch {args.batch} x 128, logits in chunks of 32 positions")
  print(f"{'model':<22} {'params':>8} {'steps':>6} {'eval loss':>10} {'perplexity':>11}")
  for name, r in results.items():
    print(f"{name:<22} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['eval_loss']:>10.4f} "
          f"{r['perplexity']:>11.2f}")
  ce = results.get("student, CE only")
  for name, r in results.items():
    if name.startswith("distilled") and ce:
      print(f"{name}: eval loss / CE-only student's {r['eval_loss'] / ce['eval_loss']:.4f}")
  student = next(r for n, r in results.items() if n != "teacher")
  print(f"student / teacher params: {student['params'] / results['teacher']['params']:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "steps": args.steps, "batch": args.batch}, f, indent=2)


if __name__ == "__main__":
  main()
