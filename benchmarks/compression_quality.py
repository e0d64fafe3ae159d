"""What compression costs in quality, measured on one trained run: quantization, soups, EMA.

  python benchmarks/compression_quality.py --workdir=/tmp/run [--k=5] [--out=/tmp/compress] [--json=f]

From the run's checkpoints (trained with config.ema_decay > 0 for the EMA row), with the commands a
user would run (spjax-quantize, spjax-merge, spjax-eval's evaluation), all evaluated on the same
validation batches (the run's config.data, config.eval_batches):
- the newest checkpoint in float32, int8 per channel and int4 in groups of 128: eval loss,
  perplexity, its change against float32, and bytes of the weights (int4 at half a byte);
- a uniform and a greedy soup of the last k checkpoints against the best single one of them;
- the moving average of the params against the raw params at the newest step.
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import ml_collections  # noqa: E402

from spjax.compress import merge  # noqa: E402
from spjax.convert import workdir as workdir_lib  # noqa: E402
from spjax.infer import evaluate  # noqa: E402


def eval_loss(workdir: str, step=None, ema=False) -> dict:
  config = ml_collections.ConfigDict(workdir_lib.read_config(workdir))
  config.init_from = ""
  return evaluate.evaluate_workdir(config, workdir, step, ema=ema)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--k", type=int, default=5, help="soups of the last k checkpoints")
  parser.add_argument("--out", default="/tmp/spjax-compression")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  steps = workdir_lib.checkpoint_steps(args.workdir)
  last = steps[-1]
  rows = {"quantization": [], "fusion": [], "ema": []}

  fp = eval_loss(args.workdir)
  rows["quantization"].append({"model": "float32", **fp, "bytes": None})
  for bits, name in ((8, "int8 per channel"), (4, "int4 g128")):
    out = os.path.join(args.out, f"int{bits}")
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "quantize.py"),
                    f"--workdir={args.workdir}", f"--bits={bits}", f"--out={out}",
                    f"--json={out}.json"], check=True)
    sizes = json.load(open(f"{out}.json"))
    rows["quantization"].append({"model": name, **eval_loss(out), "bytes": sizes})
  float_bytes = rows["quantization"][1]["bytes"]["float"]
  rows["quantization"][0]["bytes"] = {"weights": float_bytes, "scales": 0, "float": float_bytes}

  recent = steps[-args.k:]
  singles = {s: eval_loss(args.workdir, s)["eval/loss"] for s in recent}
  best = min(singles, key=singles.get)
  rows["fusion"].append({"model": f"best single (step {best})", "eval/loss": singles[best]})
  inputs = [f"{args.workdir}@{s}" for s in recent]
  for method in ("uniform", "greedy"):
    out = os.path.join(args.out, f"soup-{method}")
    record = merge.merge(method, inputs, out, log=print, force=True)
    rows["fusion"].append({"model": f"{method} soup of steps {recent}", **eval_loss(out),
                           **({"kept": [i["input"] for i in record["ingredients"] if i["kept"]]}
                              if method == "greedy" else {})})
  rows["ema"] = [{"model": f"raw params, step {last}", "eval/loss": fp["eval/loss"]},
                 {"model": f"EMA, step {last}", **eval_loss(args.workdir, last, ema=True)}]

  base = fp["eval/loss"]
  print(f"\nrun {args.workdir}, step {last}; eval on its config.data validation split")
  print("| model | eval loss | perplexity | perplexity vs float32 | weight bytes | + scales |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows["quantization"]:
    ppl = r["eval/perplexity"]
    print(f"| {r['model']} | {r['eval/loss']:.4f} | {ppl:.3f} | "
          f"{(ppl / rows['quantization'][0]['eval/perplexity'] - 1) * 100:+.2f}% | "
          f"{r['bytes']['weights']:,} | {r['bytes']['scales']:,} |")
  print("\n| model | eval loss |\n| --- | --- |")
  for r in rows["fusion"] + rows["ema"]:
    print(f"| {r['model']} | {r['eval/loss']:.4f} |")
  print(f"(float32 eval loss {base:.4f})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
