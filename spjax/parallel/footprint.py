"""Bytes per device of a Program's parameters, optimizer state and batch, read from its shardings.

Shapes only: nothing is allocated, so this works for any model size on any (simulated or
compile-only) mesh, and equals the size of the shard each device holds once the state exists.
"""

import dataclasses
import math

import jax
from flax import nnx

from spjax.parallel import sharding


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  """Bytes of the shard one device holds of an array with a NamedSharding."""
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ParamRow:
  name: str  # "blocks/attn/q"
  shape: tuple
  logical: tuple  # logical axis names, one per dimension
  spec: tuple  # mesh axes per dimension (PartitionSpec entries)
  bytes_per_device: int


def parameter_rows(prog) -> list[ParamRow]:
  """One row per parameter, in the State's order."""
  names = sharding.logical_names_of(prog.abstract_params)
  params = prog.abstract_state()["params"]
  rows = []
  for path, var in nnx.to_flat_state(params):
    name = "/".join(map(str, path))
    x = var.get_value()
    rows.append(ParamRow(name, tuple(x.shape), names[name][1], tuple(x.sharding.spec),
                         shard_bytes(x)))
  return rows


def state_bytes(prog) -> dict:
  """{"params", "opt_state", "batch"}: bytes per device of each part of the step's input."""
  state = prog.abstract_state()
  total = lambda tree: sum(shard_bytes(x) for x in jax.tree.leaves(tree))
  return {"params": total(state["params"]), "opt_state": total(state["opt_state"]),
          "batch": total(prog.abstract_batch())}


def _shards(prog, logical: str) -> int:
  """Devices one dimension with this logical name splits over (1 if replicated)."""
  return math.prod(prog.mesh.shape[a] for a in dict(prog.layout.rules).get(logical, ()))


def activation_bytes(prog) -> dict:
  """A shape-only estimate of the step's activation memory per device, by part.

  What the remat policy keeps per layer for the backward pass (compute dtype), one layer's
  recompute working set, and the loss's logits (the compute-dtype product and its gradient: the
  float32 softmax is fused, spjax/train/loss.py; all positions at once unless
  config.loss_chunk_size splits them). An estimate for skipping
  what cannot fit, not what the compiler will allocate (it fuses, reorders and pads).
  """
  cfg, c = prog.model_cfg, prog.config
  e = 4 if cfg.dtype == "float32" else 2
  rows = c.per_device_batch_size * prog.mesh.size // _shards(prog, "batch")
  tokens = rows * c.seq_len // _shards(prog, "length")
  d = cfg.d_model // _shards(prog, "act_embed")
  q = cfg.num_heads * cfg.head_dim // _shards(prog, "act_heads")
  kv = cfg.num_kv_heads * cfg.head_dim // _shards(prog, "act_kv_heads")
  f = cfg.mlp_dim // _shards(prog, "act_mlp")
  v = cfg.vocab_size // _shards(prog, "act_vocab")
  # An MoE layer's MLP runs once per assignment: k per token, times the capacity slack if any.
  if cfg.num_experts:
    f = int(f * cfg.experts_per_token * (cfg.capacity_factor or 1.0))
  matmul_outputs = tokens * (q + 2 * kv + d + 2 * f + d) * e  # q, k, v, out, gate, up, down
  projections = tokens * (q + 2 * kv + 2 * f) * e  # q, k, v, gate, up
  out = tokens * d * e  # o's output, which save_dots_no_batch leaves out
  attention = tokens * q * e + tokens * q // cfg.head_dim * 4  # splash output and log-sum-exp
  scores = rows * (cfg.num_heads // _shards(prog, "act_heads")) * c.seq_len ** 2 * e
  elementwise = tokens * (2 * d + 2 * f) * e  # norms, activation, gated product
  per_layer = {
      "full": tokens * d * e,  # the layer's input only
      "save_dots_no_batch": tokens * d * e + projections + attention,
      "save_projections": tokens * d * e + projections + out,
      "save_projections_attention": tokens * d * e + projections + out + attention,
      "save_dots": tokens * d * e + matmul_outputs + attention +
                   (scores if cfg.attention == "xla" else 0),
      "none": tokens * d * e + matmul_outputs + attention + elementwise +
              (2 * scores if cfg.attention == "xla" else 0),
  }[cfg.remat_policy]
  # One layer forward and backward at a time: its outputs, their gradients, float32 MLP grads.
  working = matmul_outputs + elementwise + 2 * tokens * f * 4
  positions = c.loss_chunk_size or c.seq_len
  logits = tokens * positions // c.seq_len * v * 2 * e  # the product and its gradient (loss.py)
  return {"saved_layers": cfg.num_layers * per_layer, "layer_working_set": working,
          "logits": logits}


def step_bytes(prog) -> dict:
  """Everything one device holds during a train step (estimate): state, gradients (and their
  accumulator under grad_accum_steps), activations, and the bf16 weights of the layer FSDP has
  gathered."""
  parts = state_bytes(prog)
  parts["gradients"] = parts["params"] * (2 if prog.config.grad_accum_steps > 1 else 1)
  cfg = prog.model_cfg
  layer = cfg.num_params() // cfg.num_layers if cfg.num_layers else 0
  parts["gathered_layer"] = 2 * layer * 2 // _shards(prog, "mlp")  # this layer's and the next's
  parts.update(activation_bytes(prog))
  parts["total"] = sum(parts.values())
  return parts
