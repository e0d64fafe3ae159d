"""What distillation buys: a student a quarter of the teacher's size, distilled vs trained on CE alone.

  python benchmarks/distill_quality.py [--teacher_steps 300] [--steps 200] [--batch 16] \
      [--json OUT]

Trains a teacher (the `tiny` shape with 3 layers: d_model 128, mlp 512, 1.00M params) on the
embedded corpus, then two students a quarter of its size (d_model 64, 2 layers, 4 heads, mlp 256:
0.26M params) for the same steps on the same data order from the same init: one on the
cross-entropy alone, one on
alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (alpha 0.5, T 2, the full distribution,
chunks of 32 positions). One CPU device, batch 16 x 128 by default, fp32. Prints each model's
final eval loss on 16 held-out batches and the students' ratio.
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
DISTILL = {"distill.alpha": 0.5, "distill.temperature": 2.0, "distill.chunk_size": 32}


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
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)

  with tempfile.TemporaryDirectory() as tmp:
    teacher_dir = os.path.join(tmp, "teacher")
    teacher_cfg = config(args.teacher_steps, args.batch, **TEACHER)
    runs = {"teacher": (teacher_cfg, teacher_dir),
            "student, CE only": (config(args.steps, args.batch, **STUDENT),
                                 os.path.join(tmp, "ce")),
            "student, distilled": (config(args.steps, args.batch, **STUDENT, **DISTILL,
                                          **{"distill.teacher": teacher_dir}),
                                   os.path.join(tmp, "kd"))}
    results = {}
    for name, (cfg, workdir) in runs.items():
      final = loop.train_and_evaluate(cfg, workdir)
      params = model_lib.ModelConfig.from_config(cfg.model).num_params()
      results[name] = {"params": params, "steps": cfg.num_train_steps,
                       "eval_loss": final["eval/loss"], "perplexity": final["eval/perplexity"]}

  print(f"\nembedded corpus, batch {args.batch} x 128; distillation {DISTILL}")
  print(f"{'model':<20} {'params':>8} {'steps':>6} {'eval loss':>10} {'perplexity':>11}")
  for name, r in results.items():
    print(f"{name:<20} {r['params'] / 1e6:>7.2f}M {r['steps']:>6} {r['eval_loss']:>10.4f} "
          f"{r['perplexity']:>11.2f}")
  ratio = results["student, distilled"]["eval_loss"] / results["student, CE only"]["eval_loss"]
  size = results["student, CE only"]["params"] / results["teacher"]["params"]
  print(f"student / teacher params: {size:.2f}; distilled / CE-only eval loss: {ratio:.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"results": results, "distill": DISTILL, "loss_ratio": ratio}, f, indent=2)


if __name__ == "__main__":
  main()
