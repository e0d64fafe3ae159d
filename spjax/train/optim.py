"""The optimizer from `config.optimizer`: clipping, warmup-cosine schedule, masked weight decay."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from spjax.compress import prune

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")


def make_optimizer(opt_cfg: ml_collections.ConfigDict, num_train_steps: int, prune_cfg=None):
  """Returns `(tx, schedule)`; `schedule(step)` is the learning rate the update at `step` uses.

  The state of `tx` is an `optax.ApplyIfFiniteState`: non-finite gradients skip the update.

  Learning rate: linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
  `end_lr_ratio * learning_rate` over `decay_steps` (0 = the rest of `num_train_steps`).
  Gradients are clipped to `grad_clip_norm` (global norm; 0 = off) before anything else sees them.
  With `prune_cfg` (config.prune) enabled, the updates keep pruned weights at zero (prune.masked).
  Weight decay is decoupled (`param -= lr_t * weight_decay * param`, as in AdamW) and applies only
  to matrices (see `decay_mask`); "adam" is "adamw" without it. `b1`, `b2`, `eps` are Adam's,
  `momentum` is SGD's; adafactor keeps optax's defaults for its own moment estimates.
  """
  _validate(opt_cfg, num_train_steps)
  # At least one decay step: optax refuses an empty cosine phase (warmup_steps == num_train_steps).
  decay_steps = opt_cfg.decay_steps or max(num_train_steps - opt_cfg.warmup_steps, 1)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt_cfg.learning_rate,
      warmup_steps=opt_cfg.warmup_steps,
      decay_steps=opt_cfg.warmup_steps + decay_steps,  # optax counts the warmup in decay_steps
      end_value=opt_cfg.end_lr_ratio * opt_cfg.learning_rate)

  wd = opt_cfg.weight_decay
  decayed = functools.partial(decay_mask, embeddings=opt_cfg.decay_embeddings)
  if opt_cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=wd,
                     mask=decayed)
  elif opt_cfg.name == "adam":
    tx = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  elif opt_cfg.name == "sgd":
    # optax.sgd with the decay added after momentum, so it stays decoupled (SGDW).
    tx = optax.chain(optax.trace(decay=opt_cfg.momentum),
                     optax.add_decayed_weights(wd, mask=decayed),
                     optax.scale_by_learning_rate(schedule))
  else:
    # Adafactor adds its decay after the learning rate is applied, so scale the rate by the schedule
    # to get the same `lr_t * weight_decay` as AdamW.
    tx = optax.adafactor(schedule, weight_decay_rate=lambda step: wd * schedule(step),
                         weight_decay_mask=decayed)

  if opt_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  pruning = prune.Schedule.from_config(prune_cfg) if prune_cfg is not None else None
  if pruning is not None and pruning.enabled:
    tx = prune.masked(tx, pruning)  # inside skip_if_not_finite: a skipped step prunes nothing
  # A step whose gradients hold a NaN or Inf leaves params and moments untouched (and is counted in
  # `total_notfinite`); the train loop decides whether to carry on or stop (config.nan_policy).
  return skip_if_not_finite(tx), schedule


def skip_if_not_finite(inner) -> optax.GradientTransformationExtraArgs:
  """optax.apply_if_finite (never giving up) without its `lax.cond`: the inner update always runs
  and a non-finite step's updates (zeros) and state (the old one) are selected elementwise. Same
  state, optax.ApplyIfFiniteState, so checkpoints and `total_notfinite` are unchanged.

  Why not the cond: XLA:CPU runs a conditional's collectives (the global norm's all-reduce inside
  the update) in a nested executor beside the step's other collectives, and 8 simulated devices on
  2 cores deadlocked there, each device waiting at another rendezvous (fsdp_sp). On TPU the select
  fuses into the update's elementwise pass, and XLA's cost analysis has no branches to take a max
  over.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update(updates, state, params=None, **extra_args):
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    pick = lambda new, old: jnp.where(finite, new, old)
    bump = optax.safe_int32_increment
    new_state = optax.ApplyIfFiniteState(
        notfinite_count=pick(jnp.zeros([], jnp.int32), bump(state.notfinite_count)),
        last_finite=finite, total_notfinite=pick(state.total_notfinite, bump(state.total_notfinite)),
        inner_state=jax.tree.map(pick, new_inner, state.inner_state))
    return jax.tree.map(lambda u: pick(u, jnp.zeros_like(u)), new_updates), new_state

  return optax.GradientTransformationExtraArgs(init, update)


def decay_mask(params, embeddings: bool = True):
  """True for weight matrices (kernels, embeddings), False for norm scales and biases.

  `embeddings=False` leaves the token embedding table (logical axes ("vocab", "embed")) out too, as
  fine-tuning usually does; an untied output projection is still decayed.

  Biases are recognised by name (`..._bias`, `bias`): a per-head q bias is [heads, head_dim], 2-D
  but still a bias. Otherwise a scanned stack's leading `layers` axis must not count, so with logical
  axis names the axes other than `layers` are counted; without them, `ndim`.
  Returns a prefix of `params` (one bool per param), which `optax.masked` accepts.
  """
  def is_matrix(path, leaf) -> bool:
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    if name == "bias" or name.endswith("_bias"):
      return False
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    if not embeddings and names is not None and [n for n in names if n != "layers"][:1] == ["vocab"]:
      return False
    if names is not None:
      return len([n for n in names if n != "layers"]) >= 2
    return leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(is_matrix, params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def _validate(opt_cfg, num_train_steps):
  def fail(field, why):
    raise ValueError(f"optimizer.{field}={opt_cfg[field]!r}: {why}")

  if opt_cfg.name not in OPTIMIZERS:
    fail("name", f"unknown optimizer; valid names: {', '.join(OPTIMIZERS)}")
  if opt_cfg.learning_rate < 0:
    fail("learning_rate", "must be >= 0")
  if opt_cfg.warmup_steps < 0:  # longer than the run is fine: a short trial of a big config
    fail("warmup_steps", "must be >= 0")
  if opt_cfg.decay_steps < 0:
    fail("decay_steps", "must be >= 0 (0 = decay until num_train_steps)")
  if opt_cfg.end_lr_ratio < 0:
    fail("end_lr_ratio", "must be >= 0")
  for field in ("b1", "b2", "momentum"):
    if not 0 <= opt_cfg[field] < 1:
      fail(field, "must be in [0, 1)")
  for field in ("eps", "weight_decay", "grad_clip_norm"):
    if opt_cfg[field] < 0:
      fail(field, "must be >= 0")
