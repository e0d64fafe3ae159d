"""Decode speed of int8 weights: spjax int8 (per channel) vs spjax float32 vs transformers float32.

The same random `LlamaForCausalLM` of the 125m shape as benchmarks/decode_speed.py (its
`make_models`, float32 compute); the int8 model is the spjax one with its matrices quantized by
`spjax.compress.quantize` (embeddings stay float32), decoded by the same `decode.generate`. Rounds
alternate the three, order rotated every round; the table gives median tokens/s, the ratios, and
how many greedy tokens int8 shares with float32.

  python benchmarks/decode_quantized.py [--batch 1,8] [--prompt_len 32] [--new_tokens 128]
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
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))

  with tempfile.TemporaryDirectory() as directory:
    reference, ours = decode_speed.make_models(args.size, directory)
  graphdef, state = nnx.split(ours)
  int8 = nnx.merge(graphdef, quantize.quantize_params(state, quantize.Spec(8, 0, False)))
  sizes = quantize.weight_bytes(nnx.state(int8))
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
    runs = {"spjax int8": spjax_run(int8), "spjax float32": spjax_run(ours),
            "transformers float32": run_hf}
    same = np.mean(np.array(runs["spjax int8"]()) == np.array(runs["spjax float32"]()))  # compiles
    times = {n: [] for n in runs}
    names = list(runs)
    for r in range(args.rounds):
      for name in names[r % 3:] + names[:r % 3]:
        times[name].append(decode_speed.timed(runs[name]))
    rate = {n: batch * args.new_tokens / statistics.median(t) for n, t in times.items()}
    rows.append({"batch": batch, **{f"{n} tokens/s": v for n, v in rate.items()},
                 "int8 / float32": rate["spjax int8"] / rate["spjax float32"],
                 "int8 / transformers": rate["spjax int8"] / rate["transformers float32"],
                 "same greedy tokens int8 vs float32": float(same)})

  print(f"{args.size}, float32 compute, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"greedy; {len(os.sched_getaffinity(0))} CPUs, load {os.getloadavg()[0]:.1f}; weights "
        f"int8 {sizes['weights'] + sizes['scales']:,} bytes vs float32 {sizes['float']:,}")
  print("| batch | spjax int8 tok/s | spjax fp32 tok/s | transformers fp32 tok/s | int8/fp32 | "
        "int8/transformers | same tokens |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['batch']} | {r['spjax int8 tokens/s']:.1f} | {r['spjax float32 tokens/s']:.1f} | "
          f"{r['transformers float32 tokens/s']:.1f} | {r['int8 / float32']:.2f} | "
          f"{r['int8 / transformers']:.2f} | {r['same greedy tokens int8 vs float32']:.0%} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "bytes": sizes, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
