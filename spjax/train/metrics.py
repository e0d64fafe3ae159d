"""Where numbers go: metrics.jsonl, TensorBoard, a progress line; and the FLOPs behind train/mfu."""

import datetime
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import tensorboardX

# Dense bf16 peak FLOP/s per chip, by a lowercase substring of `device.device_kind`. First match
# wins, so "v5 lite" (v5e) must come before "v5" (v5p reports itself as "TPU v5").
_PEAK_FLOPS = (
    ("v4", 275e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("h100", 989e12), ("h200", 989e12),
    ("a100", 312e12),
)


def flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int,
                    lora_params: int = 0) -> float:
  """Training FLOPs (forward + backward) per token: `6 * N + 6 * L * T * H * Dh`.

  N counts the weights of every matmul: per layer q and o (d_model x H*Dh each), k and v
  (d_model x KV*Dh each) and the MLP's three SwiGLU matrices (two without the gate) of d_model x
  mlp_dim, plus the unembedding
  (d_model x vocab, counted even when tied: the matmul still runs). The embedding lookup and norms
  do no matmuls. Each weight costs 2 FLOPs per token forward and 4 backward, hence 6 * N.
  Attention scores and the weighted sum of values cost 2 * 2 * T * H * Dh per token per layer
  forward, so 12 * L * T * H * Dh for training; the causal mask skips half of it (MaxText's
  convention), leaving 6 * L * T * H * Dh. L = num_layers, T = seq_len, H = num_heads,
  Dh = head_dim, KV = num_kv_heads.

  Mixture-of-experts layers count the weights a token is multiplied by: experts_per_token
  experts' MLPs plus the router (d_model x num_experts); dispatch and combine are not counted.

  Under LoRA (`lora_params` = the adapters' parameter count, > 0) the base weights are frozen:
  they get no weight gradients, only the gradients of their inputs, 2 FLOPs forward + 2 backward
  per weight, so `4 * N`; each adapter weight costs the full 6; attention is unchanged (its
  backward still runs for the adapters below it): `4 * N + 6 * lora_params + 6 * L * T * H * Dh`.
  """
  m = model_cfg
  attention = m.d_model * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, o, k, v
  mlp = (3 if m.gated_mlp else 2) * m.d_model * m.mlp_dim  # SwiGLU, or GeLU's up and down
  n = m.num_layers * (attention + mlp) + m.d_model * m.vocab_size
  if getattr(m, "num_experts", 0):  # each MoE layer: k experts' MLPs and the router, not one MLP
    moe_layers = m.num_layers // m.moe_every
    n += moe_layers * ((m.experts_per_token - 1) * mlp + m.d_model * m.num_experts)
  weights = 4 * n + 6 * lora_params if lora_params else 6 * n
  return float(weights + 6 * m.num_layers * seq_len * m.num_heads * m.head_dim)


def peak_flops_per_device(device: jax.Device, override_tflops: float = 0.0) -> float:
  """Peak FLOP/s of `device`, the denominator of MFU.

  `override_tflops` > 0 wins. Known accelerators use their dense bf16 peak. On CPU (and unknown
  kinds) there is no datasheet number, so this measures one: the FLOP/s a jit-compiled fp32
  1024x1024 matmul achieves on that device. MFU on CPU is therefore relative to that matmul rate,
  not to any hardware peak.
  """
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device.device_kind.lower()
  for name, flops in _PEAK_FLOPS:
    if name in kind:
      return flops
  if device.platform != "cpu":
    logging.warning("no peak FLOP/s known for %r; MFU is relative to a measured fp32 matmul "
                    "(set peak_tflops_per_device to fix)", device.device_kind)
  return _measured_matmul_flops(device)


@functools.cache
def _measured_matmul_flops(device: jax.Device) -> float:
  n = 1024
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()  # compile and warm up outside the timing
  best = float("inf")
  for _ in range(5):  # best of a few: the achievable rate, not scheduler noise
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, and prints a progress line.

  Only the primary process writes or prints (`is_primary` defaults to `jax.process_index() == 0`),
  so every process can call it unconditionally.
  """

  def __init__(self, workdir: str, total_steps: int, *, is_primary: bool | None = None):
    self.total_steps = total_steps
    self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
    self._start = None  # (wall time, step) of the first progress() call, for the ETA
    if self.is_primary:
      os.makedirs(workdir, exist_ok=True)
      # Append: a resumed run continues the same file.
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.is_primary:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, int(step))
    self._tb.flush()

  def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
    """Prints e.g. `step 120/200 | loss 4.123 | 12,345 tok/s | ETA 0:00:15`."""
    if not self.is_primary:
      return
    now = time.time()
    if self._start is None:
      self._start = (now, step)
    start_time, start_step = self._start
    if step > start_step:
      seconds = (now - start_time) / (step - start_step) * (self.total_steps - step)
      eta = str(datetime.timedelta(seconds=round(seconds)))
    else:
      eta = "?"  # no rate yet on the first call
    print(f"step {step}/{self.total_steps} | loss {float(loss):.3f} | "
          f"{float(tokens_per_sec):,.0f} tok/s | ETA {eta}", flush=True)

  def close(self) -> None:
    if self.is_primary:
      self._jsonl.close()
      self._tb.close()


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Saves the resolved config to `workdir/config.json` (primary process only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2) + "\n")
