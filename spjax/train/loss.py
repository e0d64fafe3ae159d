"""Token losses without the [B, T, V] float32 logits: the sequence in chunks.

The full-width loss holds the logits of every token at once (and, for the backward pass, their
gradient): for the 1B at batch 8 per device that is 8 x 2048 x 32000 x 4 bytes = 2 GiB each, the
largest buffers of the step. Here each chunk of `chunk` positions is unembedded, reduced to its
sums, and dropped; `jax.checkpoint` makes the backward pass recompute the chunk's logits from its
hidden states instead of keeping them, so no [B, T, V] array is ever formed. The chunks are a
Python loop (unrolled): no while loop, so XLA's cost analysis can still cost the step.
Cost: the vocabulary matmul runs forward twice (2 B T D V more FLOPs per step). It saves memory
where the loss is the step's peak (full remat: -0.9 GiB for the 1B at batch 8), not where the
layers' saved activations are (BENCHMARKS.md).

`chunked_sums` is the loop; the plain cross-entropy (config.loss_chunk_size, `chunked_nll_sums`)
and distillation's KL + CE (config.distill.chunk_size, spjax/tune/distill.py) are two bodies for it.
"""

import jax
import jax.numpy as jnp

from spjax.model import model as model_lib

_NAMES = ("batch", "length", "act_vocab")


def chunked_sums(sums, arrays, chunk: int):
  """sum over chunks of `sums(*parts)`, each part `chunk` positions of axis 1 of every array.

  `arrays`: [B, T, ...] each (hidden states, targets, masks); `sums` returns a pytree of float32
  sums. `chunk` <= 0 or >= T: one call on the whole arrays (nothing to save by chunking).
  """
  t = arrays[0].shape[1]
  if chunk <= 0 or chunk >= t:
    return sums(*arrays)
  if t % chunk:
    raise ValueError(f"chunk size ({chunk}) must divide the sequence length ({t})")
  sums = jax.checkpoint(sums)  # keep only each chunk's inputs; its logits are recomputed backward
  total = None
  for start in range(0, t, chunk):
    part = sums(*(x[:, start:start + chunk] for x in arrays))
    total = part if total is None else jax.tree.map(jnp.add, total, part)
  return total


def chunked_nll_sums(hidden, table, targets, mask, chunk: int, dtype):
  """(sum of nll * mask, sum of log(Z)^2 * mask) over [B, T], `chunk` positions at a time.

  hidden [B, T, D] final hidden states (Transformer.hidden), table [D, V] (Transformer.unembedding),
  targets [B, T] int, mask [B, T] float (0 = not scored); T must be a multiple of `chunk`.
  """
  t = hidden.shape[1]
  if chunk <= 0 or t % chunk:
    raise ValueError(f"loss_chunk_size ({chunk}) must be a positive divisor of seq_len ({t})")

  def sums(h, y, m):  # [B, c, D], [B, c], [B, c]
    logits = model_lib.unembed(h, table, dtype, _NAMES)  # [B, c, V] float32
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, c]
    # A masked sum, not take_along_axis: XLA fuses it into one pass over the logits, where the
    # gather becomes an offloaded fusion the TPU cost model gives no estimate (INT64_MAX).
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    target_logit = jnp.sum(jnp.where(vocab == y[..., None], logits, 0.0), axis=-1)  # [B, c]
    return jnp.sum((log_z - target_logit) * m), jnp.sum(jnp.square(log_z) * m)

  return chunked_sums(sums, (hidden, targets, mask), chunk)
