"""Decoder-only Transformer LM in Flax NNX: Llama-style by default (RMSNorm, RoPE, GQA, SwiGLU).

A few switches cover the GPT-NeoX family too (LayerNorm with bias, GeLU MLP, parallel residual, partial
rotary, biases), so Hugging Face checkpoints of either family load into this one model.

Every parameter and activation dimension carries a logical axis name (spjax/sharding.py lists the
vocabulary); the model never names a mesh axis. A layout decides where each tensor lives.

Sizes (parameters, untied embeddings, vocab 32000 except tiny):

  name   d_model  layers  heads  kv_heads  head_dim  mlp_dim   params
  tiny       128       2      8         4        16      512    0.6M  (vocab 1024; seconds on CPU)
  125m       768      12     12        12        64     2048   0.13B  (GPT-3 Small width, SwiGLU)
  350m      1024      24     16        16        64     2816   0.37B  (GPT-3 Medium width, SwiGLU)
  1b        2048      16     16         8       128     8192   1.1B
  7b        4096      32     32        32       128    11008   6.7B   (llama2-7b)

Shapes in comments: B batch, T length, S cache slots, D d_model, H heads, K kv_heads, G = H // K,
Dh head_dim, R rotary dims, F mlp_dim, V vocab, L layers.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from spjax import attention as attention_lib
from spjax.sharding import constrain

_CP = jax.checkpoint_policies
# The matmul policies also keep what the splash kernel's backward reads (its output and log-sum-exp,
# named "attention"), so the fused attention is not run forward twice.
_KEEP_ATTENTION = _CP.save_only_these_names(attention_lib.RESIDUALS)
REMAT_POLICIES = {
    "none": None,  # keep every activation for the backward pass
    "full": _CP.nothing_saveable,  # recompute the whole block
    # keep matmul outputs (with batch dims: attention scores too), recompute the rest
    "save_dots": _CP.save_from_both_policies(_CP.checkpoint_dots, _KEEP_ATTENTION),
    # keep the projections' outputs; recompute einsum attention from q, k and v
    "save_dots_no_batch": _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable,
                                                      _KEEP_ATTENTION),
}
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
# A layer's KV cache: keys [B, K, S, Dh] and values [B, K, Dh, S], the layouts XLA's attention
# matmuls read them in (stored as [B, S, K, Dh], both were transposed, whole, on every decode step).
K_CACHE_AXES = ("batch", "act_kv_heads", "length", "head_dim")
V_CACHE_AXES = ("batch", "act_kv_heads", "head_dim", "length")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rotary_pct: float = 1.0        # fraction of each head's features that rotate (GPT-NeoX: 0.25)
  norm: str = "rmsnorm"          # rmsnorm (Llama) | layernorm (mean-centred, with bias: GPT-NeoX)
  norm_eps: float = 1e-5
  mlp_activation: str = "silu"   # silu | gelu (exact erf) | gelu_tanh
  gated_mlp: bool = True         # down(act(x @ gate) * (x @ up)) (SwiGLU); else down(act(x @ up))
  parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) (GPT-J/NeoX): one residual add
  attn_bias: bool = False        # biases on the q, k, v and output projections
  mlp_bias: bool = False         # biases on the MLP matrices
  dropout_rate: float = 0.0      # attention probabilities and residual branches; off in eval
  tie_embeddings: bool = False   # unembed with the transposed embedding table
  dtype: str = "bfloat16"        # compute dtype of matmuls and activations
  param_dtype: str = "float32"   # storage dtype of parameters (and optimizer moments)
  scan_layers: bool = True       # nnx.scan over a stacked layer axis: compile time independent of L
  remat_policy: str = "none"     # one of REMAT_POLICIES
  attention: str = "xla"         # xla (einsums, any backend) | splash (fused Pallas kernel, TPU)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_pct)  # truncated, as GPT-NeoX does

  def to_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(self))

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    model_cfg = cls(**dict(cfg))
    model_cfg.validate()
    return model_cfg

  def validate(self):
    """Raises ValueError naming the `model.*` field that cannot work."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                       f"model.num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
    if not 0.0 < self.rotary_pct <= 1.0:
      raise ValueError(f"model.rotary_pct must be in (0, 1], got {self.rotary_pct}")
    if self.rotary_dim < 2 or self.rotary_dim % 2:
      raise ValueError(f"model.head_dim * model.rotary_pct ({self.head_dim} * {self.rotary_pct}) "
                       f"must give an even number (>= 2) of rotary features, got {self.rotary_dim}")
    if self.norm not in NORMS:
      raise ValueError(f"model.norm {self.norm!r} is not one of {', '.join(NORMS)}")
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model.mlp_activation {self.mlp_activation!r} is not one of "
                       f"{', '.join(ACTIVATIONS)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy {self.remat_policy!r} is not one of "
                       f"{', '.join(REMAT_POLICIES)}")
    if self.attention not in attention_lib.IMPLS:
      raise ValueError(f"model.attention {self.attention!r} is not one of "
                       f"{', '.join(attention_lib.IMPLS)}")
    if self.attention == "splash" and self.dropout_rate:
      raise ValueError(f"model.attention='splash' has no attention dropout; set model.dropout_rate "
                       f"to 0 (got {self.dropout_rate}) or use model.attention='xla'")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.{name} must be float32, bfloat16 or float16, "
                         f"got {getattr(self, name)!r}")

  def num_params(self) -> int:
    d, f = self.d_model, self.mlp_dim
    qo, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = 2 * d * (qo + kv) + (2 * qo + 2 * kv + d if self.attn_bias else 0)
    matrices = 3 if self.gated_mlp else 2
    mlp = matrices * d * f + ((matrices - 1) * f + d if self.mlp_bias else 0)
    norm = 2 * d if self.norm == "layernorm" else d
    unembed = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * (attn + mlp + 2 * norm) + norm + unembed


SIZES = {
    "tiny": ModelConfig(vocab_size=1024, d_model=128, num_layers=2, num_heads=8, num_kv_heads=4,
                        head_dim=16, mlp_dim=512),
    "125m": ModelConfig(vocab_size=32000, d_model=768, num_layers=12, num_heads=12,
                        num_kv_heads=12, head_dim=64, mlp_dim=2048),
    "350m": ModelConfig(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16,
                        num_kv_heads=16, head_dim=64, mlp_dim=2816),
    "1b": ModelConfig(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                      head_dim=128, mlp_dim=8192),
    "7b": ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, mlp_dim=11008),
}


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


def _param(rngs: nnx.Rngs, shape, names, cfg: ModelConfig, stddev: float) -> nnx.Param:
  """A parameter tagged with logical axis names; placement is decided later by the layout."""
  value = jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype)) * stddev
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _const(value: float, shape, names, cfg: ModelConfig) -> nnx.Param:
  return nnx.Param(jnp.full(shape, value, jnp.dtype(cfg.param_dtype)), out_sharding=names,
                   eager_sharding=False)


def dropout(x, rate: float, key):
  """Inverted dropout; `key=None` (eval) is the identity."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Norm(nnx.Module):
  """RMSNorm, or LayerNorm (mean-centred, with a bias) when `cfg.norm == "layernorm"`."""

  def __init__(self, cfg: ModelConfig):
    self.eps = cfg.norm_eps
    self.dtype = jnp.dtype(cfg.dtype)
    self.centred = cfg.norm == "layernorm"
    self.scale = _const(1.0, (cfg.d_model,), ("embed",), cfg)
    if self.centred:
      self.bias = _const(0.0, (cfg.d_model,), ("embed",), cfg)

  def __call__(self, x):  # [B, T, D]
    x32 = x.astype(jnp.float32)  # the mean of squares in bf16 loses too much precision
    if self.centred:
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    x32 = x32 * self.scale[...].astype(jnp.float32)
    if self.centred:
      x32 = x32 + self.bias[...].astype(jnp.float32)
    return x32.astype(self.dtype)


def rope(x, positions, theta: float, rotary_dim: int):
  """Rotary embedding of the first `rotary_dim` features of each head, half-split convention (HF's
  rotate_half); the rest pass through. x [B, T, N, Dh], positions [B, T]."""
  half = rotary_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [R/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2]
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query attention that never attends across packed documents."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2: scale residual writers
    self.q = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), cfg, std)
    self.k = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg, std)
    self.v = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg, std)
    self.o = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), cfg, out_std)
    if cfg.attn_bias:
      self.q_bias = _const(0.0, (h, dh), ("heads", "head_dim"), cfg)
      self.k_bias = _const(0.0, (k, dh), ("kv_heads", "head_dim"), cfg)
      self.v_bias = _const(0.0, (k, dh), ("kv_heads", "head_dim"), cfg)
      self.o_bias = _const(0.0, (d,), ("embed",), cfg)

  def _project(self, x, name):  # x [B, T, D] -> [B, T, N, Dh]
    dt = jnp.dtype(self.cfg.dtype)
    y = jnp.einsum("btd,dhk->bthk", x, getattr(self, name)[...].astype(dt))
    return y + getattr(self, name + "_bias")[...].astype(dt) if self.cfg.attn_bias else y

  def __call__(self, x, positions, segment_ids, key, cache=None):
    """x [B, T, D] -> ([B, T, D], the cache's (k, v) with x's written, or None without a cache).

    cache: None attends within x. Else (k [B, K, S, Dh], v [B, K, Dh, S], key segment ids [B, S]
    already holding x's, index []): x sits at slots index..index+T and attends to every earlier
    slot of its segment.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q, k, v = (self._project(x, n) for n in "qkv")  # [B, T, H | K, Dh]
    q = constrain(rope(q, positions, cfg.rope_theta, cfg.rotary_dim),
                  ("batch", "length", "act_heads", "head_dim"))
    k = constrain(rope(k, positions, cfg.rope_theta, cfg.rotary_dim),
                  ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))

    if cache is None and cfg.attention == "splash":
      return self._output(attention_lib.splash(q, k, v, segment_ids)), None

    b, t, h, dh = q.shape
    groups = h // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, dh)  # [B, T, K, G, Dh]
    if cache is None:
      query_slots, key_slots, key_segments = jnp.arange(t), jnp.arange(t), segment_ids
      scores = jnp.einsum("btkgd,bskd->bkgts", q, k)
    else:  # the keys and values are the cache's, with x's written at slots index..index+T
      cache_k, cache_v, key_segments, index = cache
      k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype),
                                       (0, 0, index, 0))
      v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 3, 1).astype(cache_v.dtype),
                                       (0, 0, 0, index))
      k, v = constrain(k, K_CACHE_AXES), constrain(v, V_CACHE_AXES)  # [B, K, S, Dh], [B, K, Dh, S]
      query_slots, key_slots = jnp.arange(t) + index, jnp.arange(k.shape[2])
      scores = jnp.einsum("btkgd,bksd->bkgts", q, k)
    scores = scores.astype(jnp.float32) / math.sqrt(dh)  # [B, K, G, T, S]
    causal = query_slots[:, None] >= key_slots[None, :]  # [T, S]
    same_doc = segment_ids[:, :, None] == key_segments[:, None, :]  # [B, T, S]: packed documents
    mask = (causal[None] & same_doc)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, K, G, T, S]
    probs = dropout(probs, cfg.dropout_rate, key)
    spec = "bkgts,bskd->btkgd" if cache is None else "bkgts,bkds->btkgd"
    out = jnp.einsum(spec, probs, v).reshape(b, t, h, dh)  # [B, T, H, Dh]
    return self._output(out), None if cache is None else (k, v)

  def _output(self, out):  # [B, T, H, Dh] -> [B, T, D]
    dt = jnp.dtype(self.cfg.dtype)
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    out = jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dt))
    return out + self.o_bias[...].astype(dt) if self.cfg.attn_bias else out


class MLP(nnx.Module):
  """down(act(x @ gate) * (x @ up)) when gated (SwiGLU), else down(act(x @ up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.mlp_dim
    if cfg.gated_mlp:
      self.gate = _param(rngs, (d, f), ("embed", "mlp"), cfg, 0.02)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), cfg, 0.02)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), cfg, 0.02 / math.sqrt(2 * cfg.num_layers))
    if cfg.mlp_bias:
      if cfg.gated_mlp:
        self.gate_bias = _const(0.0, (f,), ("mlp",), cfg)
      self.up_bias = _const(0.0, (f,), ("mlp",), cfg)
      self.down_bias = _const(0.0, (d,), ("embed",), cfg)

  def _dense(self, x, name):
    dt = jnp.dtype(self.cfg.dtype)
    y = x @ getattr(self, name)[...].astype(dt)
    return y + getattr(self, name + "_bias")[...].astype(dt) if self.cfg.mlp_bias else y

  def __call__(self, x):  # [B, T, D]
    h = ACTIVATIONS[self.cfg.mlp_activation](self._dense(x, "gate" if self.cfg.gated_mlp else "up"))
    if self.cfg.gated_mlp:
      h = h * self._dense(x, "up")  # [B, T, F]
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self._dense(h, "down")  # [B, T, D]


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); or both from x in parallel."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.rate = cfg.dropout_rate
    self.parallel = cfg.parallel_residual
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids, key, cache=None):  # x [B, T, D]
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, keys[0], cache)
    h = dropout(h, self.rate, keys[1])
    if self.parallel:
      x = x + h + dropout(self.mlp(self.mlp_norm(x)), self.rate, keys[2])
    else:
      x = constrain(x + h, ("batch", "length", "act_embed"))
      x = x + dropout(self.mlp(self.mlp_norm(x)), self.rate, keys[2])
    return constrain(x, ("batch", "length", "act_embed")), new_kv


_LAYERS = {nnx.PARTITION_NAME: "layers"}  # stacked params gain a leading "layers" logical axis


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg, 0.02)
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYERS)
      def make_stack(rngs):
        return Block(cfg, rngs)
      self.blocks = make_stack(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = Norm(cfg)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, 0.02)

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
    """-> (final hidden states [B, T, D], with `cached` the per-layer caches (k, v) updated)."""
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
        return layer(block, x, key, layer_kv)
      x, new_kv = run_stack(x, self.blocks, keys, stacked)
      if cached is not None:
        new_kv = tuple(tuple(jnp.unstack(a)) for a in new_kv)
    else:
      per_layer = []
      for i, block in enumerate(self.blocks):
        layer_kv = None if cached is None else (cached[0].k[i], cached[0].v[i])
        x, kv = layer(block, x, None if keys is None else keys[i], layer_kv)
        per_layer.append(kv)
      new_kv = None if cached is None else tuple(zip(*per_layer))  # ((k per layer), (v per layer))
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
