"""model.attention='splash' (the Pallas kernel, run by Pallas' interpreter on CPU) computes what the
einsum attention computes, forward and backward, alone and under layouts; bad pairings fail early."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.model import attention
from spjax.model import model as model_lib
from spjax.train import program

CFG = dataclasses.replace(model_lib.SIZES["tiny"], dtype="float32", num_layers=2)
T = 128  # the kernel's block granularity


def packed_batch(rows=2):
  """Tokens, positions and segment ids of rows that pack two documents and end in padding."""
  tokens = jax.random.randint(jax.random.key(1), (rows, T), 0, CFG.vocab_size)
  segments = np.ones((rows, T), np.int32)
  segments[:, 50:110] = 2
  segments[:, 110:] = 0  # padding
  positions = np.concatenate([np.arange(50), np.arange(60), np.arange(18)])
  return tokens, jnp.asarray(np.broadcast_to(positions, (rows, T))), jnp.asarray(segments)


def loss_and_grads(impl):
  model = model_lib.Transformer(dataclasses.replace(CFG, attention=impl), nnx.Rngs(0))
  tokens, positions, segments = packed_batch()

  @nnx.jit
  def run(model):
    def loss(model):
      logits = model(tokens, positions, segments)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * (segments > 0))
    return nnx.value_and_grad(loss)(model)
  value, grads = run(model)
  return value, nnx.to_flat_state(grads)


def test_splash_matches_einsum_attention_forward_and_backward():
  ref_loss, ref_grads = loss_and_grads("xla")
  loss, grads = loss_and_grads("splash")
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for (path, g), (_, ref) in zip(grads, ref_grads):
    np.testing.assert_allclose(g[...], ref[...], atol=1e-6, rtol=1e-4, err_msg=str(path))


def forward_jaxpr(impl) -> str:
  model = model_lib.Transformer(dataclasses.replace(CFG, attention=impl), nnx.Rngs(0))
  tokens, positions, segments = packed_batch()
  graphdef, state = nnx.split(model)
  return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, positions, segments))(state))


def test_splash_is_the_kernel_in_the_traced_model():
  splash, xla = forward_jaxpr("splash"), forward_jaxpr("xla")
  assert "splash_mha_fwd" in splash and "pallas_call" in splash and "pallas_call" not in xla


def splash_config(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"model.attention": "splash", **overrides})
  return cfg


@pytest.mark.parametrize("overrides,needle", [
    ({"layout": "fsdp_sp"}, r"multiple of 128 x 2 context shards"),  # 64 queries per device
    ({"seq_len": 100}, "multiple of 128"),
    ({"model.dropout_rate": 0.1}, "model.dropout_rate"),
    ({"layout": "batch:data;act_heads:tensor", "mesh.ici.tensor": 2}, "act_kv_heads"),
])
def test_layouts_and_configs_splash_cannot_serve_fail_before_tracing(overrides, needle):
  with pytest.raises(ValueError, match=needle):
    program.build(splash_config(**overrides))


@pytest.mark.parametrize("overrides", [{}, {"model.attention": "xla"}])
def test_default_auto_and_explicit_xla_give_einsum_attention_on_cpu(overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict(overrides)
  prog = program.build(cfg)
  assert prog.model_cfg.attention == "xla"
  # ...and the model the steps trace was built with the resolved choice, not "auto".
  assert nnx.merge(prog.graphdef, prog.abstract_params).cfg.attention == "xla"


def test_kernel_flops_count_the_causal_blocks_only():
  # One 512-block: the whole square runs; four: 10 of 16 blocks.
  full = 2 * 2 * 1 * 1 * 512**2 * 64
  assert attention.kernel_flops("splash_mha_fwd_segmented", 1, 1, 512, 64) == full
  assert attention.kernel_flops("splash_mha_dkv_x", 1, 1, 2048, 64) == 4 * 2 * 2048**2 * 64 * 10 / 16
  with pytest.raises(ValueError, match="no FLOP count"):
    attention.kernel_flops("ragged_paged_attention", 1, 1, 512, 64)


# Context parallelism: fsdp_sp shards `length` over sequence=2 (tests/test_train.py holds it to the dp
# losses over 20 steps); these check the pieces.


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_balance_gives_shard_i_chunks_i_and_its_mirror_and_unbalance_inverts_it(cp):
  x = jnp.arange(2 * 16 * cp).reshape(2, 16 * cp)  # rows of positions 0..T-1, T = 2cp chunks of 8
  balanced = attention.balance(x, cp)
  np.testing.assert_array_equal(attention.unbalance(balanced, cp), x)
  per_shard = np.asarray(balanced[0]).reshape(cp, 2, 8)[:, :, 0] // 8  # chunk ids per device
  np.testing.assert_array_equal(per_shard, [[i, 2 * cp - 1 - i] for i in range(cp)])


def test_balanced_mask_is_causal_in_natural_positions_with_equal_work_per_shard():
  seq_len, cp, block = 1024, 4, 128
  mask = attention._BalancedCausalMask(seq_len, cp)
  dense = mask[:, :]  # [queries in balanced order, keys in natural order]
  natural = np.asarray(attention.balance(jnp.arange(seq_len)[None], cp))[0]
  np.testing.assert_array_equal(dense, natural[:, None] >= np.arange(seq_len)[None, :])
  # Blocks the kernel visits (any query may see any key of the block) per device's query shard.
  blocks = dense.reshape(seq_len // block, block, seq_len // block, block).any(axis=(1, 3))
  visited = blocks.reshape(cp, -1, blocks.shape[1]).sum(axis=(1, 2))
  assert len(set(visited.tolist())) == 1, visited  # 9 each; contiguous shards would visit 3, 7, 11, 15


def test_context_parallel_splash_gathers_keys_and_runs_the_kernel_per_query_shard():
  cfg = splash_config(layout="fsdp_sp", seq_len=256)
  prog = program.build(cfg)
  assert prog.model_cfg.attention == "splash"
  tokens = jnp.zeros((prog.global_batch, 256), jnp.int32)
  def forward(params):
    return nnx.merge(prog.graphdef, params)(tokens)
  with prog.activate():
    jaxpr = str(jax.make_jaxpr(prog._under_layout(forward))(prog.abstract_state()["params"]))
  assert "all_gather" in jaxpr and "splash_mha_fwd" in jaxpr


def test_auto_picks_context_parallel_splash_on_tpu_where_seq_len_allows():
  layout = program.layouts.parse("fsdp_sp")
  tpu = types.SimpleNamespace(shape={"sequence": 2, "fsdp": 4} | {a: 1 for a in (
      "data", "tensor", "expert", "stage")}, devices=np.array([types.SimpleNamespace(platform="tpu")]))
  auto = dataclasses.replace(CFG, attention="auto")
  assert attention.choose(auto, 2048, layout, tpu) == "splash"
  assert attention.choose(auto, 128, layout, tpu) == "xla"  # 64 queries per device: too few
