"""Autoregressive generation with a KV cache: prefill the prompts, then sample one token per step.

Prompts of different lengths are left-padded to a common length, so every row writes the same cache
slot at each step; each row keeps its own positions (its first real token is position 0) and never
attends to its padding. Prefill and the whole decode loop are one jit-compiled call, a
`lax.while_loop` that stops early once every row has produced a stop token.

Sharding follows whatever mesh and logical rules are active (`Program.activate()`): the model pins its
activations and the cache (`model.K_CACHE_AXES`, `V_CACHE_AXES`) by logical name, as in training.
The batch and the cache length are rounded up to what the layout splits them into.
"""

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

from spjax.model import model as model_lib


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is drawn from the logits; hashable, so jit specialises on it."""
  temperature: float = 0.0  # 0 = greedy (argmax); else logits / temperature
  top_k: int = 0            # keep the k most likely tokens; 0 = all
  top_p: float = 1.0        # keep the smallest set of top tokens holding this probability mass

  def validate(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits, key, sampling: Sampling):
  """logits [B, V] float32 -> tokens [B] int32."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k == 0 and sampling.top_p == 1.0:
    return jax.random.categorical(key, logits).astype(jnp.int32)
  # Candidates sorted by probability, most likely first: [B, C] values and their token ids.
  if sampling.top_k:
    values, ids = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))
  else:
    ids = jnp.argsort(-logits, axis=-1)
    values = jnp.take_along_axis(logits, ids, axis=-1)
  if sampling.top_p < 1.0:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, C]; the top candidate always stays
    values = jnp.where(mass_before < sampling.top_p, values, -jnp.inf)
  choice = jax.random.categorical(key, values)  # [B] index into the candidates
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def generate(model: model_lib.Transformer, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), seed: int = 0) -> list[list[int]]:
  """The completion of each prompt: at most `max_new_tokens` ids, cut before the first stop token.

  Decoding runs on unrolled layers (`spjax.model.model.unrolled`); a scanned model is copied to that form
  on each call, so callers that generate repeatedly convert once and pass the unrolled model.
  """
  sampling.validate()
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  cfg = model.cfg
  bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(f"prompt token {bad[0]} is outside the model's vocabulary "
                     f"(vocab_size {cfg.vocab_size})")

  rows = _round_up(len(prompts), _shards("batch"))
  length = _round_up(max(map(len, prompts)), _shards("length"))
  tokens = np.zeros((rows, length), np.int32)  # [B, P], prompts right-aligned
  pad = np.full((rows,), length - 1, np.int32)  # filler rows: one token, never returned
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    pad[i] = length - len(p)
  slots = _round_up(length + max_new_tokens, _shards("length"))

  stops = np.full((max(len(stop_tokens), 1),), -1, np.int32)  # -1 never matches; one shape
  stops[:len(stop_tokens)] = stop_tokens                      # with or without stops: one compile
  graphdef, state = nnx.split(model_lib.unrolled(model))  # copies the weights if scanned
  out, steps = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(pad),
                         jax.random.key(seed), jnp.asarray(stops),
                         max_new_tokens=max_new_tokens, slots=slots, sampling=sampling)
  out, steps = np.asarray(out), int(steps)
  stops = set(stop_tokens)
  completions = []
  for row in out[:len(prompts), :steps].tolist():
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    completions.append(row[:cut])
  return completions


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "slots", "sampling"))
def _generate(graphdef, state, tokens, pad, key, stop_tokens, *, max_new_tokens: int, slots: int,
              sampling: Sampling):
  """tokens [B, P] left-padded by pad [B] -> (new tokens [B, N], steps taken [])."""
  model = nnx.merge(graphdef, state)
  b, p = tokens.shape
  slot = jnp.arange(p)[None, :]  # [1, P]
  positions = jnp.maximum(slot - pad[:, None], 0)  # [B, P]: each row counts from its first token
  segments = (slot >= pad[:, None]).astype(jnp.int32)  # [B, P]: 0 on padding
  cache = model_lib.KVCache.zeros(model.cfg, b, slots)
  logits, cache = model.extend(tokens, positions, segments, cache)  # [B, V]: the last slot's
  first = sample(logits, jax.random.fold_in(key, 0), sampling)  # [B]

  out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, stop_tokens)  # [B]
  lengths = p - pad  # [B]: position of each row's next token

  def keep_going(carry):
    step, _, _, _, done, _ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def step_fn(carry):
    step, last, cache, out, done, state = carry
    positions = (lengths + step - 1)[:, None]  # [B, 1]
    model = nnx.merge(graphdef, state)
    logits, cache = model.extend(last[:, None], positions, jnp.ones_like(positions), cache)
    token = sample(logits, jax.random.fold_in(key, step), sampling)  # [B]
    out = out.at[:, step].set(token)
    return step + 1, token, cache, out, done | jnp.isin(token, stop_tokens), state

  # The params ride in the carry, unchanged: NNX refuses modules built from an outer trace's arrays.
  carry = (jnp.int32(1), first, cache, out, done, state)
  steps, _, _, out, _, _ = jax.lax.while_loop(keep_going, step_fn, carry)
  return out, steps


def _shards(logical: str) -> int:
  """How many pieces the active layout splits a dimension with this logical name into."""
  rules = flax_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return 1
  axes = dict(rules).get(logical) or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
