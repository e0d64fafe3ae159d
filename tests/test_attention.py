"""model.attention='splash' (the Pallas kernel, run by Pallas' interpreter on CPU) computes what the
einsum attention computes, forward and backward, alone and under layouts; bad pairings fail early."""

import dataclasses

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
    ({"layout": "fsdp_sp"}, "shards 'length'"),
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
