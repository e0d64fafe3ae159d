"""Decode speed of int8 weights: spjax int8 (per channel) vs spjax float32 vs transformers float32.

The same random `LlamaForCausalLM` of the 125m shape as benchmarks/decode_speed.py (its
`make_models`, float32 compute); the int8 models are the spjax one with its matrices quantized by
`spjax.compress.quantize` per output channel, one per way of multiplying by them
(`--activations`, spjax/compress/quantize.py: float = dequantize then the float dot; int8x2 = two
int8 limbs of x in one int8 dot; int8 = w8a8), plus, with `--embeddings`, int8x2 with the
embedding and unembedding tables quantized too. All decoded by the same `decode.generate`. Rounds
alternate every model, order rotated every round; the table gives median tokens/s, the ratios to
spjax float32 and to transformers, and how many greedy tokens each int8 model shares with float32
and with int8 "float" (the dequantized weights: what int8x2 must reproduce).

  python benchmarks/decode_quantized.py [--batch 1,8] [--prompt_len 32] [--new_tokens 128]
      [--activations float,int8x2,int8] [--embeddings] [--torch_threads N] [--skip_transformers]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import decode_speed  # noqa: E402
from spjax.compress import quantize  # noqa: E402
from spjax.infer import decode  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="125m")
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--activations", default=",".join(quantize.ACTIVATIONS))
  parser.add_argument("--embeddings", action="store_true",
                      help="also int8x2 with the embedding and unembedding quantized")
  parser.add_argument("--torch_threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--skip_transformers", action="store_true")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)

  with tempfile.TemporaryDirectory() as directory:
    reference, ours = decode_speed.make_models(args.size, directory)
  graphdef, state = nnx.split(ours)
  specs = {f"int8 {a}": quantize.Spec(8, 0, False, a) for a in args.activations.split(",")}
  if args.embeddings:
    specs["int8 int8x2 +emb"] = quantize.Spec(8, 0, True, "int8x2")
  models = {"float32": ours}
  sizes = {}
  for name, spec in specs.items():
    models[name] = nnx.merge(graphdef, quantize.quantize_params(state, spec))
    b = quantize.weight_bytes(nnx.state(models[name]))
    sizes[name] = b["weights"] + b["scales"]
  sizes["float32"] = b["float"]
  rows = []
  for batch in [int(b) for b in args.batch.split(",")]:
    prompts = np.random.RandomState(batch).randint(0, ours.cfg.vocab_size,
                                                   (batch, args.prompt_len))

    def spjax_run(model):
      return lambda: decode.generate(model, prompts.tolist(), max_new_tokens=args.new_tokens)

    def run_hf():
      with torch.no_grad():
        reference.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape),
                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0)
    runs = {n: spjax_run(m) for n, m in models.items()}
    if not args.skip_transformers:
      runs["transformers float32"] = run_hf
    tokens = {n: np.array(runs[n]()) for n in models}  # compiles every spjax model
    times = {n: [] for n in runs}
    names = list(runs)
    for r in range(args.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        times[name].append(decode_speed.timed(runs[name]))
    rate = {n: batch * args.new_tokens / statistics.median(t) for n, t in times.items()}
    for name in runs:
      row = {"batch": batch, "model": name, "tokens/s": rate[name],
             "/ float32": rate[name] / rate["float32"],
             "/ transformers": rate[name] / rate.get("transformers float32", float("nan"))}
      if name in tokens:
        row["same tokens as float32"] = float(np.mean(tokens[name] == tokens["float32"]))
        if "int8 float" in tokens:
          row["same tokens as int8 float"] = float(np.mean(tokens[name] == tokens["int8 float"]))
      rows.append(row)

  print(f"{args.size}, float32 compute, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"greedy, {args.rounds} rounds; {len(os.sched_getaffinity(0))} CPUs, torch threads "
        f"{args.torch_threads}, load {os.getloadavg()[0]:.1f}")
  print("bytes of weights (+ scales): " + ", ".join(f"{n} {v:,}" for n, v in sizes.items()))
  print("| batch | model | tokens/s | / spjax float32 | / transformers | same tokens as float32 | "
        "same tokens as int8 float |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    same = [f"{r[k]:.0%}" if k in r else "-"
            for k in ("same tokens as float32", "same tokens as int8 float")]
    print(f"| {r['batch']} | {r['model']} | {r['tokens/s']:.1f} | {r['/ float32']:.2f} | "
          f"{r['/ transformers']:.2f} | {same[0]} | {same[1]} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "bytes": sizes, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
