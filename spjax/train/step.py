"""Pure train and eval steps: (state, batch) -> (state, metrics). No I/O, no Python state.

`state` is {"step": int32 [], "params": nnx.State, "opt_state": optax state}; `batch` is the data
pipeline's dict of [B, T] int32 arrays (inputs, targets, segment_ids, positions; segment 0 = padding).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spjax.model import moe as moe_lib
from spjax.parallel.sharding import constrain


def loss_sums(params, graphdef, batch, dropout_key, z_loss: float, scale=1.0):
  """Summed token cross-entropy (+ z-loss) times `scale`, the unscaled sum, and the token count.

  With `scale` = 1 / (tokens in the whole batch), gradients of microbatches add up to the gradient of
  the batch's mean loss, with no division pass over the gradients afterwards.
  """
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                 dropout_key=dropout_key)  # [B, T, V] float32
  mask = (batch["segment_ids"] > 0).astype(jnp.float32)  # [B, T]
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  nll_sum = jnp.sum((log_z - target_logit) * mask)
  # z-loss (PaLM) pulls log Z towards 0 so bf16 logits stay in range; added to the objective only.
  objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * mask)
  objective = objective * scale
  # MoE aux losses are means over this (micro)batch; weighted by its share of the batch's tokens.
  moe_loss, moe_metrics = moe_lib.objective(model)  # (None, {}) for a dense model
  if moe_loss is not None:
    objective = objective + moe_loss * jnp.sum(mask) * scale
  return objective, (nll_sum, jnp.sum(mask), moe_metrics)


def _microbatches(batch, n: int):
  """[n*B, T] -> [n, B, T], keeping each device's rows on that device (row = b * n + i)."""
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch", "length"))
  return jax.tree.map(split, batch)


def train_step(state, batch, *, graphdef, tx, schedule, seed: int, grad_accum_steps: int,
               z_loss: float):
  params, step = state["params"], state["step"]
  key = jax.random.fold_in(jax.random.key(seed), step)  # dropout differs per step, same per layout
  grad_fn = jax.grad(loss_sums, has_aux=True)

  tokens = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)
  if grad_accum_steps == 1:
    grads, (nll_sum, _, moe_metrics) = grad_fn(params, graphdef, batch, key, z_loss, 1.0 / tokens)
  else:
    def accumulate(carry, xs):
      i, micro = xs
      g, (nll, _, moe) = grad_fn(params, graphdef, micro, jax.random.fold_in(key, i), z_loss,
                                 1.0 / tokens)
      acc_g, acc_nll = carry
      return (jax.tree.map(jnp.add, acc_g, g), acc_nll + nll), moe
    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jnp.arange(grad_accum_steps), _microbatches(batch, grad_accum_steps))
    (grads, nll_sum), moe = jax.lax.scan(accumulate, (zeros, 0.0), xs)
    moe_metrics = jax.tree.map(jnp.mean, moe)  # [n] per-microbatch means -> []

  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_state = {"step": step + 1, "params": optax.apply_updates(params, updates),
               "opt_state": opt_state}
  metrics = {"loss": nll_sum / tokens, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(step), "tokens": tokens, **moe_metrics}
  return new_state, metrics


def eval_step(params, batch, *, graphdef):
  """Summed loss and token count of one batch; the caller divides after summing batches."""
  _, (nll_sum, tokens, _) = loss_sums(params, graphdef, batch, None, 0.0)
  return {"nll_sum": nll_sum, "tokens": tokens}
