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

from spjax.model import attention as attention_lib
from spjax.model import moe as moe_lib
from spjax.model.config import REMAT_POLICIES, SIZES, ModelConfig  # noqa: F401  (re-exported)
from spjax.model.layers import K_CACHE_AXES, V_CACHE_AXES, Block, Norm, neftune, param, product
from spjax.parallel import pipeline
from spjax.parallel.sharding import constrain, logical_spec, spec_axes


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

  def __call__(self, tokens, positions=None, segment_ids=None, *, dropout_key=None,
               neftune_alpha: float = 0.0):
    """tokens [B, T] int -> logits [B, T, V] float32.

    positions/segment_ids [B, T] come from packing (segment 0 is padding); by default one document
    per row. `dropout_key=None` means eval (no dropout, no NEFTune noise); `neftune_alpha` > 0
    adds NEFTune noise to the input embeddings in training (`layers.neftune`).
    """
    return self.logits(self.hidden(tokens, positions, segment_ids, dropout_key=dropout_key,
                                   neftune_alpha=neftune_alpha))

  def hidden(self, tokens, positions=None, segment_ids=None, *, dropout_key=None,
             neftune_alpha: float = 0.0):
    """tokens [B, T] int -> final hidden states [B, T, D] (after the final norm), compute dtype.

    `__call__` without the vocabulary matmul, for losses that unembed a slice at a time
    (spjax/train/loss.py).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    # Context-parallel splash balances causal work by reordering each row's chunks (attention.py):
    # once here, and back before the unembedding, so logits and targets stay in natural order.
    cp = attention_lib.context_shards() if self.cfg.attention == "splash" else 1
    if cp > 1:
      tokens, positions, segment_ids = (attention_lib.balance(a, cp)
                                        for a in (tokens, positions, segment_ids))
    x, _ = self._run(tokens, positions, segment_ids, dropout_key, None, neftune_alpha)
    if cp > 1:
      x = constrain(attention_lib.unbalance(x, cp), ("batch", "length", "act_embed"))
    return x

  def logits(self, x):  # final hidden states [B, T, D] -> logits [B, T, V] float32
    return self._logits(x, ("batch", "length", "act_vocab"))

  def unembedding(self):
    """The [D, V] table the logits are `x @ table` of, in the param dtype."""
    return self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]

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
    if self.cfg.tie_embeddings:
      return unembed(x, self.unembedding(), self.cfg.dtype, names)
    # as unembed, through layers.product: a quantized table multiplies from its integers
    y = product(x, self.unembed, self.cfg.dtype, lambda x, w: x @ w)
    return constrain(y, names).astype(jnp.float32)

  def _run(self, tokens, positions, segment_ids, dropout_key, cached, neftune_alpha=0.0):
    """-> (final hidden states [B, T, D], with `cached` the per-layer caches (k, v) updated).

    A forward pass without a cache leaves the MoE layers' mean stats on the model as `moe_aux`
    (spjax.model.moe.add_aux reads them), whichever method ran it.
    """
    cfg = self.cfg
    x = jnp.take(self.embed[...], tokens, axis=0)  # [B, T, D] in param dtype
    if dropout_key is not None and neftune_alpha:  # its own key; the layers' keys as without it
      x = neftune(x, neftune_alpha, jax.random.fold_in(dropout_key, cfg.num_layers))
    x = x.astype(cfg.dtype)
    if _lookup_splits_embed():
      # The lookup's rows come out split like the table's `embed` (every row on every device)
      # and move to the batch layout below. Pinned here, after the cast, the backward pass moves
      # their gradient back in bf16 and upcasts it for the float32 scatter-add into the table;
      # unpinned, XLA moved it as float32 [B, T, D].
      x = constrain(x, (None, None, "embed"))
    x = constrain(x, ("batch", "length", "act_embed"))

    policy = REMAT_POLICIES[cfg.remat_policy]
    def layer(block, x, key, layer_kv):  # layer_kv: this layer's cache (k, v), or None
      cache = None if layer_kv is None else (*layer_kv, cached[1], cached[0].index)
      return block(x, positions, segment_ids, key, cache)
    if cfg.remat_policy != "none":
      layer = nnx.remat(layer, policy=policy)

    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
    if cfg.scan_layers and cached is None and pipeline.current() is not None:
      # The layout maps layers to stage: the same stack runs as a pipeline over the stage axis.
      def stage_layer(block, x, positions, segment_ids, key):
        x, _, sums = block(x, positions, segment_ids, key)
        return x, sums
      x, sums = pipeline.run(stage_layer, self.blocks, x, (positions, segment_ids), keys,
                             remat=cfg.remat_policy != "none", policy=policy)
      if cfg.num_experts:  # sums [L, ...] over every microbatch: the whole batch's, as below
        self.moe_aux = moe_lib.Aux(moe_lib.mean_stats(cfg, [sums]))
      return self.final_norm(x), None
    if cfg.scan_layers:
      # Scanning needs the caches stacked along a leading L axis: a copy each call, so decoding
      # loops use `unrolled(model)` instead.
      stacked = None if cached is None else (jnp.stack(cached[0].k), jnp.stack(cached[0].v))
      @nnx.scan(in_axes=(nnx.Carry, 0, 0 if keys is not None else None,
                         0 if cached is not None else None),
                out_axes=(nnx.Carry, 0), transform_metadata=_LAYERS)
      def run_stack(x, block, key, layer_kv):
        x, kv, sums = layer(block, x, key, layer_kv)
        return x, (kv, sums)
      x, (new_kv, sums) = run_stack(x, self.blocks, keys, stacked)  # sums: {name: [L, ...]}
      per_layer_sums = [sums]
      if cached is not None:
        new_kv = tuple(tuple(jnp.unstack(a)) for a in new_kv)
    else:
      per_layer, per_layer_sums = [], []
      for i, block in enumerate(self.blocks):
        layer_kv = None if cached is None else (cached[0].k[i], cached[0].v[i])
        x, kv, sums = layer(block, x, None if keys is None else keys[i], layer_kv)
        per_layer.append(kv)
        per_layer_sums.append(sums)
      new_kv = None if cached is None else tuple(zip(*per_layer))  # ((k per layer), (v per layer))
    if cfg.num_experts and cached is None:
      self.moe_aux = moe_lib.Aux(moe_lib.mean_stats(cfg, per_layer_sums))
    return self.final_norm(x), new_kv


def _lookup_splits_embed() -> bool:
  """Whether the layout splits the embedding table's `embed` over a mesh axis that also splits
  `batch` (fsdp): then the lookup returns every row with `embed` split."""
  spec = logical_spec(("batch", "embed"))
  if spec is None:
    return False
  batch, embed = (set(spec_axes(e)) for e in spec)
  return bool(batch & embed)


def unembed(x, table, dtype, names):
  """[..., D] hidden states x the [D, V] table in `dtype` -> [..., V] float32 logits on `names`."""
  return constrain(x @ table.astype(dtype), names).astype(jnp.float32)


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
  known = {p for p, _ in nnx.to_flat_state(abstract)}
  extra = [p for p in stacked if p[0] == "blocks" and ("blocks", 0) + p[1:] not in known]
  if extra:  # would be dropped silently
    raise ValueError(f"unrolled: {'/'.join(map(str, extra[0]))} is not a Transformer parameter; "
                     "merge LoRA adapters into the kernels first (spjax.tune.lora.merge)")
  flat = []
  for path, var in nnx.to_flat_state(abstract):
    # Raw values, sliced leaf by leaf: a quantized weight (integers and scales) stays quantized.
    if path[0] == "blocks":  # ("blocks", i, ...) is layer i of ("blocks", ...)
      value = jax.tree.map(lambda a, i=path[1]: a[i],
                           stacked[("blocks",) + tuple(path[2:])].get_raw_value())
    else:
      value = stacked[path].get_raw_value()
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
