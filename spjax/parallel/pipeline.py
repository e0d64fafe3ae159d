"""Pipeline parallelism: the scanned layer stack run as stages over the `stage` mesh axis.

A layout that maps `layers` to `stage` (presets pp, fsdp_pp) turns on this transform. It is SPMD:
one program on every device, no per-stage code. The stack of every parameter, canonical [L, ...]
in the state and in checkpoints, is viewed inside the step as [S, R, L/(S*R), ...] (stages,
circular repeats, layers per stage), its stage dimension sharded over `stage`; stage s runs layers
r*S*lps + s*lps + [0, lps) in its r-th repeat. Each iteration of a `lax.scan` runs every stage once,
the stage body `vmap`ped over the stage dimension (spmd_axis_name="stage"), and then rotates the
activations one stage on with `jnp.roll` along the stage-sharded dimension: a collective-permute.

Schedule (circular, praxis-style groups): microbatches go in groups of S; the group's S microbatches
enter stage 0 on S consecutive iterations, leave the last stage S - 1 iterations later and go
straight round to stage 0 for the next repeat, R times; the next group follows at once. The
pipeline is never drained between groups, so a step is M * R + S - 1 iterations of which S - 1
fill and drain the pipeline: bubble (S - 1) / (M * R + S - 1).

Outside the stack `stage` acts as a batch axis (the layout's batch rule starts with it): stage
device s holds its own rows, which are exactly the microbatches s, s + S, s + 2S, ... So the
batch is cut into microbatches without moving a row: inputs wait on their own stage device and
move one stage per iteration towards stage 0 (a conveyor, again a roll), and outputs travel the
same way back. Inside the stack the rules lose `stage` (`Schedule.inner_rules`): there it is the
stage dimension, and a microbatch's rows split over the batch's other axes only.

Mixture-of-experts layers run inside the stages like any other: each layer's routing sums (tokens,
assignments and router probability per expert, ...; spjax/model/moe.py) are added up over the
microbatches that pass through it, bubble iterations masked out, so the load-balance loss is the
whole batch's, as without a pipeline.

Costs seen in the compiled step (tools/layout_report.py): with repeats > 1 a stage's layers are
strided in the canonical stack, so every step regroups the stack (the partitioner gathers it);
with `data` > 1 the partitioner all-reduces each stage's weight gradients on every iteration
rather than once per step.
"""

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from spjax.parallel import sharding

AXIS = "stage"


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: int  # S: the `stage` mesh axis size
  microbatches: int  # M: a multiple of S
  repeats: int  # R: circular repeats
  layers_per_stage: int  # L / (S * R), run by a stage each time a microbatch passes
  batch_split: int  # devices one microbatch's rows split over (the batch's axes other than stage)
  inner_rules: tuple  # flax logical rules inside the stack: the layout's, without `stage`

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble(self) -> float:
    """Fraction of stage-iterations that are idle: fill and drain of the pipeline."""
    return (self.stages - 1) / self.iterations

  def stage_layers(self, stage: int) -> list[int]:
    """The canonical layer indices stage `stage` holds, in the order it runs them."""
    s, lps = self.stages, self.layers_per_stage
    return [r * s * lps + stage * lps + j for r in range(self.repeats) for j in range(lps)]

  def describe(self) -> str:
    return (f"pipeline: {self.stages} stages x {self.repeats} repeats, {self.layers_per_stage} "
            f"layers per stage, {self.microbatches} microbatches; bubble {self.stages - 1}/"
            f"{self.iterations} iterations = {100 * self.bubble:.1f}%")


def schedule(config, model_cfg, layout: sharding.Layout, mesh) -> Schedule | None:
  """The run's pipeline schedule, or None when the layout does not map `layers` to `stage`.

  Raises ValueError naming the field when the run cannot be pipelined; shapes only, before any
  tracing.
  """
  if AXIS not in layout.axes_for("layers"):
    return None
  src = layout.source
  if layout.axes_for("layers") != (AXIS,):
    raise ValueError(f"layout {src!r} maps 'layers' to {layout.axes_for('layers')}; a pipeline "
                     f"maps it to {AXIS!r} alone")
  for logical, axes in layout.rules:
    if AXIS in axes and logical not in ("layers", "batch"):
      raise ValueError(f"layout {src!r} maps {logical!r} to {AXIS!r}; inside the pipeline {AXIS!r} "
                       "holds the stages, so only 'layers' and 'batch' may use it")
  batch_axes = layout.axes_for("batch")
  if batch_axes[:1] != (AXIS,):
    raise ValueError(f"layout {src!r} maps 'layers' to {AXIS!r}, so outside the pipelined stack "
                     f"{AXIS!r} must act as a batch axis: the 'batch' rule must start with it (e.g. "
                     f"batch:stage,data,fsdp), got {batch_axes or '(replicated)'}")
  if not model_cfg.scan_layers:
    raise ValueError(f"layout {src!r} runs the layer stack as a pipeline over {AXIS!r}, which needs "
                     "model.scan_layers=True (a stacked [layers, ...] parameter per weight)")
  c = config.pipeline
  if c.repeats < 1:
    raise ValueError(f"config.pipeline.repeats must be >= 1, got {c.repeats}")
  if c.microbatches < 0:
    raise ValueError(f"config.pipeline.microbatches must be >= 0 (0 = one per stage), got "
                     f"{c.microbatches}")
  stages = mesh.shape[AXIS]
  layers = model_cfg.num_layers
  if layers % (stages * c.repeats):
    raise ValueError(f"model.num_layers ({layers}) is not divisible by the pipeline's stages x "
                     f"config.pipeline.repeats ({stages} x {c.repeats} = {stages * c.repeats}); "
                     "change model.num_layers, mesh stage size or config.pipeline.repeats")
  micro = c.microbatches or stages
  if micro % stages:
    raise ValueError(f"config.pipeline.microbatches ({micro}) must be a multiple of the pipeline's "
                     f"{stages} stages (mesh stage size)")
  rows = config.per_device_batch_size * mesh.size  # what the model sees per accumulation step
  if rows % micro:
    raise ValueError(f"the batch of {rows} rows (config.per_device_batch_size "
                     f"{config.per_device_batch_size} x {mesh.size} devices) is not divisible by "
                     f"config.pipeline.microbatches ({micro})")
  others = [a for a in batch_axes if a != AXIS]
  split = math.prod(mesh.shape[a] for a in others)
  if (rows // micro) % split:
    sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in others)
    raise ValueError(f"each of the config.pipeline.microbatches ({micro}) microbatches has "
                     f"{rows // micro} rows, which do not split over the batch's other mesh axes "
                     f"({sizes}); use fewer microbatches or a larger config.per_device_batch_size")
  inner = tuple((logical, tuple(a for a in axes if a != AXIS) or None)
                for logical, axes in layout.rules)
  return Schedule(stages, micro, c.repeats, layers // (stages * c.repeats), split, inner)


_ACTIVE = contextvars.ContextVar("spjax_pipeline", default=None)


@contextlib.contextmanager
def scope(sched: Schedule | None):
  """While tracing inside this, the model runs its scanned stack through `run` (None: as usual)."""
  token = _ACTIVE.set(sched)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def current() -> Schedule | None:
  return _ACTIVE.get()


def _pin(x, names):
  """Constrain x [S, ...]: the leading dimension over `stage`, the rest by the active rules."""
  spec = sharding.logical_spec(names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, PartitionSpec(AXIS, *spec))


def run(layer, blocks, x, extras, keys, *, remat: bool, policy=None):
  """The stacked layers `blocks` applied in order to x [B, T, D], as a pipeline (`current()`).

  layer(block, x [b, T, D], *extras [b, T], key) -> ([b, T, D], sums) runs one layer on b rows;
  extras (positions, segment ids) travel with their rows; keys: [L] dropout keys or None (each
  layer's key is folded with the microbatch index). `sums` is a pytree of per-layer sums over the
  rows (a MoE layer's routing sums; {} for dense layers), added up over the microbatches that pass
  through the layer: returns (x [B, T, D], sums with a leading [L] in canonical layer order). With
  `remat` each iteration's stage compute is rematerialised under `policy` (only its input is kept
  per iteration).
  """
  sched = current()
  s, m, r, lps, d = (sched.stages, sched.microbatches, sched.repeats, sched.layers_per_stage,
                     sched.batch_split)
  b = x.shape[0]
  mb = b // m
  graphdef, params = nnx.split(blocks)
  spmd = None if jax.sharding.get_abstract_mesh().empty else AXIS
  stage_ids = jnp.arange(s)

  def to_stages(a):  # [B, ...] -> [S, M/S, mb, ...]: microbatch g*S + j at [j, g], rows stay put
    a = a.reshape(s, d, m // s, mb // d, *a.shape[1:]).swapaxes(1, 2)
    return a.reshape(s, m // s, mb, *a.shape[4:])

  def from_stages(a):  # the inverse: [S, M/S, mb, ...] -> [B, ...]
    a = a.reshape(s, m // s, d, mb // d, *a.shape[3:]).swapaxes(1, 2)
    return a.reshape(b, *a.shape[4:])

  def stage(w, x, extras, key, rep, micro):  # one stage, one microbatch: x [mb, T, D]
    # [lps, ...]: this repeat's layers, picked by a select over the R slices (elementwise, so it
    # stays on each stage's own shard; the repeat differs from stage to stage).
    w = jax.tree.map(lambda a: sum(jnp.where(rep == i, a[i], 0) for i in range(r)) if r > 1
                     else a[0], w)
    key = None if key is None else jax.vmap(jax.random.fold_in, (0, None))(key[rep], micro)
    def one(x, wk):
      return layer(nnx.merge(graphdef, wk[0]), x, *extras, wk[1])
    return jax.lax.scan(one, x, (w, key))  # (x, sums [lps, ...])
  compute = jax.vmap(stage, spmd_axis_name=spmd)  # every stage at once, stage dim over `stage`
  if remat:
    compute = jax.checkpoint(compute, policy=policy, prevent_cse=False)

  def where_stage(mask, a, b):  # per stage: a where mask [S] else b
    return jnp.where(mask.reshape(-1, *[1] * (a.ndim - 1)), a, b)

  def at(buf, g):  # [S, M/S, ...] -> [S, ...]: each stage's slot g (a local slice)
    return jax.lax.dynamic_index_in_dim(buf, g, axis=1, keepdims=False)

  def put(buf, g, col):
    return jax.lax.dynamic_update_index_in_dim(buf, col, g, axis=1)

  with nnx.logical_axis_rules(sched.inner_rules):
    act, tok = ("batch", "length", "act_embed"), ("batch", "length")
    # [S, R, lps, ...] from canonical [L, ...]: layer r*S*lps + j*lps + i at [j, r, i]
    def by_stage(v):  # the parameter's own logical names place its other dimensions
      names = (None, None) + tuple(v.get_metadata()["out_sharding"][1:])
      return v.replace(_pin(v[...].reshape(r, s, lps, *v.shape[1:]).swapaxes(0, 1), names))
    stack = jax.tree.map(by_stage, params, is_leaf=lambda v: isinstance(v, nnx.Variable))
    stack_keys = None if keys is None else keys.reshape(r, s, lps).swapaxes(0, 1)
    io_in = (_pin(to_stages(x), (None,) + act),
             *(_pin(to_stages(e), (None,) + tok) for e in extras))  # [S, M/S, mb, ...]
    io_out = jnp.zeros_like(io_in[0])
    state = jax.tree.map(lambda a: jnp.zeros_like(a[:, 0]), io_in)  # [S, mb, ...]: each stage's input
    # Per stage, repeat and layer of the stage: the sums of the microbatches it ran [S, R, lps, ...]
    shapes = jax.eval_shape(compute, stack, state[0], state[1:], stack_keys, stage_ids,
                            stage_ids)[1]  # {} for dense layers
    totals = jax.tree.map(lambda a: _pin(jnp.zeros((s, r, *a.shape[1:]), a.dtype), ()), shapes)

    def iteration(carry, t):
      state, io_in, io_out, totals = carry
      t0 = t - stage_ids  # per stage: the iteration its microbatch entered stage 0
      u = jnp.mod(t0, s * r)  # position within the group of S microbatches x R repeats
      rep = jnp.clip(u // s, 0, r - 1)
      micro = jnp.clip(t0 // (s * r) * s + u % s, 0, m - 1)  # bubble iterations compute on stale data
      # Stage 0 takes a fresh microbatch in its group's first repeat; the conveyor brings them in.
      g_in = jnp.minimum(t // (s * r), m // s - 1)
      fresh = (t % (s * r) < s) & (t < m * r)
      col = tuple(at(a, g_in) for a in io_in)
      inputs = tuple(where_stage(fresh & (stage_ids == 0), c, a) for c, a in zip(col, state))
      io_in = tuple(put(a, g_in, jnp.where(fresh, jnp.roll(c, -1, axis=0), c))
                    for a, c in zip(io_in, col))
      out, sums = compute(stack, inputs[0], inputs[1:], stack_keys, rep, micro)  # [S, mb, T, D]
      ran = (t0 >= 0) & (t0 < m * r)  # [S]: a real microbatch, not the bubble's stale rows
      slot = ran[:, None] & (jnp.arange(r)[None] == rep[:, None])  # [S, R]
      totals = jax.tree.map(lambda tot, a: tot + jnp.where(
          slot.reshape(s, r, *[1] * (a.ndim - 1)), a[:, None], 0), totals, sums)
      # The last stage's microbatch: after its last repeat it joins the outputs' conveyor.
      t_last = t - (s - 1)
      done = (t_last >= 0) & (jnp.mod(t_last, s * r) >= (r - 1) * s)
      g_out = jnp.clip(t_last // (s * r), 0, m // s - 1)
      ocol = at(io_out, g_out)
      pushed = where_stage(stage_ids == s - 1, out, jnp.roll(ocol, -1, axis=0))
      io_out = put(io_out, g_out, jnp.where(done, pushed, ocol))
      state = (_pin(jnp.roll(out, 1, axis=0), act),  # stage j's output is stage j+1's input
               *(_pin(jnp.roll(e, 1, axis=0), tok) for e in inputs[1:]))
      return (state, io_in, io_out, totals), None

    (_, _, io_out, totals), _ = jax.lax.scan(iteration, (state, io_in, io_out, totals),
                                             jnp.arange(sched.iterations))
  # [S, R, lps, ...] -> [L, ...]: layer r*S*lps + j*lps + i from [j, r, i]
  totals = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(-1, *a.shape[3:]), totals)
  return sharding.constrain(from_stages(io_out), ("batch", "length", "act_embed")), totals
