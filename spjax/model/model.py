"""Decoder-only Transformer LM in Flax NNX: Llama-style by default (RMSNorm, RoPE, GQA, SwiGLU).

A few switches cover the GPT-NeoX family too (LayerNorm with bias, GeLU MLP, parallel residual, partial
rotary, biases), so Hugging Face checkpoints of either family load into this one model.

Every parameter and activation dimension carries a logical axis name (spjax/parallel/sharding.py lists the
vocabulary); the model never names a mesh axis. A layout decides where each tensor lives.

Hyper-parameters and sizes are in spjax/model/config.py, the block in spjax/model/layers.py.

Shapes in comments: B batch, T length, S cache slots, D d_model, H heads, K kv_heads, G = H // K,
Dh head_dim, R rotary dims, F mlp_dim, V vocab, L layers.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.model.config import REMAT_POLICIES, SIZES, ModelConfig  # noqa: F401  (re-exported)
from spjax.model import moe as moe_lib
from spjax.model.layers import K_CACHE_AXES, V_CACHE_AXES, Block, Norm, param
from spjax.parallel.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for S slots per row, written left to right by `extend`.

  All rows share the slot index, so a batch of prompts of different lengths is left-padded; padding
  slots carry segment id 0 and are never attended to by real tokens. One array per layer (not one
  stacked array) so that a decode loop updates each in place and reads it without a copy.
  """
  k: tuple[jax.Array, ...]  # per layer [B, K, S, Dh], logical axes K_CACHE_AXES
  v: tuple[jax.Array, ...]  # per layer [B, K, Dh, S], logical axes V_CACHE_AXES
  segment_ids: jax.Array  # [B, S] int32: 0 = padding or not written yet
  index: jax.Array  # [] int32: the next slot to write

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, slots: int) -> "KVCache":
    k, v, n = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    keys = constrain(jnp.zeros((batch, k, slots, v), cfg.dtype), K_CACHE_AXES)
    values = constrain(jnp.zeros((batch, k, v, slots), cfg.dtype), V_CACHE_AXES)
    return cls((keys,) * n, (values,) * n,
               constrain(jnp.zeros((batch, slots), jnp.int32), ("batch", "length")),
               jnp.zeros((), jnp.int32))

_LAYERS = {nnx.PARTITION_NAME: "layers"}  # stacked params gain a leading "layers" logical axis


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg, 0.02)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS)
      def make_stack(rngs):
        return Block(cfg, rngs, moe=cfg.num_experts > 0)  # validate(): all or none with scan
      self.blocks = make_stack(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs, moe=moe_lib.is_moe_layer(cfg, i))
                              for i in range(cfg.num_layers)])
    self.final_norm = Norm(cfg)
    if not cfg.tie_embeddings:
      self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, 0.02)

  def __call__(self, tokens, positions=None, segment_ids=None, *, dropout_key=None):
    """tokens [B, T] int -> logits [B, T, V] float32.

    positions/segment_ids [B, T] come from packing (segment 0 is padding); by default one document
    per row. `dropout_key=None` means eval (no dropout).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x, _ = self._run(tokens, positions, segment_ids, dropout_key, None)
    return self._logits(x, ("batch", "length", "act_vocab"))

  def extend(self, tokens, positions, segment_ids, cache: KVCache):
    """Runs tokens [B, T] at cache slots index..index+T (eval mode): (logits [B, V], cache).

    The logits are the last token's, equal to a full forward pass over everything written so far,
    at a cost that grows with T rather than the whole sequence: prefill a prompt with it, then
    decode one token at a time.
    """
    segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                            (0, cache.index))  # [B, S]
    x, (k, v) = self._run(tokens, positions, segment_ids, None, (cache, segments))
    logits = self._logits(x[:, -1], ("batch", "act_vocab"))  # [B, V]: the vocab matmul, once
    return logits, KVCache(k, v, segments, cache.index + tokens.shape[1])

  def _logits(self, x, names):  # [..., D] -> [..., V] float32
    table = self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]  # [D, V]
    return constrain(x @ table.astype(self.cfg.dtype), names).astype(jnp.float32)

  def _run(self, tokens, positions, segment_ids, dropout_key, cached):
    """-> (final hidden states [B, T, D], with `cached` the per-layer caches (k, v) updated).

    A forward pass without a cache leaves the MoE layers' mean stats on the model as `moe_aux`
    (spjax.model.moe.objective reads them), whichever method ran it.
    """
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)  # [B, T, D]
    x = constrain(x, ("batch", "length", "act_embed"))

    policy = REMAT_POLICIES[cfg.remat_policy]
    def layer(block, x, key, layer_kv):  # layer_kv: this layer's cache (k, v), or None
      cache = None if layer_kv is None else (*layer_kv, cached[1], cached[0].index)
      return block(x, positions, segment_ids, key, cache)
    if cfg.remat_policy != "none":
      layer = nnx.remat(layer, policy=policy)

    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
    if cfg.scan_layers:
      # Scanning needs the caches stacked along a leading L axis: a copy each call, so decoding
      # loops use `unrolled(model)` instead.
      stacked = None if cached is None else (jnp.stack(cached[0].k), jnp.stack(cached[0].v))
      @nnx.scan(in_axes=(nnx.Carry, 0, 0 if keys is not None else None,
                         0 if cached is not None else None),
                out_axes=(nnx.Carry, 0), transform_metadata=_LAYERS)
      def run_stack(x, block, key, layer_kv):
        x, kv, stats = layer(block, x, key, layer_kv)
        return x, (kv, stats)
      x, (new_kv, stats) = run_stack(x, self.blocks, keys, stacked)  # stats: {name: [L]}
      per_layer_stats = [stats]
      if cached is not None:
        new_kv = tuple(tuple(jnp.unstack(a)) for a in new_kv)
    else:
      per_layer, per_layer_stats = [], []
      for i, block in enumerate(self.blocks):
        layer_kv = None if cached is None else (cached[0].k[i], cached[0].v[i])
        x, kv, stats = layer(block, x, None if keys is None else keys[i], layer_kv)
        per_layer.append(kv)
        per_layer_stats.append(stats)
      new_kv = None if cached is None else tuple(zip(*per_layer))  # ((k per layer), (v per layer))
    if cfg.num_experts and cached is None:
      self.moe_aux = moe_lib.Aux(moe_lib.mean_stats(per_layer_stats))
    return self.final_norm(x), new_kv


def unrolled(model: Transformer) -> Transformer:
  """The same model with one Block per layer (scan_layers=False); a copy of the layer weights.

  Decoding runs on this. Each decode step is small, so how the weights are read decides its speed,
  and a scanned stack makes XLA:CPU copy every layer's weights out of the stack on every step (a
  dynamic slice it does not fuse into the matmul): about half the speed, measured on 125m.
  """
  if not model.cfg.scan_layers:
    return model
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
  stacked = dict(nnx.to_flat_state(nnx.state(model)))
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    if path[0] == "blocks":  # ("blocks", i, ...) is layer i of ("blocks", ...)
      value = stacked[("blocks",) + tuple(path[2:])][...][path[1]]
    else:
      value = stacked[path][...]
    flat.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def activation_shapes(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
  """{name: (shape, logical axes)} of the activations the model pins with `constrain`.

  Lets a layout be validated against a batch before anything is traced. A KV cache of S slots is
  laid out as the attention keys/values with seq_len S.
  """
  b, t = batch, seq_len
  return {
      "batch (tokens)": ((b, t), ("batch", "length")),
      "residual stream": ((b, t, cfg.d_model), ("batch", "length", "act_embed")),
      "attention queries": ((b, t, cfg.num_heads, cfg.head_dim),
                            ("batch", "length", "act_heads", "head_dim")),
      "attention keys/values": ((b, t, cfg.num_kv_heads, cfg.head_dim),
                                ("batch", "length", "act_kv_heads", "head_dim")),
      "mlp hidden": ((b, t, cfg.mlp_dim), ("batch", "length", "act_mlp")),
      "logits": ((b, t, cfg.vocab_size), ("batch", "length", "act_vocab")),
  }
