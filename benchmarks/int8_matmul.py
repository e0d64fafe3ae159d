"""Micro-benchmark: formulations of an int8-weight matmul on XLA:CPU, against float32 weights.

The matrices of 12 layers of the `125m` shape (q, k, v, o [768, 768]; gate, up [768, 2048];
down [2048, 768]), chained as a decode step chains them (x [B, 768] through every layer, each
product feeding the next), one jitted call per formulation. Weights int8 per output channel
(symmetric absmax, as spjax.compress.quantize), scales [1, N] float32. Formulations:

  fp32        x @ w                                        (float32 weights: the baseline)
  a_deq       x @ (q.astype(f32) * s)                      (dequantize the weight, then the dot)
  b_out       (x @ q.astype(f32)) * s                      (convert only; scale the output)
  c_w8a8      per-row absmax int8 x, dot_general int8 x int8 -> int32, * sx * s
  c_w8a8_pad  c_w8a8 with a batch of 1 padded to 2 rows (XLA does a 1-row int8 dot in int32):
              spjax.compress.quantize.int8_matmul(..., "int8")
  g_limbs     x split in two int8 limbs, x ~ sx * (x1 + x2 / 254) (about 15 bits), both rows of
              one int8 x int8 dot: weight-only accuracy from an int8 kernel (int8_matmul "int8x2")
  d_mixed     dot_general(x f32, q int8, preferred f32) * s  (mixed operand types)
  e_bf16      (x.astype(bf16) @ q.astype(bf16)) f32-accumulated * s  (int8 is exact in bf16)
  f_tiled     b_out over column blocks of 256 in a loop (each block's f32 copy stays in cache)

Each XLA flag set runs in its own process (XLA reads its flags once); within one process every
formulation and the float32 baseline alternate over `--rounds` rounds; the table gives the fastest
time per chain and the median over rounds of fp32 time / formulation time in that round (> 1 =
faster than float32), plus the largest
error relative to the dequantized-weights result (`a_deq`) of one product and of the whole chain
(fp32's is the int8 rounding of the weights; the others' the formulation's own).

  python benchmarks/int8_matmul.py [--batch 1,8] [--rounds 9] [--flags default,ynn,...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

FLAG_SETS = {
    "default": "",
    "ynn": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise",
    "xnn": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot,eltwise",
    "xnn_graph": "--xla_cpu_use_xnnpack=true "
                 "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
}
SHAPES = [("q", 768, 768), ("k", 768, 768), ("v", 768, 768), ("o", 768, 768),
          ("gate", 768, 2048), ("up", 768, 2048), ("down", 2048, 768)]
LAYERS = 12
BLOCK = 256


def measure(batches, rounds):
  """In this process (its XLA_FLAGS): {batch: {formulation: (seconds, fp32 / it, max rel err)}}."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from spjax.compress import quantize
  f32 = jnp.float32

  rng = np.random.RandomState(0)
  floats, quants = [], []
  for _ in range(LAYERS):
    layer_f, layer_q = {}, {}
    for name, k, n in SHAPES:
      w = (rng.randn(k, n) / np.sqrt(k)).astype(np.float32)
      s = np.abs(w).max(axis=0, keepdims=True) / 127  # [1, N]
      layer_f[name] = jnp.asarray(w)
      layer_q[name] = (jnp.asarray(np.round(w / s).astype(np.int8)), jnp.asarray(s))
    floats.append(layer_f)
    quants.append(layer_q)

  def chain(x, layers, mm):  # one decode step's matrices; each product feeds the next
    for p in layers:
      t = mm(x, p["q"]) + mm(x, p["k"]) + mm(x, p["v"])
      x = x + mm(jnp.tanh(t), p["o"])
      x = x + mm(jax.nn.silu(mm(x, p["gate"])) * mm(x, p["up"]), p["down"])
      x = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
    return x

  def fp32(x, w):
    return x @ w

  def a_deq(x, qs):
    q, s = qs
    return x @ (q.astype(f32) * s)

  def b_out(x, qs):
    q, s = qs
    return (x @ q.astype(f32)) * s

  def int8_dot(xq, q):  # [M, K] int8 x [K, N] int8 -> [M, N] int32
    return jax.lax.dot_general(xq, q, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)

  def c_w8a8(x, qs):
    q, s = qs
    sx = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30) / 127  # [B, 1]
    xq = jnp.clip(jnp.round(x / sx), -127, 127).astype(jnp.int8)
    return int8_dot(xq, q).astype(f32) * sx * s

  def c_w8a8_pad(x, qs):  # spjax's "int8": one row padded to two (XLA does one in int32)
    return quantize.int8_matmul(x, *qs, "int8")

  def g_limbs(x, qs):  # spjax's "int8x2": x ~ sx * (x1 + x2 / 254), both limbs rows of one dot
    return quantize.int8_matmul(x, *qs, "int8x2")

  def d_mixed(x, qs):
    q, s = qs
    return jax.lax.dot_general(x, q, (((1,), (0,)), ((), ())), preferred_element_type=f32) * s

  def e_bf16(x, qs):
    q, s = qs
    y = jax.lax.dot_general(x.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                            (((1,), (0,)), ((), ())), preferred_element_type=f32)
    return y * s

  def f_tiled(x, qs):
    q, s = qs
    k, n = q.shape
    if n % BLOCK:
      return b_out(x, qs)
    blocks = q.reshape(k, n // BLOCK, BLOCK).transpose(1, 0, 2)  # [N/b, K, b]; hoisted by XLA?
    ys = jax.lax.map(lambda qb: x @ qb.astype(f32), blocks)  # [N/b, B, b]
    return ys.transpose(1, 0, 2).reshape(x.shape[0], n) * s

  forms = {"fp32": (fp32, floats), "a_deq": (a_deq, quants), "b_out": (b_out, quants),
           "c_w8a8": (c_w8a8, quants),
           "c_w8a8_pad": (c_w8a8_pad, quants), "g_limbs": (g_limbs, quants),
           "d_mixed": (d_mixed, quants),
           "e_bf16": (e_bf16, quants), "f_tiled": (f_tiled, quants)}
  out = {}
  for batch in batches:
    x = jnp.asarray(rng.randn(batch, 768).astype(np.float32))
    fns, results, products = {}, {}, {}
    for name, (mm, params) in forms.items():
      fn = jax.jit(lambda x, p, mm=mm: chain(x, p, mm))
      try:
        results[name] = np.asarray(fn(x, params))  # compiles
        one = params[0]["up"]  # one product, x [B, 768] x up [768, 2048]: its own error
        products[name] = np.asarray(jax.jit(mm)(x, one))
        fns[name] = (fn, params)
      except Exception as e:  # a formulation this XLA rejects: reported, not timed
        print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
    times = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        fn, params = fns[name]
        start = time.perf_counter()
        fn(x, params).block_until_ready()
        times[name].append(time.perf_counter() - start)
    ref, ref1 = results["a_deq"], products["a_deq"]
    # A shared machine's load swings between rounds: the fastest time per formulation, and the
    # median over rounds of fp32's time / its time in the same round.
    ratio = {n: statistics.median(f / t for f, t in zip(times["fp32"], times[n])) for n in fns}
    out[batch] = {n: (min(times[n]), ratio[n],
                      float(np.max(np.abs(results[n] - ref)) / np.max(np.abs(ref))),
                      float(np.max(np.abs(products[n] - ref1)) / np.max(np.abs(ref1))))
                  for n in fns}
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", default="1,8")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--flags", default=",".join(FLAG_SETS))
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  batches = [int(b) for b in args.batch.split(",")]
  if args.child:
    print(json.dumps(measure(batches, args.rounds)))
    return
  rows = {}
  for flag_set in args.flags.split(","):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FLAG_SETS[flag_set])
    done = subprocess.run([sys.executable, __file__, "--child", f"--batch={args.batch}",
                           f"--rounds={args.rounds}"], env=env, capture_output=True, text=True)
    if done.returncode:
      print(f"{flag_set}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
      continue
    for line in done.stderr.splitlines():
      if ": " in line and ": " in line:
        print(f"{flag_set} {line}", file=sys.stderr)
    rows[flag_set] = json.loads(done.stdout.strip().splitlines()[-1])
  print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; chain of {LAYERS} x "
        f"{len(SHAPES)} matrices; fastest ms per chain (median per-round fp32 time / it)")
  forms = sorted({f for r in rows.values() for b in r.values() for f in b},
                 key=lambda f: (f != "fp32", f))
  for batch in batches:
    print(f"\nbatch {batch}\n| flags | " + " | ".join(forms) + " |")
    print("| --- |" + " --- |" * len(forms))
    for flag_set, r in rows.items():
      cells = [f"{r[str(batch)][f][0] * 1e3:.1f} ({r[str(batch)][f][1]:.2f}x)"
               if f in r[str(batch)] else "-" for f in forms]
      print(f"| {flag_set} | " + " | ".join(cells) + " |")
  if "default" in rows:
    r = rows["default"][str(batches[-1])]
    print(f"\nlargest |y - y of a_deq| / max |y of a_deq|, flags default, batch {batches[-1]}: "
          "one product (x @ up) / the whole chain (12 layers amplify every difference)")
    print(", ".join(f"{f} {e[3]:.1e} / {e[2]:.1e}" for f, e in r.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
