"""Mixture-of-experts MLP: a router sends each token to its top-k experts (Mixtral/GShard style).

Two ways to run the experts, picked by `model.capacity_factor`:

- capacity (> 0): each expert takes at most C = ceil(factor * T * k / E) tokens of each sequence,
  first choices before second choices, earlier positions first; the rest are dropped (their MLP
  output is zero, the residual carries them). Dispatch and combine are einsums over one-hot tensors
  with static shapes. Where the layout splits the experts over mesh axes that also split the batch
  (fsdp_ep), each device dispatches its own rows and the slots travel to their experts' shard and
  back by two explicit all-to-alls inside `shard_map` (`MoE._exchanged`); left to GSPMD, the
  partitioner all-gathered the dispatched tokens instead. Any other layout (fsdp: the experts are
  gathered like FSDP weights, every token's experts run where it is) is plain GSPMD, the
  dispatched tokens [B, E, C, D] pinned to the layout.
- dropless (0): the B * T * k assignments are sorted by expert and the experts run as grouped
  matmuls (`jax.lax.ragged_dot`); nothing is dropped. Under a layout the sort runs per batch shard
  (`shard_map` over the batch's mesh axes; left to the partitioner, the global sort gathered every
  token to every device and each ran all N * k assignments). Where the experts split over axes
  that also split the batch (fsdp_ep), the shards of an expert group all-gather each other's tokens,
  each runs only its own experts' assignments and a reduce-scatter sums the outputs back
  (`_dropless_expert_parallel`: expert parallel, with an all-gather for the ragged all-to-all
  XLA:CPU lacks); under any other layout each device runs every expert, gathered to it like FSDP
  weights, on its own rows' assignments.

Router logits, probabilities and every statistic are float32. Each MoE layer returns sums over
its real (segment id > 0) tokens (`SUMS`: additive, so a pipeline adds them up over microbatches
and gets the whole batch's), from which `mean_stats` makes three scalars per layer, averaged over
MoE layers:
- `lb_loss`: E * sum_e f_e * P_e (Switch Transformer), f_e the share of token-to-expert
  assignments that expert e received (sums to 1), P_e its mean router probability; 1.0 when
  balanced, E when every token picks the same experts.
- `z_loss`: mean of logsumexp(router logits)^2 (ST-MoE), keeps router logits small.
- `dropped_fraction`: the share of assignments that did not fit in their expert's capacity.
Padding tokens (segment id 0) are routed nowhere: they take no capacity and get a zero output.

Shapes: B batch, T length, D d_model, F mlp_dim, E experts, k experts per token, C capacity,
N = B * T tokens.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

from spjax.model.config import ACTIVATIONS, ModelConfig, projection_name

STATS = ("lb_loss", "z_loss", "dropped_fraction")
# What a layer returns: sums over real tokens ([E] for the per-expert ones), added across
# microbatches as they are: tokens n, assignments per expert, router probability per expert, the
# squared router logsumexp, and the assignments that found a slot.
SUMS = ("tokens", "assigned", "prob", "z_squared", "kept")


def capacity(cfg: ModelConfig, seq_len: int) -> int:
  """Slots per expert per sequence on the capacity path (<= T: a token visits an expert once)."""
  c = math.ceil(cfg.capacity_factor * seq_len * cfg.experts_per_token / cfg.num_experts)
  return max(1, min(seq_len, c))


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
  return cfg.num_experts > 0 and (layer + 1) % cfg.moe_every == 0


def _entry(axes):
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _active_table() -> dict | None:
  """The active layout as {logical axis: tuple of mesh axes}; None without rules and mesh (a
  model called outside spjax.parallel.sharding's context), where everything here is local."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return None
  return {k: () if v is None else (v,) if isinstance(v, str) else tuple(v) for k, v in rules}


def _exchange_axes():
  """(batch mesh axes, expert mesh axes) when the active layout splits the experts over axes that
  also split the batch, so each path can exchange tokens between expert shards; else None."""
  table = _active_table()
  if table is None:
    return None
  experts, batch = table.get("expert", ()), table.get("batch", ())
  mesh = jax.sharding.get_abstract_mesh()
  if math.prod(mesh.shape[a] for a in experts) == 1 or not set(experts) <= set(batch):
    return None
  return batch, experts


def constrain_dispatched(x, last: str):
  """Pins dispatched tokens [B, E, C, D | F] to the active layout: E where the experts' weights
  live, B over the batch's mesh axes minus those (inside the block `expert` stops splitting the
  batch), the last dim as logical axis `last`. A no-op without rules and mesh, like `constrain`."""
  table = _active_table()
  if table is None:
    return x
  experts = table.get("expert", ())
  batch = tuple(a for a in table.get("batch", ()) if a not in experts)
  rest = tuple(a for a in table.get(last, ()) if a not in experts + batch)
  spec = PartitionSpec(_entry(batch), _entry(experts), None, _entry(rest))
  return jax.lax.with_sharding_constraint(x, spec)


class MoE(nnx.Module):
  """Top-k routed experts, each an MLP like spjax.model.layers.MLP (gated or not, no biases)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    from spjax.model.layers import param  # layers imports this module
    self.cfg = cfg
    e, d, f = cfg.num_experts, cfg.d_model, cfg.mlp_dim
    self.router = param(rngs, (d, e), ("embed", None), cfg, 0.02)
    if cfg.gated_mlp:
      self.gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg, 0.02)
    self.up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg, 0.02)
    self.down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), cfg,
                      0.02 / math.sqrt(2 * cfg.num_layers))

  def route(self, x, valid):
    """x [B, T, D], valid [B, T] bool -> (weights [B, T, k] f32, experts [B, T, k] int, sums)."""
    cfg = self.cfg
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))  # [B, T, E]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)  # [B, T, k]
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)  # renormalised (Mixtral)
    v = valid.astype(jnp.float32)
    weights = weights * v[..., None]
    chosen = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts), axis=2) * v[..., None]  # [B, T, E]
    sums = {"tokens": jnp.sum(v), "assigned": jnp.sum(chosen, axis=(0, 1)),  # [E]
            "prob": jnp.sum(probs * v[..., None], axis=(0, 1)),  # [E]
            "z_squared": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * v)}
    return weights, experts, sums

  def __call__(self, x, segment_ids):
    """x [B, T, D], segment_ids [B, T] -> (y [B, T, D], {sum: float32 [] or [E]} as in SUMS)."""
    valid = segment_ids > 0
    weights, experts, sums = self.route(x, valid)
    if self.cfg.capacity_factor > 0:
      y, kept = self._capacity(x, valid, weights, experts)
    else:  # every assignment of a real token runs
      y, kept = self._dropless(x, weights, experts), sums["tokens"] * self.cfg.experts_per_token
    return y.astype(x.dtype), {**sums, "kept": kept}

  def _capacity(self, x, valid, weights, experts):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    b, t, _ = x.shape
    k, c = cfg.experts_per_token, capacity(cfg, t)
    onehot = jax.nn.one_hot(experts, cfg.num_experts, dtype=jnp.int32)  # [B, T, k, E]
    onehot = onehot * valid[:, :, None, None]
    # Priority: every token's first choice before any second choice, then position in the row.
    order = onehot.transpose(0, 2, 1, 3).reshape(b, k * t, -1)  # [B, k*T, E]
    slot = jnp.sum((jnp.cumsum(order, axis=1) - 1) * order, axis=-1)  # [B, k*T]
    slot = slot.reshape(b, k, t).transpose(0, 2, 1)  # [B, T, k]: its place in its expert's queue
    kept = (slot < c) & valid[..., None]  # [B, T, k]
    in_slot = jax.nn.one_hot(jnp.where(kept, slot, c), c, dtype=jnp.float32)  # [B, T, k, C]
    dispatch = jnp.einsum("btke,btkc->btec", onehot.astype(jnp.float32), in_slot)  # [B, T, E, C]
    combine = jnp.einsum("btke,btkc,btk->btec", onehot.astype(jnp.float32), in_slot, weights)
    dispatch, combine = dispatch.astype(dt), combine.astype(dt)
    axes = _exchange_axes()
    if axes:
      y = self._exchanged(x, dispatch, combine, *axes)
    else:
      routed = jnp.einsum("btec,btd->becd", dispatch, x)  # [B, E, C, D]
      out = _expert_mlps(cfg, constrain_dispatched(routed, "act_embed"), self._weights(),
                         constrain_dispatched)
      y = jnp.einsum("becd,btec->btd", constrain_dispatched(out, "act_embed"), combine)  # [B, T, D]
    return y, jnp.sum(kept.astype(jnp.float32))

  def _weights(self) -> dict:  # {kernel name: [E, D, F] / [E, F, D] in the compute dtype}
    return {n: getattr(self, n)[...].astype(self.cfg.dtype) for n in _kernels(self.cfg)}

  def _exchanged(self, x, dispatch, combine, batch, experts):
    """The capacity path's experts with the tokens exchanged by explicit all-to-alls (GShard).

    Each device dispatches its own rows into [b, E, C, D] slots, sends expert shard j the slots of
    the experts j holds and receives its peers' slots for its own (an all-to-all over the expert
    axes: [ep * b, E / ep, C, D]), runs its experts, and sends the outputs back the same way. The
    experts' weights enter whole but for the expert split (gathered like FSDP weights); the
    partitioner, left to itself, all-gathered the dispatched tokens instead (BENCHMARKS.md).
    """
    cfg, w = self.cfg, self._weights()
    def local(x, dispatch, combine, *kernels):  # x [b, T, D]; dispatch, combine [b, T, E, C]
      exchange = functools.partial(jax.lax.all_to_all, axis_name=experts, tiled=True)
      routed = jnp.einsum("btec,btd->becd", dispatch, x)  # [b, E, C, D]
      routed = exchange(routed, split_axis=1, concat_axis=0)  # [ep * b, E / ep, C, D]
      out = _expert_mlps(cfg, routed, dict(zip(w, kernels)), lambda a, _: a)
      out = exchange(out, split_axis=0, concat_axis=1)  # [b, E, C, D]
      return jnp.einsum("becd,btec->btd", out, combine)  # [b, T, D]
    rows, split = PartitionSpec(_entry(batch)), PartitionSpec(_entry(experts))
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(rows,) * 3 + (split,) * len(w), out_specs=rows)(
                             x, dispatch, combine, *w.values())

  def _dropless(self, x, weights, experts):
    cfg = self.cfg
    w = tuple(self._weights().values())  # [E, D, F] / [E, F, D]
    # every expert, on the rows it is given
    local = lambda x, weights, experts, *w: _grouped(cfg, x, weights, experts, cfg.num_experts, w)
    table = _active_table()
    if table is None:
      return local(x, weights, experts, *w)
    rows = PartitionSpec(_entry(table.get("batch")))  # [B, ...] over the batch axes
    split = PartitionSpec()  # each device runs every expert, gathered to it whole, on its own rows
    if axes := _exchange_axes():  # each shard runs its own experts on the group's assignments
      local = functools.partial(_dropless_expert_parallel, cfg, axes[1])
      split = PartitionSpec(_entry(axes[1]))
    # check_vma=False: inside the pipeline's stage vmap (spmd_axis_name="stage") jax 0.12.1 marks
    # the sorted keys as varying over `stage` but argsort's own iota not, and refuses the sort.
    # Unchecked, the transpose sums a replicated input's cotangent over the axes its spec leaves
    # out, the same gradients (tests/test_moe.py, tests/test_pipeline.py).
    return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(),
                         in_specs=(rows,) * 3 + (split,) * len(w),
                         out_specs=rows, check_vma=False)(x, weights, experts, *w)


def _expert_mlps(cfg: ModelConfig, h, w: dict, pin):
  """h [b, E, C, D] -> [b, E, C, D]: expert e's MLP (kernels w[name] [E, ...]) on h[:, e]; `pin`
  constrains the hidden [b, E, C, F] (identity inside shard_map)."""
  def proj(name):  # named as the dense MLP's, for the remat policies
    y = jnp.einsum("becd,edf->becf", h, w[name])
    return jax.ad_checkpoint.checkpoint_name(y, projection_name(name))
  a = ACTIVATIONS[cfg.mlp_activation](proj("gate" if cfg.gated_mlp else "up"))
  if cfg.gated_mlp:
    a = a * proj("up")
  y = jnp.einsum("becf,efd->becd", pin(a, "act_mlp"), w["down"])
  return jax.ad_checkpoint.checkpoint_name(y, projection_name("down"))


def _kernels(cfg: ModelConfig) -> tuple:
  """The experts' kernels in the order the dropless path passes them: (gate,) up, down."""
  return ("gate", "up", "down") if cfg.gated_mlp else ("up", "down")


def _grouped(cfg: ModelConfig, x, weights, groups, num_groups: int, w):
  """x [b, T, D], weights/groups [b, T, k], w the (gate,) up, down kernels of `num_groups` experts
  -> y [b, T, D]: each token's assignments to group g < num_groups run through expert g as one
  grouped matmul; an assignment whose group is num_groups or more runs nowhere (zero output)."""
  b, t, d = x.shape
  k = cfg.experts_per_token
  flat = groups.reshape(-1)  # [n*k]: assignment i is token i // k's (i % k)-th choice
  order = jnp.argsort(flat, stable=True)  # grouped by expert, the ones that run nowhere last
  sizes = jnp.bincount(flat, length=num_groups).astype(jnp.int32)  # [G]; larger ids not counted
  tokens = x.reshape(b * t, d)[order // k]  # [n*k, D], sorted by expert
  def proj(h, i):  # w[i], named as the dense MLP's kernel, for the remat policies
    # rows past sum(sizes) belong to no group: ragged_dot leaves them zero
    return jax.ad_checkpoint.checkpoint_name(jax.lax.ragged_dot(h, w[i], sizes),
                                             projection_name(_kernels(cfg)[i]))
  a = ACTIVATIONS[cfg.mlp_activation](proj(tokens, 0))
  if cfg.gated_mlp:
    a = a * proj(tokens, 1)  # [n*k, F]
  out = proj(a, -1)  # [n*k, D], sorted
  out = jnp.zeros_like(out).at[order].set(out).reshape(b, t, k, d)  # back to token order
  return jnp.einsum("btkd,btk->btd", out, weights.astype(x.dtype))


def _dropless_expert_parallel(cfg: ModelConfig, axes, x, weights, experts, *w):
  """Dropless experts split over mesh `axes` that also split the batch (inside shard_map):
  x [b, T, D], weights/experts [b, T, k]; w the kernels of this shard's E / ep experts.

  The ep shards of an expert group gather each other's tokens and routing (an all-gather over
  `axes`: [ep * b, T, ...]), each runs its own experts on the assignments routed to them, and the
  partial outputs are summed back onto their rows' shard (a reduce-scatter). Every assignment runs
  once, on its expert's shard, and nothing is dropped; the exchange is an all-gather rather than a
  ragged all-to-all, which XLA:CPU does not implement (jax 0.10).
  """
  gather = functools.partial(jax.lax.all_gather, axis_name=axes, axis=0, tiled=True)
  x_all, weights_all, experts_all = gather(x), gather(weights), gather(experts)
  mine = w[0].shape[0]  # E / ep
  first = jax.lax.axis_index(axes) * mine
  local = jnp.where((experts_all >= first) & (experts_all < first + mine), experts_all - first,
                    mine)  # [ep * b, T, k]: another shard's expert -> group `mine`, run nowhere
  y = _grouped(cfg, x_all, weights_all, local, mine, w)  # [ep * b, T, D], this shard's part
  return jax.lax.psum_scatter(y, axes, scatter_dimension=0, tiled=True)  # [b, T, D]


def layer_stats(cfg: ModelConfig, sums: dict) -> dict:
  """{sum: [..., (E)]} of one or more layers (leading dims) -> {stat: [...]}, as the module says."""
  n = jnp.maximum(sums["tokens"], 1.0)
  share = sums["assigned"] / (n * cfg.experts_per_token)[..., None]  # [..., E], sums to 1
  mean_prob = sums["prob"] / n[..., None]
  return {"lb_loss": cfg.num_experts * jnp.sum(share * mean_prob, axis=-1),
          "z_loss": sums["z_squared"] / n,
          "dropped_fraction": 1.0 - sums["kept"] / (n * cfg.experts_per_token)}


def mean_stats(cfg: ModelConfig, per_layer: list) -> dict:
  """The MoE layers' sums ({sum: [(L,) ...]} each; {} for dense layers) -> {stat: []}: each
  layer's stats, averaged over the MoE layers; {} for a dense model."""
  stats = [layer_stats(cfg, s) for s in per_layer if s]
  if not stats:
    return {}
  return {k: jnp.mean(jnp.concatenate([jnp.atleast_1d(s[k]) for s in stats])) for k in STATS}


class Aux(nnx.Intermediate):
  """The last forward pass's MoE stats, left on the model for the train step (see `add_aux`)."""


def objective_terms(model) -> tuple:
  """(weighted aux loss [] to add to the per-token-mean objective, {"moe_<stat>": []} to log) of
  the model's last forward pass; (None, {}) for a dense model."""
  aux = getattr(model, "moe_aux", None)
  if aux is None:
    return None, {}
  stats, cfg = aux.get_value(), model.cfg
  loss = cfg.moe_lb_loss_weight * stats["lb_loss"] + cfg.moe_z_loss_weight * stats["z_loss"]
  return loss, {f"moe_{k}": v for k, v in stats.items()}


def add_aux(model, objective, count, scale) -> tuple:
  """(`objective` plus the aux losses of the model's last forward pass, {"moe_<stat>": value}).

  The losses and stats are means over that (micro)batch of `count` tokens; both are weighted by its
  share of the whole batch's tokens (count x scale, scale = 1 / batch tokens), so summing
  microbatches gives token-weighted means. A dense model: (objective, {}).
  """
  loss, stats = objective_terms(model)
  if loss is None:
    return objective, {}
  share = count * scale
  return objective + loss * share, {name: value * share for name, value in stats.items()}


def check_layout(cfg: ModelConfig, layout, mesh) -> None:
  """Raises ValueError, naming the field, when the experts cannot split as the layout says."""
  if cfg.num_experts == 0:
    return
  axes = layout.axes_for("expert")
  parts = math.prod(mesh.shape[a] for a in axes)
  if cfg.num_experts % parts:
    sizes = " x ".join(f"mesh.ici/dcn.{a}={mesh.shape[a]}" for a in axes)
    raise ValueError(f"model.num_experts ({cfg.num_experts}) must be divisible by the {parts} "
                     f"expert shards of layout {layout.source!r} ({sizes}); change "
                     "model.num_experts or the expert mesh size")
