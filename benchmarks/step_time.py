"""Step time of the spjax train step vs a minimal hand-written `jax.jit` step ("no framework").

Both steps train the same `spjax.model.model.Transformer` with the same optimizer (`program.tx`), the same
in/out shardings and donation, on the same batch (random tokens, one segment per row) and devices.
The minimal step is what a user would write by hand: `nnx.merge`, mean cross entropy
(`optax.softmax_cross_entropy_with_integer_labels`), `jax.value_and_grad`, `tx.update`. Like the
spjax step it is traced under the layout's rules, so the model's own activation constraints apply to
both and the ratio isolates the step function; `--baseline_no_rules` drops them from the baseline
(XLA then propagates shardings from the inputs alone).

Both are compiled ahead of time, then timed alternately (`--steps` steps each, `--rounds` rounds,
the order flipped every round) so that the noise of a shared machine hits both alike; the table
gives medians and the ratio spjax / minimal (target <= 1.05). Compute is float32 by default:
bfloat16 matmuls are emulated on CPU and would swamp everything else.

  python benchmarks/step_time.py [--layout fsdp] [--d_model 128 --layers 4 --seq_len 128] \
      [--json step_time.json]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

# Simulated devices: XLA reads the flag once, when jax is first imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from spjax.train import program  # noqa: E402


def make_config(args):
  c = default.get_config("tiny")
  c.layout = args.layout
  c.seq_len = args.seq_len
  c.per_device_batch_size = args.per_device_batch_size
  m = c.model
  m.d_model, m.num_layers, m.mlp_dim = args.d_model, args.layers, 4 * args.d_model
  m.head_dim = args.d_model // m.num_heads  # keep tiny's 8 heads / 4 kv heads, full width
  m.scan_layers = not args.unrolled
  m.dtype = args.dtype
  return c


def minimal_train_step(prog):
  """The hand-written step: no masking, no token counting, no metrics beyond the loss."""
  graphdef, tx = prog.graphdef, prog.tx

  def step(state, batch):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      # The same inputs as spjax's step, so the model builds the same attention mask (left to
      # itself it would make constant all-ones segments, which XLA may fold away).
      logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, {"loss": loss}

  return jax.jit(step, in_shardings=(prog.state_shardings, prog.batch_sharding),
                 out_shardings=(prog.state_shardings, None), donate_argnums=0)


def make_batch(prog, seed=0):
  b, t = prog.global_batch, prog.config.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, prog.model_cfg.vocab_size, (b, t + 1), dtype=np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, t), np.int32),  # one document per row: nothing masked
          "loss_mask": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}
  return {k: jax.device_put(v, prog.batch_sharding) for k, v in host.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layout", default="fsdp")
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--per_device_batch_size", type=int, default=1)
  p.add_argument("--unrolled", action="store_true", help="scan_layers=False")
  p.add_argument("--dtype", default="float32",
                 help="compute dtype (bfloat16 matmuls are emulated, hence slow, on CPU)")
  p.add_argument("--baseline_no_rules", action="store_true",
                 help="trace the minimal step without the layout's rules (constraints no-ops)")
  p.add_argument("--steps", type=int, default=2, help="steps per timing")
  p.add_argument("--rounds", type=int, default=21, help="timings per candidate")
  p.add_argument("--json", help="write the results here")
  args = p.parse_args()

  config = make_config(args)
  prog = program.build(config)
  m = prog.model_cfg
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}, mesh "
        f"{ {k: v for k, v in prog.mesh.shape.items() if v > 1} }, layout {config.layout}")
  print(f"model: d_model={m.d_model} layers={m.num_layers} heads={m.num_heads}/{m.num_kv_heads} "
        f"head_dim={m.head_dim} mlp={m.mlp_dim} vocab={m.vocab_size} scan={m.scan_layers} "
        f"dtype={m.dtype} params={m.num_params() / 1e6:.2f}M; batch {prog.global_batch} x "
        f"{config.seq_len}; optimizer {config.optimizer.name}")

  batch = make_batch(prog)
  with prog.activate():
    init = prog.jit_init()
    # Two identical states: each candidate donates (consumes) its own.
    states = {"spjax": init(), "minimal": init()}
  # Compiled ahead of time, so that neither retraces under another context while timed (a jitted
  # function traced outside the rules would silently drop the model's activation constraints).
  t0 = time.perf_counter()
  with prog.activate():
    steps = {"spjax": prog.jit_train_step().lower(states["spjax"], batch).compile()}
  compile_s = {"spjax": time.perf_counter() - t0}
  t0 = time.perf_counter()
  with contextlib.nullcontext() if args.baseline_no_rules else prog.activate():
    steps["minimal"] = minimal_train_step(prog).lower(states["minimal"], batch).compile()
  compile_s["minimal"] = time.perf_counter() - t0

  # Warm-up, and a check that both compute the same loss from the same state.
  first_loss = {}
  for name in steps:
    for i in range(2):  # a second untimed step: allocations settle
      states[name], metrics = steps[name](states[name], batch)
      if i == 0:
        first_loss[name] = float(metrics["loss"])
    jax.block_until_ready(states[name])
    print(f"{name:>8}: compiled in {compile_s[name]:.1f}s, first loss {first_loss[name]:.5f}")

  times = {name: [] for name in steps}
  order = list(steps)
  for r in range(args.rounds):
    for name in order if r % 2 == 0 else order[::-1]:
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, _ = steps[name](state, batch)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t0) / args.steps)
      states[name] = state

  med = {name: statistics.median(t) for name, t in times.items()}
  ratio = med["spjax"] / med["minimal"]
  # Adjacent timings share the machine's load, so their ratio is the steadier estimate.
  round_ratio = statistics.median(s / b for s, b in zip(times["spjax"], times["minimal"]))
  print(f"\n{'candidate':<10} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
  for name in steps:
    print(f"{name:<10} {1e3 * med[name]:>10.1f} {1e3 * min(times[name]):>8.1f} "
          f"{1e3 * max(times[name]):>8.1f}")
  print(f"ratio spjax/minimal: {ratio:.3f} of medians, {round_ratio:.3f} median of per-round "
        f"ratios, {min(times['spjax']) / min(times['minimal']):.3f} of minima "
        f"(target <= 1.05: {'met' if round_ratio <= 1.05 else 'NOT met'})")

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": {"layout": config.layout, "d_model": m.d_model,
                            "layers": m.num_layers, "seq_len": config.seq_len,
                            "global_batch": prog.global_batch, "scan_layers": m.scan_layers,
                            "baseline_rules": not args.baseline_no_rules},
                 "seconds_per_step": times, "median": med, "ratio": ratio,
                 "round_ratio": round_ratio, "first_loss": first_loss}, f, indent=1)


if __name__ == "__main__":
  main()
