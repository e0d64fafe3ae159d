"""Magnitude pruning during training: masks kept in the optimizer state, as jaxpruner's wrap_optax.

`masked(tx, prune_cfg)` wraps an optax transformation. Its state holds one boolean mask per prunable
matrix (True = kept), each an `nnx.Variable` carrying its parameter's logical names, so the layout
shards a mask exactly like its parameter and the checkpoint saves and restores it with the rest of the
optimizer state (any mesh, any layout). Every update is rewritten so that `params + updates` is exactly
zero where the mask is False: pruned weights stay 0.0 after every step, not merely small.

Schedule (Zhu & Gupta 2017, "To prune, or not to prune"): the target sparsity after update t is

  s(t) = s_f * (1 - (1 - (t - start) / (end - start))^3)    for start <= t <= end,

0 before `start_step` and s_f after `end_step`; masks are recomputed every `every_steps` updates
(and at `end_step`) by magnitude, per matrix: each layer of a scanned stack is its own matrix.
A weight once pruned is never regrown (its score is below every kept weight's).

N:M patterns ("2:4") keep the N largest of every M consecutive weights along a matrix's first axis
(an input, i.e. contracted, axis of every spjax matrix), pruned once at `start_step`.

t counts the updates this wrapper has applied: a step skipped for non-finite gradients (the outer
`optim.skip_if_not_finite`) does not advance the schedule, just as it does not advance Adam's count.
"""

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PATTERNS = "'unstructured' or 'N:M' such as '2:4'"
DEFAULT_EXCLUDE = "embed|norm|bias"  # embeddings, unembedding, norm scales, biases


@dataclasses.dataclass(frozen=True)
class Schedule:
  sparsity: float  # final target of unstructured pruning; 1 - N/M for N:M
  n_m: tuple[int, int] | None  # (N, M) or None for unstructured
  start: int
  end: int
  every: int
  exclude: str  # regex on "path/of/param"

  @classmethod
  def from_config(cls, cfg) -> "Schedule":
    """Validates `config.prune`; ValueError naming the field."""
    def fail(field, why):
      raise ValueError(f"prune.{field}={cfg[field]!r}: {why}")
    n_m = None
    if cfg.pattern != "unstructured":
      match = re.fullmatch(r"(\d+):(\d+)", cfg.pattern)
      if not match or not 0 < int(match[1]) < int(match[2]):
        fail("pattern", f"must be {PATTERNS}, with 0 < N < M")
      n_m = (int(match[1]), int(match[2]))
      if cfg.sparsity != 0:
        fail("sparsity", f"an N:M pattern sets the sparsity ({1 - n_m[0] / n_m[1]:g}); leave "
             "prune.sparsity at 0")
    elif not 0 <= cfg.sparsity < 1:
      fail("sparsity", "must be in [0, 1)")
    if cfg.start_step < 0:
      fail("start_step", "must be >= 0")
    if cfg.end_step and cfg.end_step < cfg.start_step:
      fail("end_step", f"must be >= prune.start_step ({cfg.start_step}), or 0 (= start_step)")
    if cfg.every_steps <= 0:
      fail("every_steps", "must be a positive number of steps")
    try:
      re.compile(cfg.exclude)
    except re.error as e:
      fail("exclude", f"is not a regular expression: {e}")
    sparsity = 1 - n_m[0] / n_m[1] if n_m else float(cfg.sparsity)
    return cls(sparsity, n_m, cfg.start_step, cfg.end_step or cfg.start_step, cfg.every_steps,
               cfg.exclude)

  @property
  def enabled(self) -> bool:
    return self.sparsity > 0

  def sparsity_at(self, t):
    """Target sparsity after update t (int or traced int)."""
    if self.n_m:
      return jnp.where(t >= self.start, self.sparsity, 0.0)
    frac = jnp.clip((t - self.start) / max(self.end - self.start, 1), 0.0, 1.0)
    return jnp.where(t >= self.start, self.sparsity * (1 - (1 - frac) ** 3), 0.0)

  def prunes_at(self, t):
    """Whether update t recomputes the masks."""
    if self.n_m:
      return t == self.start
    return (t >= self.start) & (t <= self.end) & (((t - self.start) % self.every == 0)
                                                   | (t == self.end))


class PruneState(NamedTuple):
  inner: optax.OptState
  masks: nnx.State  # only the prunable params: bool, True = kept, laid out as the param
  count: jax.Array  # [] int32: updates applied so far


def prunable(path: str, var, exclude: str) -> bool:
  """Matrices (two or more axes besides `layers`) whose path the exclude regex does not match."""
  names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
  axes = len([n for n in names if n != "layers"]) if names else len(var.shape)
  return axes >= 2 and not re.search(exclude, path)


def _flat(tree) -> dict:
  """{path tuple: Variable}; `_name(path)` is the "blocks/mlp/up" form the regex sees."""
  return dict(nnx.to_flat_state(tree))


def _name(path) -> str:
  return "/".join(map(str, path))


def _layers_axis(var) -> int | None:
  names = var.get_metadata().get("out_sharding") or ()
  return list(names).index("layers") if "layers" in names else None


def magnitude_mask(w, keep_mask, sparsity, layers_axis=None):
  """Keeps the largest |w| of each matrix (each layer of a stack); prunes round(sparsity * n).

  Already-pruned weights (`keep_mask` False) score lowest, so they stay pruned. Ranks, not a
  threshold: ties (many exact zeros) still prune exactly the target count.
  """
  score = jnp.where(keep_mask, jnp.abs(w.astype(jnp.float32)), -1.0)
  if layers_axis is not None:
    score = jnp.moveaxis(score, layers_axis, 0)
  rows = score.reshape(score.shape[0], -1) if layers_axis is not None else score.reshape(1, -1)
  n = rows.shape[1]
  rank = jnp.argsort(jnp.argsort(rows, axis=1), axis=1)  # 0 = smallest
  kept = (rank >= jnp.round(sparsity * n).astype(jnp.int32)).reshape(score.shape)
  return jnp.moveaxis(kept, 0, layers_axis) if layers_axis is not None else kept


def n_m_mask(w, n: int, m: int, layers_axis=None):
  """Keeps the n largest |w| of every m consecutive weights along the matrix's first axis."""
  axis = 1 if layers_axis == 0 else 0
  x = jnp.moveaxis(jnp.abs(w.astype(jnp.float32)), axis, -1)  # [..., In]
  groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)  # [..., In / m, m]
  rank = jnp.argsort(jnp.argsort(groups, axis=-1), axis=-1)
  kept = (rank >= m - n).reshape(x.shape)
  return jnp.moveaxis(kept, -1, axis)


def check_params(abstract_params, schedule: Schedule) -> list[tuple]:
  """The prunable paths; ValueError if an N:M group does not divide a matrix's first axis."""
  out = []
  for path, var in _flat(abstract_params).items():
    if not prunable(_name(path), var, schedule.exclude):
      continue
    if schedule.n_m:
      axis = 1 if _layers_axis(var) == 0 else 0
      if var.shape[axis] % schedule.n_m[1]:
        raise ValueError(f"prune.pattern={schedule.n_m[0]}:{schedule.n_m[1]}: {_name(path)} has "
                         f"shape {tuple(var.shape)}; its axis {axis} ({var.shape[axis]}) is not a "
                         f"multiple of {schedule.n_m[1]}. Exclude it with prune.exclude or pick "
                         "another M")
    out.append(path)
  if not out:
    raise ValueError(f"prune.exclude={schedule.exclude!r} leaves no matrix to prune")
  return out


def masked(tx: optax.GradientTransformation, schedule: Schedule) -> optax.GradientTransformation:
  """`tx` whose updates keep the pruned weights at exactly zero; masks follow `schedule`."""

  def init(params):
    flat = _flat(params)
    masks = nnx.from_flat_state([(path, flat[path].replace(jnp.ones(flat[path].shape, bool)))
                                 for path in check_params(params, schedule)])
    return PruneState(tx.init(params), masks, jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    # Pruned weights get no gradient, so their moments stay put and nothing leaks into clipping.
    grads_flat, params_flat = _flat(updates), _flat(params)
    masks_flat = _flat(state.masks)
    for path, mask in masks_flat.items():
      grads_flat[path] = grads_flat[path].replace(jnp.where(mask[...], grads_flat[path][...], 0))
    updates, inner = tx.update(_rebuild(updates, grads_flat), state.inner, params)

    t, new_masks, out = state.count, {}, _flat(updates)
    for path, mask in masks_flat.items():
      p, u, axis = params_flat[path][...], out[path][...], _layers_axis(params_flat[path])
      def recompute(w, m, axis=axis):  # w: the weights this update would give
        if schedule.n_m:
          return n_m_mask(w, *schedule.n_m, axis) & m
        return magnitude_mask(w, m, schedule.sparsity_at(t), axis)
      # Sorting every matrix is costly: lax.cond runs it on pruning updates only.
      kept = jax.lax.cond(schedule.prunes_at(t), recompute, lambda w, m: m, p + u, mask[...])
      new_masks[path] = mask.replace(kept)
      # p + (-p) is exactly +0.0, so a pruned weight is exactly zero after apply_updates.
      out[path] = out[path].replace(jnp.where(kept, u, -p))
    masks = _rebuild(state.masks, new_masks)
    return _rebuild(updates, out), PruneState(inner, masks, t + 1)

  return optax.GradientTransformation(init, update)


def _rebuild(tree, flat: dict):
  """`tree` with the leaves of `flat` (path -> Variable) swapped in."""
  return nnx.from_flat_state([(p, flat.get(p, v)) for p, v in nnx.to_flat_state(tree)])


def sparsity_report(params, exclude: str) -> list[tuple[str, float, int]]:
  """(name, fraction of exact zeros, size) per matrix, one row per layer of a scanned stack."""
  rows = []
  for path, var in _flat(params).items():
    if not prunable(_name(path), var, exclude):
      continue
    w = jnp.asarray(var[...])
    axis = _layers_axis(var)
    if axis is None:
      rows.append((_name(path), float(jnp.mean(w == 0)), w.size))
    else:
      for i, layer in enumerate(jnp.moveaxis(w, axis, 0)):
        rows.append((f"{_name(path)}[{i}]", float(jnp.mean(layer == 0)), layer.size))
  return rows
