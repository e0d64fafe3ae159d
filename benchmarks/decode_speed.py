"""Decode speed on CPU: spjax KV-cache generation vs Hugging Face transformers, same weights.

One random LlamaForCausalLM of the `configs/default.py:125m` shape (float32) is written to a
temporary directory; spjax imports it with `spjax.convert.hf.from_pretrained`. Both then decode
greedily from the same random prompts, `--new_tokens` tokens each with no stop token, prefill
included: spjax with `spjax.infer.decode.generate` (one compiled while loop, compiled before timing),
transformers with `model.generate` (its KV cache, torch's default attention). The spjax model is
converted to unrolled layers once, before timing, as a caller that generates repeatedly would.
Runs alternate for `--rounds` rounds, order flipped every round, so a shared machine's noise hits
both alike; the table gives median tokens/s (batch x new tokens / seconds) and the ratio
spjax / transformers (target >= 2).

  python benchmarks/decode_speed.py [--batch 1,8] [--prompt_len 32] [--new_tokens 128] [--json f]

Needs the [hf] extra (torch, transformers). One CPU device: jax and torch both use every core
the process may run on (`taskset -c 0,1` to pin).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from spjax.convert import hf  # noqa: E402
from spjax.infer import decode  # noqa: E402
from spjax.model import model as model_lib  # noqa: E402


def make_models(size: str, directory: str):
  """(transformers model, spjax model) holding the same random float32 weights."""
  cfg = dataclasses.replace(model_lib.SIZES[size], dtype="float32")
  torch.manual_seed(0)
  hf_config = transformers.AutoConfig.for_model(**hf.config_to_hf(cfg))
  reference = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
  reference.save_pretrained(directory)
  ours, _ = hf.from_pretrained(directory)
  return reference, model_lib.unrolled(ours)  # what generate decodes with; converted once here


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="125m", choices=list(model_lib.SIZES))
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--prompt_len", type=int, default=32)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  torch.set_num_threads(len(os.sched_getaffinity(0)))

  with tempfile.TemporaryDirectory() as directory:
    reference, ours = make_models(args.size, directory)
  rows = []
  for batch in [int(b) for b in args.batch.split(",")]:
    prompts = np.random.RandomState(batch).randint(0, ours.cfg.vocab_size,
                                                   (batch, args.prompt_len))

    def run_spjax():
      return decode.generate(ours, prompts.tolist(), max_new_tokens=args.new_tokens)

    def run_hf():
      with torch.no_grad():
        out = reference.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape),
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
      return out[:, args.prompt_len:].tolist()

    compile_s = timed(run_spjax)  # the first call traces and compiles
    same = np.mean(np.array(run_spjax()) == np.array(run_hf()))
    times = {"spjax": [], "transformers": []}
    for r in range(args.rounds):
      for name in (["spjax", "transformers"] if r % 2 == 0 else ["transformers", "spjax"]):
        times[name].append(timed(run_spjax if name == "spjax" else run_hf))
    rate = {n: batch * args.new_tokens / statistics.median(t) for n, t in times.items()}
    rows.append({"batch": batch, "spjax_tokens_per_s": rate["spjax"],
                 "transformers_tokens_per_s": rate["transformers"],
                 "ratio": rate["spjax"] / rate["transformers"], "spjax_compile_s": compile_s,
                 "same_greedy_tokens": float(same)})

  cpus = len(os.sched_getaffinity(0))
  print(f"{args.size} model, float32, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"greedy; {cpus} CPUs, load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
  print("| batch | spjax tokens/s | transformers tokens/s | ratio | spjax compile s | same tokens |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['batch']} | {r['spjax_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} "
          f"| {r['ratio']:.2f} | {r['spjax_compile_s']:.1f} | {r['same_greedy_tokens']:.0%} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
