"""The Transformer block and its parts: norm, rotary embedding, attention, MLP.

Every parameter is tagged with logical axis names and every pinned activation goes through
`constrain`; placement is the layout's business (spjax/parallel/sharding.py).

Shapes in comments: B batch, T length, S cache slots, D d_model, H heads, K kv_heads, G = H // K,
Dh head_dim, R rotary dims, F mlp_dim, V vocab, L layers.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.model import attention as attention_lib
from spjax.model import moe as moe_lib
from spjax.model.config import ACTIVATIONS, ModelConfig, projection_name
from spjax.parallel.sharding import constrain

# A layer's KV cache: keys [B, K, S, Dh] and values [B, K, Dh, S], the layouts XLA's attention
# matmuls read them in (stored as [B, S, K, Dh], both were transposed, whole, on every decode step).
K_CACHE_AXES = ("batch", "act_kv_heads", "length", "head_dim")
V_CACHE_AXES = ("batch", "act_kv_heads", "head_dim", "length")


def param(rngs: nnx.Rngs, shape, names, cfg: ModelConfig, stddev: float) -> nnx.Param:
  """A parameter tagged with logical axis names; placement is decided later by the layout."""
  value = jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype)) * stddev
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _const(value: float, shape, names, cfg: ModelConfig) -> nnx.Param:
  return nnx.Param(jnp.full(shape, value, jnp.dtype(cfg.param_dtype)), out_sharding=names,
                   eager_sharding=False)


def adapted(module, name: str, x, y, key):
  """y = x through `module`'s kernel `name`, plus the output of the low-rank adapter that
  spjax/tune/lora.py attached as `<name>_lora`, if any; the model itself never creates adapters.

  y is named for the remat policies (config.projection_name); `key` (None in eval) seeds the
  adapter's input dropout.
  """
  y = jax.ad_checkpoint.checkpoint_name(y, projection_name(name))
  adapter = getattr(module, name + "_lora", None)
  if adapter is None:
    return y
  return y + adapter(x, key, projection_name(name + "_lora")).astype(y.dtype)


def neftune(x, alpha: float, key):
  """NEFTune (Jain et al. 2023): embeddings x [B, T, D] plus noise uniform in
  +-alpha / sqrt(T * D); `key=None` (eval, decoding) or alpha 0 is the identity."""
  if key is None or alpha == 0.0:
    return x
  bound = alpha / math.sqrt(x.shape[1] * x.shape[2])
  return x + jax.random.uniform(key, x.shape, x.dtype, -bound, bound)


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
    # The scale (and bias) apply in the compute dtype, after the cast, as HF Llama does: in float32
    # the scale's gradient is a float32 [B, T, D] reduction that XLA fuses into the backward
    # matmuls, which cost the 1B 57 ms a step on v5e (BENCHMARKS.md, issue 17).
    y = x32.astype(self.dtype) * self.scale[...].astype(self.dtype)
    if self.centred:
      y = y + self.bias[...].astype(self.dtype)
    return y


def rope(x, positions, theta: float, rotary_dim: int, scale: float = 1.0):
  """Rotary embedding of the first `rotary_dim` features of each head, half-split convention (HF's
  rotate_half); the rest pass through. x [..., Dh], positions broadcastable to x's leading dims:
  [B, T, 1] for x [B, T, N, Dh], [B, 1, T] for x [B, N, T, Dh]. The result is times `scale`, taken
  into the sines and cosines: a scaled rotation costs no pass over x of its own.

  Angles, sines and cosines in float32 (positions reach thousands of radians); the rotation itself
  in x's dtype, as transformers does (in float32 its converts were ~8% of the scanned 1B's TPU
  step in the cost model).
  """
  half = rotary_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [R/2]
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, 1, R/2] or [B, 1, T, R/2]
  sin, cos = (jnp.asarray(scale * f(angles), x.dtype) for f in (jnp.sin, jnp.cos))
  sin, cos = (jnp.concatenate([t, t], axis=-1) for t in (sin, cos))  # [..., R]
  # rotate_half(x) = [-x2, x1] as a product with a signed permutation [R, R]. On TPU, XLA wrote the
  # two rotated halves as half-width buffers and joined them in a copy of q of its own; a matmul
  # keeps its elementwise consumers in its output pass (1B on v5e: 1.092 -> 1.045 s a step at full
  # remat, BENCHMARKS.md).
  # Exact: one nonzero term of +-1 per output. bf16 x is exact at the default precision, in one
  # MXU pass; float32 x needs HIGHEST, which the TPU runs as several bf16 passes.
  precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
  eye, zero = jnp.eye(half, dtype=x.dtype), jnp.zeros((half, half), x.dtype)
  swap = jnp.block([[zero, eye], [-eye, zero]])  # [R, R]: xr @ swap = [-x2, x1]
  xr, rest = x[..., :rotary_dim], x[..., rotary_dim:]
  turned = jnp.einsum("...d,de->...e", xr, swap, precision=precision)
  rotated = xr * cos + turned * sin
  if not rest.size:
    return rotated
  return jnp.concatenate([rotated, rest * jnp.asarray(scale, x.dtype)], axis=-1)


class Attention(nnx.Module):
  """Causal grouped-query attention that never attends across packed documents."""
  # kernel -> how many of its leading dimensions the input contracts with (the rest are outputs)
  KERNELS = {"q": 1, "k": 1, "v": 1, "o": 2}

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2: scale residual writers
    self.q = param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), cfg, std)
    self.k = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg, std)
    self.v = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg, std)
    self.o = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), cfg, out_std)
    if cfg.attn_bias:
      self.q_bias = _const(0.0, (h, dh), ("heads", "head_dim"), cfg)
      self.k_bias = _const(0.0, (k, dh), ("kv_heads", "head_dim"), cfg)
      self.v_bias = _const(0.0, (k, dh), ("kv_heads", "head_dim"), cfg)
      self.o_bias = _const(0.0, (d,), ("embed",), cfg)

  def _project(self, x, name, key):  # x [B, T, D] -> [B, T, N, Dh]
    dt = jnp.dtype(self.cfg.dtype)
    y = product(x, getattr(self, name), dt, lambda x, w: jnp.einsum("btd,dhk->bthk", x, w))
    y = adapted(self, name, x, y, _fold(key, "qkv".index(name)))
    return y + getattr(self, name + "_bias")[...].astype(dt) if self.cfg.attn_bias else y

  def _splash(self, x, positions, segment_ids, key):  # x [B, T, D] -> [B, T, D]
    """Training attention by the splash kernel, which reads q, k, v heads before length: they are
    made in that order as they leave their projections (XLA picks the matmuls' output layouts to
    match) and RoPE runs on them there, so nothing between the projections and the kernel is a
    pass over q of its own."""
    cfg = self.cfg
    q, k, v = (self._project(x, n, key).transpose(0, 2, 1, 3) for n in "qkv")  # [B, H | K, T, Dh]
    at = positions[:, None, :]  # [B, 1, T]
    # The kernel does not scale the scores: q's 1 / sqrt(Dh) rides on RoPE's sines and cosines.
    q = rope(q, at, cfg.rope_theta, cfg.rotary_dim, scale=cfg.head_dim ** -0.5)
    q = constrain(q, attention_lib.Q_AXES)
    k = constrain(rope(k, at, cfg.rope_theta, cfg.rotary_dim), attention_lib.KV_AXES)
    v = constrain(v, attention_lib.KV_AXES)
    out = attention_lib.splash(q, k, v, segment_ids)  # [B, H, T, Dh]
    return self._output(out.transpose(0, 2, 1, 3), key)  # folded into the output matmul

  def __call__(self, x, positions, segment_ids, key, cache=None):
    """x [B, T, D] -> ([B, T, D], the cache's (k, v) with x's written, or None without a cache).

    cache: None attends within x. Else (k [B, K, S, Dh], v [B, K, Dh, S], key segment ids [B, S]
    already holding x's, index []): x sits at slots index..index+T and attends to every earlier
    slot of its segment.
    """
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    if cache is None and cfg.attention == "splash":
      return self._splash(x, positions, segment_ids, key), None
    q, k, v = (self._project(x, n, key) for n in "qkv")  # [B, T, H | K, Dh]
    at = positions[:, :, None]  # [B, T, 1]
    q = constrain(rope(q, at, cfg.rope_theta, cfg.rotary_dim),
                  ("batch", "length", "act_heads", "head_dim"))
    k = constrain(rope(k, at, cfg.rope_theta, cfg.rotary_dim),
                  ("batch", "length", "act_kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"))

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
    return self._output(out, key), None if cache is None else (k, v)

  def _output(self, out, key):  # [B, T, H, Dh] -> [B, T, D]
    dt = jnp.dtype(self.cfg.dtype)
    out = constrain(out, ("batch", "length", "act_heads", "head_dim"))
    y = adapted(self, "o", out,
                product(out, self.o, dt, lambda x, w: jnp.einsum("bthk,hkd->btd", x, w)),
                _fold(key, 3))
    return y + self.o_bias[...].astype(dt) if self.cfg.attn_bias else y


@functools.cache
def gated(activation: str):
  """(g, u) -> act(g) * u, [B, T, F] each; autodiff's gradients, each written once.

  dg = t * u * act'(g) is an elementwise pass heavy on the vector unit (an exp and a divide for
  SiLU). Left to itself, XLA on TPU fused it into each of its two consumers, the gate's weight
  gradient and the gate's input gradient, so it ran twice, inside matmuls it slowed by half (the
  1B on v5e: 4.1-4.4 ms against 2.9 for the plain matmul). Behind an optimization barrier, dg and
  du are materialized where they are made: 1B step 0.863 -> 0.797 s (save_dots_no_batch), 1.045
  -> 1.009 s (full remat); 7B on v5p 1.106 -> 1.084 and 1.338 -> 1.319 s (BENCHMARKS.md, #17).
  """
  act = ACTIVATIONS[activation]

  def product(g, u):
    return act(g) * u

  def bwd(res, t):
    return jax.lax.optimization_barrier(jax.vjp(product, *res)[1](t))

  glu = jax.custom_vjp(product)
  glu.defvjp(lambda g, u: (product(g, u), (g, u)), bwd)
  return glu


class MLP(nnx.Module):
  """down(act(x @ gate) * (x @ up)) when gated (SwiGLU), else down(act(x @ up))."""
  KERNELS = {"gate": 1, "up": 1, "down": 1}  # as Attention.KERNELS

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.d_model, cfg.mlp_dim
    if cfg.gated_mlp:
      self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg, 0.02)
    self.up = param(rngs, (d, f), ("embed", "mlp"), cfg, 0.02)
    self.down = param(rngs, (f, d), ("mlp", "embed"), cfg, 0.02 / math.sqrt(2 * cfg.num_layers))
    if cfg.mlp_bias:
      if cfg.gated_mlp:
        self.gate_bias = _const(0.0, (f,), ("mlp",), cfg)
      self.up_bias = _const(0.0, (f,), ("mlp",), cfg)
      self.down_bias = _const(0.0, (d,), ("embed",), cfg)

  def _dense(self, x, name, key):
    dt = jnp.dtype(self.cfg.dtype)
    y = adapted(self, name, x, product(x, getattr(self, name), dt, lambda x, w: x @ w),
                _fold(key, ("gate", "up", "down").index(name)))
    return y + getattr(self, name + "_bias")[...].astype(dt) if self.cfg.mlp_bias else y

  def __call__(self, x, key=None):  # [B, T, D]; key (None in eval) for adapters' dropout
    if self.cfg.gated_mlp:
      h = gated(self.cfg.mlp_activation)(self._dense(x, "gate", key), self._dense(x, "up", key))
    else:
      h = ACTIVATIONS[self.cfg.mlp_activation](self._dense(x, "up", key))  # [B, T, F]
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self._dense(h, "down", key)  # [B, T, D]


def product(x, var, dtype, fn):
  """fn(x, the weight in dtype): x times a layer's weight. A quantized weight (a value with a
  `product` method, spjax.compress.quantize.QArray) computes it its own way, from its integers."""
  value = var.get_raw_value() if isinstance(var, nnx.Variable) else var
  if hasattr(value, "product"):
    return value.product(x, fn, dtype)
  return fn(x, var[...].astype(dtype))


def _fold(key, i: int):
  """A key of its own for the i-th kernel's adapter, distinct from `key`'s other uses."""
  return None if key is None else jax.random.fold_in(key, i)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); or both from x in parallel.

  `moe`: the MLP is a mixture of experts (spjax/model/moe.py), whose routing sums the block returns.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
    self.rate = cfg.dropout_rate
    self.parallel = cfg.parallel_residual
    self.moe = moe
    self.attn_norm = Norm(cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg)
    self.mlp = moe_lib.MoE(cfg, rngs) if moe else MLP(cfg, rngs)

  def __call__(self, x, positions, segment_ids, key, cache=None):
    """x [B, T, D] -> (x [B, T, D], new_kv as Attention's, MoE sums (moe.SUMS) or {} if dense)."""
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    h, new_kv = self.attn(self.attn_norm(x), positions, segment_ids, keys[0], cache)
    h = dropout(h, self.rate, keys[1])
    if not self.parallel:  # else the MLP reads the block's input too
      x = constrain(x + h, ("batch", "length", "act_embed"))
    if self.moe:
      m, sums = self.mlp(self.mlp_norm(x), segment_ids)
    else:
      m, sums = self.mlp(self.mlp_norm(x), keys[2]), {}
    m = dropout(m, self.rate, keys[2])
    x = x + h + m if self.parallel else x + m
    return constrain(x, ("batch", "length", "act_embed")), new_kv, sums
