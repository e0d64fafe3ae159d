"""Decoder-only Transformer LM in Flax NNX (Llama-style: RMSNorm, RoPE, GQA, SwiGLU).

Every parameter and activation dimension carries a logical axis name (spjax/sharding.py lists the
vocabulary); the model never names a mesh axis. A layout decides where each tensor lives.

Sizes (parameters, untied embeddings, vocab 32000 except tiny):

  name   d_model  layers  heads  kv_heads  head_dim  mlp_dim   params
  tiny       128       2      8         4        16      512    0.6M  (vocab 1024; seconds on CPU)
  125m       768      12     12        12        64     2048   0.13B  (GPT-3 Small width, SwiGLU)
  350m      1024      24     16        16        64     2816   0.37B  (GPT-3 Medium width, SwiGLU)
  1b        2048      16     16         8       128     8192   1.1B
  7b        4096      32     32        32       128    11008   6.7B   (llama2-7b)

Shapes in comments: B batch, T length, D d_model, H heads, K kv_heads, G = H // K, Dh head_dim,
F mlp_dim, V vocab, L layers.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from spjax.sharding import constrain

REMAT_POLICIES = {
    "none": None,  # keep every activation for the backward pass
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "save_dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the rest
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
  norm_eps: float = 1e-5
  dropout_rate: float = 0.0      # attention probabilities and residual branches; off in eval
  tie_embeddings: bool = False   # unembed with the transposed embedding table
  dtype: str = "bfloat16"        # compute dtype of matmuls and activations
  param_dtype: str = "float32"   # storage dtype of parameters (and optimizer moments)
  scan_layers: bool = True       # nnx.scan over a stacked layer axis: compile time independent of L
  remat_policy: str = "none"     # one of REMAT_POLICIES

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
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for rotary embeddings, got {self.head_dim}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy {self.remat_policy!r} is not one of "
                       f"{', '.join(REMAT_POLICIES)}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.{name} must be float32, bfloat16 or float16, "
                         f"got {getattr(self, name)!r}")

  def num_params(self) -> int:
    attn = self.d_model * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * self.d_model * self.mlp_dim + 2 * self.d_model
    unembed = 0 if self.tie_embeddings else self.d_model * self.vocab_size
    return self.vocab_size * self.d_model + self.num_layers * layer + self.d_model + unembed


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


def _param(rngs: nnx.Rngs, shape, names, cfg: ModelConfig, stddev: float) -> nnx.Param:
  """A parameter tagged with logical axis names; placement is decided later by the layout."""
  value = jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype)) * stddev
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _ones(shape, names, cfg: ModelConfig) -> nnx.Param:
  return nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), out_sharding=names,
                   eager_sharding=False)


def dropout(x, rate: float, key):
  """Inverted dropout; `key=None` (eval) is the identity."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, cfg: ModelConfig):
    self.eps = cfg.norm_eps
    self.dtype = jnp.dtype(cfg.dtype)
    self.scale = _ones((cfg.d_model,), ("embed",), cfg)

  def __call__(self, x):  # [B, T, D]
    x32 = x.astype(jnp.float32)  # the mean of squares in bf16 loses too much precision
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope(x, positions, theta: float):
  """Rotary embedding, half-split convention (as Llama in HF): x [B, T, N, Dh], positions [B, T]."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [Dh/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


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

  def __call__(self, x, positions, segment_ids, key):  # x [B, T, D]
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    q = jnp.einsum("btd,dhk->bthk", x, self.q[...].astype(dt))  # [B, T, H, Dh]
    k = jnp.einsum("btd,dhk->bthk", x, self.k[...].astype(dt))  # [B, T, K, Dh]
    v = jnp.einsum("btd,dhk->bthk", x, self.v[...].astype(dt))  # [B, T, K, Dh]
    q = constrain(rope(q, positions, cfg.rope_theta), ("batch", "length", "act_heads", "head_dim"))
    k = constrain(rope(k, positions, cfg.rope_theta),
                  ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))

    b, t, h, dh = q.shape
    groups = h // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, dh)  # [B, T, K, G, Dh]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(dh)
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, S]
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]: packed documents
    mask = (causal[None] & same_doc)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, K, G, T, S]
    probs = dropout(probs, cfg.dropout_rate, key)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)  # [B, T, H, Dh]
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    return jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dt))  # [B, T, D]


class MLP(nnx.Module):
  """SwiGLU: down(silu(x @ gate) * (x @ up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    d, f = cfg.d_model, cfg.mlp_dim
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), cfg, 0.02)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), cfg, 0.02)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), cfg, 0.02 / math.sqrt(2 * cfg.num_layers))

  def __call__(self, x):  # [B, T, D]
    dt = self.dtype
    h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))  # [B, T, F]
    h = constrain(h, ("batch", "length", "act_mlp"))
    return h @ self.down[...].astype(dt)  # [B, T, D]


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.rate = cfg.dropout_rate
    self.attn_norm = RMSNorm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids, key):  # x [B, T, D]
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    h = self.attn(self.attn_norm(x), positions, segment_ids, keys[0])
    x = constrain(x + dropout(h, self.rate, keys[1]), ("batch", "length", "act_embed"))
    h = self.mlp(self.mlp_norm(x))
    return constrain(x + dropout(h, self.rate, keys[2]), ("batch", "length", "act_embed"))


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
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg, 0.02)

  def __call__(self, tokens, positions=None, segment_ids=None, *, dropout_key=None):
    """tokens [B, T] int -> logits [B, T, V] float32.

    positions/segment_ids [B, T] come from packing (segment 0 is padding); by default one document
    per row. `dropout_key=None` means eval (no dropout).
    """
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.dtype)  # [B, T, D]
    x = constrain(x, ("batch", "length", "act_embed"))

    policy = REMAT_POLICIES[cfg.remat_policy]
    def layer(block, x, key):
      return block(x, positions, segment_ids, key)
    if cfg.remat_policy != "none":
      layer = nnx.remat(layer, policy=policy)

    keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
    if cfg.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0, 0 if keys is not None else None), out_axes=nnx.Carry,
                transform_metadata=_LAYERS)
      def run_stack(x, block, key):
        return layer(block, x, key)
      x = run_stack(x, self.blocks, keys)
    else:
      for i, block in enumerate(self.blocks):
        x = layer(block, x, None if keys is None else keys[i])

    x = self.final_norm(x)
    table = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]  # [D, V]
    logits = x @ table.astype(cfg.dtype)  # [B, T, V]
    return constrain(logits, ("batch", "length", "act_vocab")).astype(jnp.float32)


def activation_shapes(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
  """{name: (shape, logical axes)} of the activations the model pins with `constrain`.

  Lets a layout be validated against a batch before anything is traced.
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
