"""LoRA vs full fine-tuning: train-step tokens/s and checkpoint bytes, in one run.

Both candidates are `spjax.train.program` Programs of the same config (`configs/default.py:<size>`,
float32 compute, the same layout, batch and seed) that differ only in `config.lora.rank` (0 = full
fine-tuning). The LoRA step differentiates only the adapters: no weight gradients for the base
kernels, no optimizer update or moments for them; it adds the adapters' small matmuls.

Each step is compiled ahead of time, then both are timed alternately (`--steps` steps each,
`--rounds` rounds, the order flipped every round) on the same random batch; the ratio reported is
the median of the per-round ratios of tokens/s (LoRA / full), which a shared machine's load hits
alike. Then each writes one checkpoint (what `spjax-train` would save, via `Program.save`) to a
temporary directory: array bytes from the shapes, and bytes on disk.

  python benchmarks/lora_speed.py [--size tiny] [--rank 8] [--layout fsdp] [--seq_len 128] \
      [--per_device_batch_size 1] [--rounds 11] [--devices 8] [--json OUT]

`--devices 1` runs on the one real CPU device: no simulated devices, hence no collectives and no
XLA:CPU rendezvous, whose 40 s timeout aborts 8 simulated devices of a big model on a loaded
machine.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# Simulated devices (--devices): XLA reads the flag once, when jax is first imported, so the
# command line is read for it here, before that.
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--devices", type=int, default=8)
_DEVICES = _pre.parse_known_args()[0].devices
if _DEVICES > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_DEVICES}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default  # noqa: E402
from spjax.train import checkpoint as checkpoint_lib  # noqa: E402
from spjax.train import program  # noqa: E402


def make_config(args, rank: int):
  c = default.get_config(args.size)
  c.layout, c.seq_len = args.layout, args.seq_len
  c.per_device_batch_size = args.per_device_batch_size
  c.model.dtype = "float32"  # bfloat16 matmuls are emulated, hence slow, on CPU
  c.lora.rank = rank
  return c


def make_batch(prog):
  b, t = prog.global_batch, prog.config.seq_len
  tokens = np.random.default_rng(0).integers(0, prog.model_cfg.vocab_size, (b, t + 1),
                                             dtype=np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))}
  return {k: jax.device_put(v, prog.batch_sharding) for k, v in host.items()}


def dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="tiny", help="a row of configs/default.py (tiny, 125m, ...)")
  p.add_argument("--rank", type=int, default=8, help="config.lora.rank of the LoRA candidate")
  p.add_argument("--layout", default="fsdp")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--per_device_batch_size", type=int, default=1)
  p.add_argument("--steps", type=int, default=2, help="steps per timing")
  p.add_argument("--rounds", type=int, default=11, help="timings per candidate")
  p.add_argument("--devices", type=int, default=8,
                 help="CPU devices: >1 simulates that many (unless XLA_FLAGS already sets a count)")
  p.add_argument("--json", help="write the results here")
  args = p.parse_args()
  if args.devices < 1:
    p.error(f"--devices must be >= 1, got {args.devices}")
  if len(jax.devices()) != args.devices:
    p.error(f"--devices={args.devices} but jax sees {len(jax.devices())} (XLA_FLAGS="
            f"{os.environ.get('XLA_FLAGS', '')!r} sets the count)")

  progs = {"full": program.build(make_config(args, 0)),
           "lora": program.build(make_config(args, args.rank))}
  m, prog = progs["full"].model_cfg, progs["full"]
  tokens_per_step = prog.global_batch * args.seq_len
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].platform}, layout {args.layout}; "
        f"model {args.size} ({m.num_params() / 1e6:.1f}M params), batch {prog.global_batch} x "
        f"{args.seq_len}; LoRA rank {args.rank} on {', '.join(progs['lora'].config.lora.targets)}")

  batch = make_batch(prog)
  states, steps = {}, {}
  for name, prog in progs.items():
    with prog.activate():
      states[name] = prog.jit_init()()
      steps[name] = prog.jit_train_step().lower(states[name], batch).compile()
    for _ in range(2):  # warm-up: allocations settle
      states[name], metrics = steps[name](states[name], batch)
    jax.block_until_ready(states[name])
    trainable = sum(x.size for x in jax.tree.leaves(
        nnx.filter_state(states[name]["params"], prog.trainable)))
    print(f"{name:>5}: {trainable / 1e6:.3f}M trainable params, loss {float(metrics['loss']):.4f}")

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

  ckpt_bytes = {}
  for name, prog in progs.items():
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint_lib.Checkpointer(tmp, max_to_keep=1, save_every_steps=1)
      with prog.activate():
        prog.save(ckpt, 1, states[name], force=True)
      ckpt.wait()
      arrays = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(ckpt.metadata(1)))
      ckpt_bytes[name] = {"arrays": arrays, "disk": dir_bytes(os.path.join(tmp, "checkpoints"))}
      ckpt.close()

  tps = {name: [tokens_per_step / t for t in ts] for name, ts in times.items()}
  med = {name: statistics.median(v) for name, v in tps.items()}
  round_ratio = statistics.median(a / b for a, b in zip(tps["lora"], tps["full"]))
  print(f"\n{'candidate':<10} {'tokens/s':>10} {'ms/step':>8} {'ckpt arrays':>12} "
        f"{'ckpt disk':>12}")
  for name in steps:
    print(f"{name:<10} {med[name]:>10.0f} {1e3 * statistics.median(times[name]):>8.1f} "
          f"{ckpt_bytes[name]['arrays']:>12,} {ckpt_bytes[name]['disk']:>12,}")
  print(f"ratio lora/full: tokens/s {round_ratio:.3f} (median of per-round ratios), "
        f"checkpoint arrays {ckpt_bytes['lora']['arrays'] / ckpt_bytes['full']['arrays']:.4f}, "
        f"on disk {ckpt_bytes['lora']['disk'] / ckpt_bytes['full']['disk']:.4f}")

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "seconds_per_step": times, "tokens_per_sec": med,
                 "round_ratio": round_ratio, "checkpoint_bytes": ckpt_bytes}, f, indent=1)


if __name__ == "__main__":
  main()
