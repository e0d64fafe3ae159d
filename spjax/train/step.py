"""Pure train and eval steps: (state, batch) -> (state, metrics). No I/O, no Python state.

`state` is {"step": int32 [], "params": nnx.State, "opt_state": optax state} (+ "ema_params", the
float32 moving average of the params, when config.ema_decay > 0); `batch` is the data pipeline's
dict of [B, T] int32 arrays (inputs, targets, segment_ids, positions; segment 0 = padding) and
`loss_mask` [B, T] (int or float): the weight of each target, 0 = not trained (padding, prompts).
Only the params the `trainable` filter picks (all, or LoRA adapters) get gradients and optimizer
state; the rest (the base) pass through the step untouched.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spjax.model import moe as moe_lib
from spjax.parallel.sharding import constrain
from spjax.train import loss as loss_lib


def loss_sums(params, graphdef, batch, dropout_key, z_loss: float, scale=1.0, *, loss_chunk=0,
              base=None, neftune_alpha: float = 0.0):
  """Summed token cross-entropy (+ z-loss) times `scale`, the unscaled sum, and the token count.

  Every sum is weighted by `batch["loss_mask"]`; the count is the sum of the mask.

  With `scale` = 1 / (tokens in the whole batch), gradients of microbatches add up to the gradient of
  the batch's mean loss, with no division pass over the gradients afterwards. `loss_chunk` > 0
  unembeds that many positions at a time (spjax/train/loss.py): same sums, no [B, T, V] logits.
  `base`: the params not differentiated (a LoRA run's base weights).
  """
  model = nnx.merge(graphdef, params, *([] if base is None else [base]), copy=True)
  mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  hidden = model.hidden(*args, dropout_key=dropout_key, neftune_alpha=neftune_alpha)  # [B, T, D]
  # Either way no [B, T, V] float32 logits are kept for the backward pass (spjax/train/loss.py).
  if loss_chunk:
    nll_sum, z_sum = loss_lib.chunked_nll_sums(hidden, model.unembedding(), batch["targets"], mask,
                                               loss_chunk, model.cfg.dtype)
  else:
    nll_sum, z_sum = loss_lib.nll_sums(hidden, model.unembedding(), batch["targets"], mask,
                                       model.cfg.dtype)
  count = jnp.sum(mask)
  # z-loss (PaLM) pulls log Z towards 0 so bf16 logits stay in range; added to the objective only.
  objective, logged = moe_lib.add_aux(model, (nll_sum + z_loss * z_sum) * scale, count, scale)
  return objective, (nll_sum, count, logged)


def _microbatches(batch, n: int):
  """[n*B, T] -> [n, B, T], keeping each device's rows on that device (row = b * n + i)."""
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, "batch", "length"))
  return jax.tree.map(split, batch)


def train_step(state, batch, frozen=None, *, graphdef, tx, schedule, seed: int,
               grad_accum_steps: int, z_loss: float, loss_chunk: int = 0, ema_decay: float = 0.0,
               objective=None, trainable=nnx.Param, neftune_alpha: float = 0.0):
  """One optimizer step. `objective` (e.g. distillation's) replaces `loss_sums`: it takes the same
  arguments plus `frozen` (arrays it reads but does not train: a teacher's params) and returns
  as it does (objective * scale, (nll sum, token count, {name: value})); each value is summed over
  microbatches and logged as metrics[name]."""
  step = state["step"]
  params, base = nnx.split_state(state["params"], trainable, ...)
  key = jax.random.fold_in(jax.random.key(seed), step)  # dropout differs per step, same per layout
  loss_fn = (functools.partial(loss_sums, loss_chunk=loss_chunk) if objective is None
             else functools.partial(objective, teacher_params=frozen))
  grad_fn = functools.partial(jax.grad(loss_fn, has_aux=True), base=base,
                              neftune_alpha=neftune_alpha)

  # Trained targets of the whole global batch (every microbatch), so microbatch gradients add up.
  tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
  if grad_accum_steps == 1:
    grads, (nll_sum, _, logged) = grad_fn(params, graphdef, batch, key, z_loss, 1.0 / tokens)
  else:
    def accumulate(acc_g, xs):
      i, micro = xs
      g, aux = grad_fn(params, graphdef, micro, jax.random.fold_in(key, i), z_loss, 1.0 / tokens)
      return jax.tree.map(jnp.add, acc_g, g), aux
    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jnp.arange(grad_accum_steps), _microbatches(batch, grad_accum_steps))
    grads, auxs = jax.lax.scan(accumulate, zeros, xs)
    nll_sum, _, logged = jax.tree.map(lambda a: jnp.sum(a, axis=0), auxs)  # over microbatches

  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = nnx.merge_state(optax.apply_updates(params, updates), base)
  new_state = {"step": step + 1, "params": new_params, "opt_state": opt_state}
  if ema_decay > 0:  # ema <- decay * ema + (1 - decay) * params, in float32 whatever the params are
    new_state["ema_params"] = optax.incremental_update(
        jax.tree.map(lambda p: p.astype(jnp.float32), new_params), state["ema_params"],
        1.0 - ema_decay)
  metrics = {"loss": nll_sum / tokens, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(step), "tokens": tokens, **logged}
  return new_state, metrics


def eval_step(params, batch, *, graphdef, loss_chunk: int = 0):
  """Summed loss and token count of one batch; the caller divides after summing batches."""
  _, (nll_sum, tokens, _) = loss_sums(params, graphdef, batch, None, 0.0, loss_chunk=loss_chunk)
  return {"nll_sum": nll_sum, "tokens": tokens}
