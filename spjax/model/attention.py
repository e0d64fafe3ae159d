"""Fused causal attention for training: Pallas splash attention.

`model.attention = "splash"` replaces the einsum attention of spjax/model/layers.py (which materialises
[B, K, G, T, S] float32 scores in HBM: on TPU most of the 1B's step, BENCHMARKS.md) with the
splash kernel from jax.experimental.pallas: blockwise online softmax, scores kept on chip, blocks
above the diagonal skipped, packed documents kept apart by segment ids inside each block. On TPU
it is the Mosaic kernel; on other backends the same kernel runs in Pallas' interpreter (exact,
slow: for tests on CPU).

A Pallas kernel cannot be partitioned by XLA, so it runs under `shard_map` with the specs the
active layout gives q, k and v: each device attends its own batch rows and heads. A layout that
splits kv heads differently from query heads cannot use it, and says so before tracing
(`check_layout`).

Context parallelism (a layout that shards `length`, e.g. fsdp_sp): each device keeps its queries
and all-gathers the keys and values of the whole row inside `shard_map` (MaxText's default; it beat
ring attention at 32K on v5p). With plain contiguous shards the last shard would do most of the
causal work, so the model reorders each row once at its input (`balance`): cut into 2 x cp chunks,
shard i holds chunks i and 2 x cp - 1 - i, and every shard visits the same number of blocks. The
kernel's mask is told the natural position of every reordered query; the gathered keys are put back
in natural order; the final hidden states are put back too (`unbalance`), so targets and metrics
never see the reordering.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from spjax.parallel import sharding

IMPLS = ("auto", "xla", "splash")  # auto: splash on TPU where the run allows it, else xla
BLOCK = 512  # q and kv block length: MaxText's default for TPU v4/v5; shorter sequences use T
LANES = 128  # splash blocks must be multiples of the TPU lane width
RESIDUALS = "attention"  # checkpoint name of the kernel's residuals, for remat policies to keep
# Heads before length, the layout the kernel reads: the model makes q, k, v in it (layers.py).
Q_AXES = ("batch", "act_heads", "length", "head_dim")
KV_AXES = ("batch", "act_kv_heads", "length", "head_dim")


def check_seq_len(seq_len: int, context_shards: int = 1):
  """Each device's queries (seq_len / context shards) must fill whole kernel blocks."""
  if seq_len % (LANES * context_shards):
    per = f" x {context_shards} context shards" if context_shards > 1 else ""
    raise ValueError(f"model.attention='splash' needs seq_len to be a multiple of {LANES}{per} "
                     f"(the kernel's block granularity per device), got seq_len={seq_len}; pad "
                     f"the sequence length or use model.attention='xla'")


def check_layout(layout, mesh):
  """Raises ValueError if `layout` places q, k, v in a way a per-device kernel cannot serve."""
  if layout.axes_for("act_heads") != layout.axes_for("act_kv_heads"):
    raise ValueError(f"model.attention='splash' needs query and kv heads split the same way (each "
                     f"device's query heads must find their kv heads locally), but layout "
                     f"{layout.source!r} maps act_heads to {layout.axes_for('act_heads')} and "
                     f"act_kv_heads to {layout.axes_for('act_kv_heads')}")


def choose(model_cfg, seq_len: int, layout, mesh) -> str:
  """The attention a run uses: "xla" or "splash". An explicit "splash" the run cannot use is a
  ValueError saying why; "auto" takes splash only on TPU and only where nothing stands in its way."""
  def check():
    check_seq_len(seq_len, int(np.prod([mesh.shape[a] for a in layout.axes_for("length")])))
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


def _block_sizes(block: int):
  return splash_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                               block_q_dq=block, block_kv_dq=block)


@functools.cache
def _kernel(heads: int, seq_len: int, interpret: bool):
  mask = splash_lib.MultiHeadMask([splash_lib.CausalMask((seq_len, seq_len))] * heads)
  return splash_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                    block_sizes=_block_sizes(min(BLOCK, seq_len)),
                                    residual_checkpoint_name=RESIDUALS, interpret=interpret)


def _local(q, k, v, segment_ids, *, interpret: bool):
  """One device's rows: q [b, h, T, Dh], k/v [b, k, T, Dh], segment_ids [b, T] -> [b, h, T, Dh]."""
  kernel = _kernel(q.shape[1], q.shape[2], interpret)
  return _apply(kernel, q, k, v, segment_ids, segment_ids)


def _apply(kernel, q, k, v, q_segments, kv_segments):
  """q [b, h, Tq, Dh], k/v [b, k, S, Dh] -> [b, h, Tq, Dh] by `kernel`, vmapped over rows."""
  segments = splash_lib.SegmentIds(q=q_segments, kv=kv_segments)
  return jax.vmap(kernel)(q, k, v, segment_ids=segments)


def _per_platform(q, k, v, segment_ids):
  # The Mosaic kernel where the program is lowered for TPU, the interpreter anywhere else.
  return jax.lax.platform_dependent(
      q, k, v, segment_ids,
      tpu=functools.partial(_local, interpret=False),
      default=functools.partial(_local, interpret=True))


def splash(q, k, v, segment_ids):
  """Causal attention within packed documents (segment ids equal), GQA by head groups.

  q [B, H, T, Dh] already times 1 / sqrt(Dh) (the kernel does not scale the scores), k/v
  [B, K, T, Dh], segment_ids [B, T] -> [B, H, T, Dh] in q's dtype: heads before length, as the
  kernel reads them. Under a layout that shards `length`, the rows must be in
  `balance`'s order (the model does that).
  """
  mesh = jax.sharding.get_abstract_mesh()
  q_spec = sharding.logical_spec(Q_AXES)
  if q_spec is None:  # no layout active: one device
    return _per_platform(q, k, v, segment_ids)
  kv_spec = sharding.logical_spec(KV_AXES)
  seg_spec = jax.sharding.PartitionSpec(q_spec[0], q_spec[2])
  if context_shards() > 1:
    return _context_parallel(q, k, v, segment_ids, mesh, q_spec, kv_spec, seg_spec)
  return jax.shard_map(_per_platform, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------------
# Context parallelism: queries sharded by sequence, keys and values all-gathered, load balanced
# ---------------------------------------------------------------------------------------------------


def context_shards() -> int:
  """Devices each row's `length` splits over under the active layout (1: whole rows per device)."""
  spec = sharding.logical_spec(("length",))
  if spec is None or spec[0] is None:
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  return int(np.prod([mesh.shape[a] for a in sharding.spec_axes(spec[0])]))


def _chunk_order(cp: int) -> np.ndarray:
  """Natural chunk index at each reordered chunk slot: [0, 2cp-1, 1, 2cp-2, ...]; device i holds
  slots 2i and 2i+1, i.e. chunks i and 2cp-1-i, one early and one late in the causal triangle."""
  return np.stack([np.arange(cp), 2 * cp - 1 - np.arange(cp)], axis=1).reshape(-1)


def _reorder(x, order, axis: int = 1):  # the chunks of x's `axis` (length) in `order`
  t = x.shape[axis]
  chunks = x.reshape(*x.shape[:axis], len(order), t // len(order), *x.shape[axis + 1:])
  return jnp.take(chunks, order, axis=axis).reshape(x.shape)


def balance(x, cp: int):
  """[B, T, ...] rows in natural order -> the load-balanced order of `cp` context shards."""
  return _reorder(x, _chunk_order(cp))


def unbalance(x, cp: int):
  """Inverse of `balance`."""
  return _reorder(x, np.argsort(_chunk_order(cp)))


class _BalancedCausalMask(splash_lib.CausalMask):
  """Causal in natural positions for queries laid out in `balance`'s order (keys stay natural)."""

  def __init__(self, seq_len: int, cp: int):
    super().__init__((seq_len, seq_len))
    natural = np.arange(seq_len, dtype=np.int32).reshape(2 * cp, -1)
    self.q_sequence = natural[_chunk_order(cp)].reshape(-1)  # natural position of each query row


@functools.cache
def _context_kernel(heads: int, seq_len: int, cp: int, interpret: bool):
  """A kernel over all `seq_len` queries whose mask info splits into `cp` query shards."""
  mask = splash_lib.MultiHeadMask([_BalancedCausalMask(seq_len, cp)] * heads)
  # Concrete mask-info arrays even when first built inside a trace: the cached kernel outlives it.
  with jax.ensure_compile_time_eval():
    return splash_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=cp,
                                      block_sizes=_block_sizes(min(BLOCK, seq_len // cp)),
                                      residual_checkpoint_name=RESIDUALS, interpret=interpret)


def _context_parallel(q, k, v, segment_ids, mesh, q_spec, kv_spec, seg_spec):
  cp, seq_axes = context_shards(), q_spec[2]
  heads = q.shape[1] // int(np.prod([mesh.shape[a] for a in sharding.spec_axes(q_spec[1])]))
  # The mask info is per query shard: it enters shard_map as an argument split like the queries.
  kernels = {flag: _context_kernel(heads, q.shape[2], cp, flag) for flag in (False, True)}
  kernel_spec = kernels[True].manual_sharding_spec(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, seq_axes)))

  def local(q, k, v, segments, mask_info):  # q [b, h, T/cp, Dh]; k, v [b, k, T/cp, Dh]
    def natural(x, axis):  # gathered keys come in balanced order: make it natural
      whole = jax.lax.all_gather(x, axis_name=seq_axes, axis=axis, tiled=True)
      return _reorder(whole, np.argsort(_chunk_order(cp)), axis)
    k, v, kv_segments = natural(k, 2), natural(v, 2), natural(segments, 1)  # T whole

    def run(interpret):
      kernel = jax.tree.unflatten(jax.tree.structure(kernels[interpret]),
                                  jax.tree.leaves(mask_info))
      return lambda: _apply(kernel, q, k, v, segments, kv_segments)
    return jax.lax.platform_dependent(tpu=run(False), default=run(True))

  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, kernel_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids, kernels[True])


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
