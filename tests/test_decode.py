"""Sampling on fake logits; KV-cache decoding against full recomputation, left padding, stop tokens,
and the same tokens under sharded layouts."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from spjax import convert
from spjax.infer import decode
from spjax.model import model as model_lib
from spjax.parallel import layouts, sharding

CFG = dataclasses.replace(model_lib.SIZES["tiny"], dtype="float32", vocab_size=256)
PROMPTS = [[5, 17, 42], [7, 1, 99, 3, 250, 8, 64], [12]]
NEW = 6  # tokens to generate


def random_model(cfg=CFG, seed=0):
  """Random weights without running the initializer eagerly (that compiles op by op: slow on CPU)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))
  rng = np.random.RandomState(seed)
  state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), abstract)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
  return random_model()


@pytest.fixture(scope="module")
def greedy(model):
  """What KV-cache decoding gives for PROMPTS; other tests reuse its compiled program."""
  return decode.generate(model, PROMPTS, max_new_tokens=NEW)


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def draws(logits, sampling, n=2000):
  """n samples of one row of logits [V] -> [n] token ids."""
  keys = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.vmap(lambda k: decode.sample(logits[None], k, sampling)[0])(keys))


# ---------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------


def test_greedy_picks_the_argmax_and_temperature_zero_ignores_top_k_and_top_p():
  logits = jax.random.normal(jax.random.key(1), (4, 50))
  greedy = decode.sample(logits, jax.random.key(2), decode.Sampling())
  np.testing.assert_array_equal(greedy, np.argmax(logits, axis=-1))
  cold = decode.sample(logits, jax.random.key(3), decode.Sampling(0.0, top_k=5, top_p=0.5))
  np.testing.assert_array_equal(cold, greedy)


def test_top_k_never_samples_outside_the_k_most_likely():
  logits = jax.random.normal(jax.random.key(4), (50,))
  allowed = set(np.argsort(-np.asarray(logits))[:3].tolist())
  got = draws(logits, decode.Sampling(temperature=5.0, top_k=3))  # hot: flat within the top 3
  assert set(got.tolist()) == allowed


def test_top_p_keeps_the_smallest_set_holding_the_mass_and_renormalises():
  probs = np.array([0.1, 0.5, 0.05, 0.3, 0.05])
  got = draws(jnp.log(probs), decode.Sampling(temperature=1.0, top_p=0.7))
  assert set(got.tolist()) == {1, 3}  # 0.5 alone < 0.7; 0.5 + 0.3 >= 0.7
  np.testing.assert_allclose(np.mean(got == 1), 0.5 / 0.8, atol=0.04)


def test_temperature_scales_the_distribution():
  probs = np.array([0.6, 0.3, 0.1])
  got = draws(jnp.log(probs), decode.Sampling(temperature=2.0), n=4000)
  expected = np.sqrt(probs) / np.sqrt(probs).sum()  # softmax(log p / 2)
  np.testing.assert_allclose(np.bincount(got, minlength=3) / 4000, expected, atol=0.03)


@pytest.mark.parametrize("kwargs,needle", [({"temperature": -1.0}, "temperature"),
                                           ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p")])
def test_bad_sampling_settings_are_named(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    decode.Sampling(**kwargs).validate()


# ---------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------


def test_prefill_then_one_token_at_a_time_equals_a_full_forward_pass(model):
  tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, CFG.vocab_size)  # [B, T]
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  chunks = [(0, 4), (4, 5), (5, 6), (6, 10)]  # prefill, two single tokens, then a chunk

  @nnx.jit
  def incremental(model, tokens):
    cache = model_lib.KVCache.zeros(CFG, 2, 12)  # two spare slots stay empty
    last = []
    for start, end in chunks:
      logits, cache = model.extend(tokens[:, start:end], positions[:, start:end],
                                   jnp.ones((2, end - start), jnp.int32), cache)
      last.append(logits)  # [B, V] at position end - 1
    return jnp.stack(last, axis=1), cache.index

  for m in (model, model_lib.unrolled(model)):  # scanned, and the form decoding uses
    logits, index = incremental(m, tokens)
    assert int(index) == 10
    full = forward(model, tokens)[:, [end - 1 for _, end in chunks]]
    np.testing.assert_allclose(logits, full, atol=1e-5)


def naive_greedy(model, prompt, n):
  """Greedy decoding by recomputing the whole sequence for every new token."""
  seq = np.zeros((1, 16), np.int32)  # one shape, one compile: later tokens cannot affect earlier
  seq[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + n):
    seq[0, t] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, t - 1]))
  return seq[0, len(prompt):len(prompt) + n].tolist()


def test_batched_left_padded_greedy_equals_recomputing_each_prompt_alone(model, greedy):
  assert greedy == [naive_greedy(model, p, NEW) for p in PROMPTS]


def test_decoding_a_model_built_unrolled(model, greedy):
  unrolled = random_model(dataclasses.replace(CFG, scan_layers=False))
  stacked = nnx.state(model.blocks)
  for i, block in enumerate(unrolled.blocks):  # layer i of the stack into block i
    nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
  unrolled.embed[...], unrolled.unembed[...] = model.embed[...], model.unembed[...]
  nnx.update(unrolled.final_norm, nnx.state(model.final_norm))
  assert decode.generate(unrolled, PROMPTS, max_new_tokens=NEW) == greedy


def test_stop_tokens_end_a_row_and_are_not_returned(model, greedy):
  stop = greedy[1][2]  # the third token of row 1
  got = decode.generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop])
  for row, expected in zip(got, greedy):
    cut = expected.index(stop) if stop in expected else len(expected)
    assert row == expected[:cut]


def test_sampling_is_reproducible_and_respects_top_k(model):
  sampling = decode.Sampling(temperature=1.5, top_k=2)
  a = decode.generate(model, PROMPTS, max_new_tokens=NEW, sampling=sampling, seed=3)
  assert a == decode.generate(model, PROMPTS, max_new_tokens=NEW, sampling=sampling, seed=3)
  first = np.asarray(forward(model, jnp.asarray([PROMPTS[0]]))[0, -1])
  assert a[0][0] in np.argsort(-first)[:2]


def test_bad_prompts_are_named(model):
  with pytest.raises(ValueError, match="vocabulary"):
    decode.generate(model, [[CFG.vocab_size]], max_new_tokens=2)
  with pytest.raises(ValueError, match="at least one token"):
    decode.generate(model, [[]], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------


def zero_mesh_config():
  sizes = {a: 0 for a in sharding.MESH_AXES}
  return ml_collections.ConfigDict({"ici": dict(sizes), "dcn": dict(sizes)})


sharding_of_q = {"fsdp": P(None, "fsdp", None, None), "tp": P(None, None, "tensor", None)}


@pytest.mark.parametrize("layout", list(sharding_of_q))
def test_sharded_decoding_gives_the_same_tokens(model, greedy, layout):
  rules = layouts.parse(layout)
  mesh = sharding.make_mesh(zero_mesh_config(), rules)
  graphdef, state = nnx.split(model)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.flax_rules()):
    placed = nnx.merge(graphdef, jax.device_put(state, convert.target_shardings(state)))
    assert placed.blocks.attn.q[...].sharding.spec == sharding_of_q[layout]
    assert decode.generate(placed, PROMPTS, max_new_tokens=NEW) == greedy  # 3 rows padded to 8
