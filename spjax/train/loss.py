"""Token cross-entropy sums that never keep [B, T, V] float32 logits.

`nll_sums` unembeds in the compute dtype and reduces in float32 through a custom VJP whose only
[B, T, V] residual is the compute-dtype logits: autodiff of `logsumexp(logits.astype(f32))` keeps
the float32 copy for the backward pass as well (for the 1B at batch 8 per device: 2 GiB besides
the 1 GiB bf16 logits, at the point of the step where every layer's saved activations are live),
and its backward writes the compute-dtype gradient in the same pass that recomputes the softmax.

`chunked_nll_sums` goes further: each chunk of `chunk` positions is unembedded, reduced to its nll
and log Z sums, and dropped; `jax.checkpoint` makes the backward pass recompute the chunk's
logits from its hidden states instead of keeping them, so no [B, T, V] array is ever formed. The
chunks are a Python loop (unrolled): no while loop, so XLA's cost analysis can still cost the step.
Cost: the vocabulary matmul runs forward twice (2 B T D V more FLOPs per step). It saves memory
where the loss is the step's peak (full remat: -0.9 GiB for the 1B at batch 8), not where the
layers' saved activations are (BENCHMARKS.md).

`chunked_sums` is the loop; the plain cross-entropy (config.loss_chunk_size, `chunked_nll_sums`)
and distillation's KL + CE (config.distill.chunk_size, spjax/tune/distill.py) are two bodies for it.
"""

import jax
import jax.numpy as jnp

from spjax.parallel.sharding import constrain

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


def _target_logits(logits32, targets):  # [B, T, V] f32, [B, T] int -> [B, T]
  # A masked sum, not take_along_axis: XLA fuses it into one pass over the logits, where the
  # gather becomes an offloaded fusion the TPU cost model gives no estimate (INT64_MAX).
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits32.shape, 2)
  return jnp.sum(jnp.where(vocab == targets[..., None], logits32, 0.0), axis=-1)


@jax.custom_vjp
def _softmax_ce_sums(logits, targets, mask):
  """(sum of (log Z - target logit) * mask, sum of log(Z)^2 * mask), in float32 whatever
  `logits` [B, T, V] is; targets [B, T] int, mask [B, T] float."""
  return _softmax_ce_fwd(logits, targets, mask)[0]


def _softmax_ce_fwd(logits, targets, mask):
  logits32 = logits.astype(jnp.float32)  # fused into the reductions: never written out
  log_z = jax.nn.logsumexp(logits32, axis=-1)  # [B, T]
  nll = log_z - _target_logits(logits32, targets)  # [B, T]
  sums = (jnp.sum(nll * mask), jnp.sum(jnp.square(log_z) * mask))
  return sums, (logits, log_z, nll, targets, mask)


def _softmax_ce_bwd(residuals, cotangents):
  logits, log_z, nll, targets, mask = residuals
  g_nll, g_z = cotangents
  # d/dlogits of nll = softmax - onehot(target); of log(Z)^2 = 2 log(Z) softmax.
  per_z = (g_nll + 2.0 * g_z * log_z) * mask  # [B, T]
  probs = jnp.exp(logits.astype(jnp.float32) - log_z[..., None])  # [B, T, V]
  vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
  grad = probs * per_z[..., None] - jnp.where(vocab == targets[..., None],
                                              (g_nll * mask)[..., None], 0.0)
  grad_mask = g_nll * nll + g_z * jnp.square(log_z)  # [B, T]
  return grad.astype(logits.dtype), None, grad_mask.astype(mask.dtype)


_softmax_ce_sums.defvjp(_softmax_ce_fwd, _softmax_ce_bwd)


def nll_sums(hidden, table, targets, mask, dtype):
  """(sum of nll * mask, sum of log(Z)^2 * mask) over [B, T].

  hidden [B, T, D] final hidden states (Transformer.hidden), table [D, V] (Transformer.unembedding),
  targets [B, T] int, mask [B, T] float (0 = not scored); the vocabulary matmul in `dtype`, the
  softmax in float32 (the model's `logits` casts the same matmul's output to float32).
  """
  logits = constrain(hidden @ table.astype(dtype), _NAMES)  # [B, T, V] in dtype
  return _softmax_ce_sums(logits, targets, mask.astype(jnp.float32))


def chunked_nll_sums(hidden, table, targets, mask, chunk: int, dtype):
  """As `nll_sums`, `chunk` positions at a time; T must be a multiple of `chunk`."""
  t = hidden.shape[1]
  if chunk <= 0 or t % chunk:
    raise ValueError(f"loss_chunk_size ({chunk}) must be a positive divisor of seq_len ({t})")

  def sums(h, y, m):  # [B, c, D], [B, c], [B, c]; chunked_sums checkpoints it
    return nll_sums(h, table, y, m, dtype)

  return chunked_sums(sums, (hidden, targets, mask), chunk)
