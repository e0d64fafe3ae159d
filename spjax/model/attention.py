"""Fused causal attention for training: Pallas splash attention.

`model.attention = "splash"` replaces the einsum attention of spjax/model/layers.py (which materialises
[B, K, G, T, S] float32 scores in HBM: on TPU most of the 1B's step, BENCHMARKS.md) with the
splash kernel from jax.experimental.pallas: blockwise online softmax, scores kept on chip, blocks
above the diagonal skipped, packed documents kept apart by segment ids inside each block. On TPU
it is the Mosaic kernel; on other backends the same kernel runs in Pallas' interpreter (exact,
slow: for tests on CPU).

A Pallas kernel cannot be partitioned by XLA, so it runs under `shard_map` with the specs the
active layout gives q, k and v: each device attends its own batch rows and heads. A layout that
shards `length` (sequence parallelism) or splits kv heads differently from query heads cannot use
it, and says so before tracing (`check_layout`).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from spjax.parallel import sharding

IMPLS = ("auto", "xla", "splash")  # auto: splash on TPU where the run allows it, else xla
BLOCK = 512  # q and kv block length: MaxText's default for TPU v4/v5; shorter sequences use T
LANES = 128  # splash blocks must be multiples of the TPU lane width
RESIDUALS = "attention"  # checkpoint name of the kernel's residuals, for remat policies to keep
Q_AXES = ("batch", "length", "act_heads", "head_dim")
KV_AXES = ("batch", "length", "act_kv_heads", "head_dim")


def check_seq_len(seq_len: int):
  if seq_len % LANES:
    raise ValueError(f"model.attention='splash' needs seq_len to be a multiple of {LANES} (the "
                     f"kernel's block granularity), got seq_len={seq_len}; pad the sequence length "
                     f"or use model.attention='xla'")


def check_layout(layout, mesh):
  """Raises ValueError if `layout` places q, k, v in a way a per-device kernel cannot serve."""
  if any(mesh.shape[a] > 1 for a in layout.axes_for("length")):
    raise ValueError(f"model.attention='splash' needs every device to hold whole sequences, but "
                     f"layout {layout.source!r} shards 'length' over {layout.axes_for('length')}; "
                     f"use model.attention='xla' with sequence parallelism")
  if layout.axes_for("act_heads") != layout.axes_for("act_kv_heads"):
    raise ValueError(f"model.attention='splash' needs query and kv heads split the same way (each "
                     f"device's query heads must find their kv heads locally), but layout "
                     f"{layout.source!r} maps act_heads to {layout.axes_for('act_heads')} and "
                     f"act_kv_heads to {layout.axes_for('act_kv_heads')}")


def choose(model_cfg, seq_len: int, layout, mesh) -> str:
  """The attention a run uses: "xla" or "splash". An explicit "splash" the run cannot use is a
  ValueError saying why; "auto" takes splash only on TPU and only where nothing stands in its way."""
  def check():
    check_seq_len(seq_len)
    check_layout(layout, mesh)
    if model_cfg.dropout_rate:
      raise ValueError(f"model.attention='splash' has no attention dropout; set model.dropout_rate "
                       f"to 0 (got {model_cfg.dropout_rate}) or use model.attention='xla'")
    if mesh.devices.flat[0].platform == "gpu":
      raise ValueError("model.attention='splash' is a TPU kernel (elsewhere it runs in Pallas' "
                       "interpreter, for tests); use model.attention='xla' on GPU")
  if model_cfg.attention == "splash":
    check()
    return "splash"
  if model_cfg.attention == "auto" and mesh.devices.flat[0].platform == "tpu":
    try:
      check()
      return "splash"
    except ValueError:
      return "xla"
  return "xla"


@functools.cache
def _kernel(heads: int, seq_len: int, interpret: bool):
  block = min(BLOCK, seq_len)
  mask = splash_lib.MultiHeadMask([splash_lib.CausalMask((seq_len, seq_len))] * heads)
  sizes = splash_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                block_q_dq=block, block_kv_dq=block)
  return splash_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                    residual_checkpoint_name=RESIDUALS, interpret=interpret)


def _local(q, k, v, segment_ids, *, interpret: bool):
  """One device's rows: q [b, T, h, Dh], k/v [b, T, k, Dh], segment_ids [b, T] -> [b, T, h, Dh]."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # splash does not scale the scores
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # heads before length, as splash reads
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  segments = splash_lib.SegmentIds(q=segment_ids, kv=segment_ids)
  out = jax.vmap(kernel)(q, k, v, segment_ids=segments)  # [b, h, T, Dh]
  return out.transpose(0, 2, 1, 3)


def _per_platform(q, k, v, segment_ids):
  # The Mosaic kernel where the program is lowered for TPU, the interpreter anywhere else.
  return jax.lax.platform_dependent(
      q, k, v, segment_ids,
      tpu=functools.partial(_local, interpret=False),
      default=functools.partial(_local, interpret=True))


def splash(q, k, v, segment_ids):
  """Causal attention within packed documents (segment ids equal), GQA by head groups.

  q [B, T, H, Dh], k/v [B, T, K, Dh], segment_ids [B, T] -> [B, T, H, Dh] in q's dtype.
  """
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = sharding.logical_spec(Q_AXES)
  if q_spec is None:  # no layout active: one device
    return _per_platform(q, k, v, segment_ids)
  kv_spec = sharding.logical_spec(KV_AXES)
  seg_spec = jax.sharding.PartitionSpec(*q_spec[:2])
  return jax.shard_map(_per_platform, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


# Matmuls of size [T, S] x Dh that each splash kernel runs per row and head: forward QK^T and PV;
# the dq kernel recomputes QK^T, then dO V^T and dS K; the dkv kernel recomputes QK^T, then
# dO V^T, P^T dO and dS^T Q.
KERNEL_MATMULS = {"splash_mha_fwd": 2, "splash_mha_dq": 3, "splash_mha_dkv": 4}


def kernel_flops(name: str, rows: int, heads: int, seq_len: int, head_dim: int) -> float:
  """FLOPs of one call of splash kernel `name` on one device holding `rows` sequences and `heads`
  query heads: only the blocks on or below the diagonal run (causal block skipping)."""
  blocks = seq_len // min(BLOCK, seq_len)
  visited = (blocks + 1) / (2 * blocks)
  for prefix, matmuls in KERNEL_MATMULS.items():
    if name.startswith(prefix):
      return matmuls * 2 * rows * heads * seq_len**2 * head_dim * visited
  raise ValueError(f"no FLOP count for Pallas kernel {name!r}; known: {', '.join(KERNEL_MATMULS)}")
