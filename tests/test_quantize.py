"""Weight-only int8 / int4 quantization: error bounds, logits, decoding, the quantized workdir."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spjax.compress import quantize as qz
from spjax.compress import workdirs
from spjax.convert import workdir as workdir_lib
from spjax.infer import decode
from spjax.model import model as model_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ),
                        capture_output=True, text=True, timeout=300)


def test_int8_per_channel_is_absmax_and_off_by_at_most_half_a_step():
  w = jax.random.normal(jax.random.key(0), (2, 64, 48)) * jnp.linspace(0.1, 3.0, 48)  # [L, D, F]
  q = qz.quantize_array(w, (-2,), 8, 0)  # contracts D: one scale per (layer, output channel)
  assert q.qvalue.dtype == jnp.int8 and q.scale.shape == (2, 1, 48)
  np.testing.assert_allclose(q.scale, jnp.max(jnp.abs(w), axis=1, keepdims=True) / 127, rtol=1e-6)
  assert int(jnp.max(jnp.abs(q.qvalue.astype(jnp.int32)))) == 127  # each channel's max hits 127
  error = jnp.abs(q[...] - w)
  assert bool(jnp.all(error <= q.scale / 2 * (1 + 1e-5)))
  assert float(jnp.max(error)) > 0  # really rounded


def test_int4_groups_have_one_scale_per_group_and_bound_the_error_by_group():
  w = jax.random.normal(jax.random.key(1), (256, 32))  # [D, F], contracted D in groups of 64
  w = w.at[:64, 0].mul(100.0)  # one loud group: only its scale grows
  q = qz.quantize_array(w, (-2,), 4, 64)
  assert q.qvalue.dtype == jnp.int4 and q.scale.shape == (4, 32)
  groups = w.reshape(4, 64, 32)
  np.testing.assert_allclose(q.scale, jnp.max(jnp.abs(groups), axis=1) / 7, rtol=1e-6)
  error = jnp.abs(q[...] - w).reshape(4, 64, 32)
  assert bool(jnp.all(error <= q.scale[:, None, :] / 2 * (1 + 1e-5)))
  assert float(jnp.max(error[1:, :, 0])) < float(jnp.max(error[0, :, 0])) / 20  # groups apart


def test_int8_products_from_integers_are_within_their_activation_rounding_bounds():
  w = jax.random.normal(jax.random.key(2), (96, 40))  # [K, N]
  q = qz.quantize_array(w, (-2,), 8, 0)
  dequantized = q[...]
  for m in (1, 3):  # one row takes the padded path of "int8"
    x = jax.random.normal(jax.random.key(3), (m, 96)) * jnp.linspace(0.1, 4.0, 96)
    exact = np.asarray(x @ dequantized, np.float64)
    # x is rounded per row to steps of max|x| / 127 (int8) or / (127 * 254) (int8x2, two limbs):
    # off by at most half a step per entry, so each output by that times sum_k |w_kn|.
    col = np.abs(np.asarray(dequantized)).sum(0)  # [N]
    top = np.abs(np.asarray(x)).max(-1, keepdims=True)  # [M, 1]
    errors = {}
    for mode, step in (("int8x2", 127 * 254), ("int8", 127)):
      y = np.asarray(qz.int8_matmul(x, q.qvalue, q.scale, mode), np.float64)
      assert y.shape == (m, 40)
      errors[mode] = np.abs(y - exact)
      assert np.all(errors[mode] <= top / step / 2 * col * 1.001 + 1e-5), mode
    assert errors["int8x2"].max() < errors["int8"].max() / 50  # the second limb really counts


def test_layers_multiply_by_int8_weights_as_the_spec_says():
  cfg = dataclasses.replace(model_lib.SIZES["tiny"], dtype="float32", scan_layers=False)
  graphdef, state = nnx.split(model_lib.Transformer(cfg, nnx.Rngs(0)))
  tokens = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 % 1024
  logits = {}
  for mode in qz.ACTIVATIONS:
    qstate = qz.quantize_params(state, qz.Spec(8, 0, False, mode))
    assert qstate["blocks"][0]["mlp"]["up"].get_raw_value().activations == mode
    logits[mode] = np.asarray(nnx.jit(lambda m: m(tokens))(nnx.merge(graphdef, qstate)))
  scale = np.abs(logits["float"]).max()
  assert np.abs(logits["int8x2"] - logits["float"]).max() / scale < 2e-4
  assert 2e-4 < np.abs(logits["int8"] - logits["float"]).max() / scale < 0.05  # w8a8 rounds x
  with pytest.raises(ValueError, match="activations 'int8x2' needs bits 8 per channel"):
    qz.Spec.from_dict({"bits": 4, "group_size": 128, "embeddings": False, "activations": "int8x2"})
  with pytest.raises(ValueError, match="activations must be one of float, int8x2, int8"):
    qz.Spec.from_dict({"bits": 8, "group_size": 0, "embeddings": False, "activations": "fp8"})
  assert qz.Spec.from_dict({"bits": 8, "group_size": 0, "embeddings": False}).activations == "float"


def test_each_matrix_contracts_its_input_axes_and_embeddings_only_when_asked():
  cfg = model_lib.SIZES["tiny"]
  abstract = nnx.state(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  q = qz.abstract(abstract, qz.Spec(4, 128, False))

  def at(*path):
    node = q
    for p in path:
      node = node[p]
    return node.get_raw_value()
  assert at("blocks", "attn", "o").axes == (-3, -2)  # [L, H, Dh, D] contracts H and Dh
  assert at("blocks", "attn", "o").scale.shape == (2, 8, 1, 128)  # groups of Dh = 16 per head
  assert at("blocks", "mlp", "down").scale.shape == (2, 4, 128)  # [L, F/128, D]
  assert at("blocks", "attn", "q").axes == (-3,)
  assert not isinstance(at("embed"), qz.QArray) and not isinstance(at("unembed"), qz.QArray)
  assert not isinstance(at("blocks", "attn_norm", "scale"), qz.QArray)
  with_embed = qz.abstract(abstract, qz.Spec(8, 0, True))
  assert with_embed["embed"].get_raw_value().scale.shape == (1024, 1)  # one scale per token row


def test_scales_carry_logical_names_so_a_layout_shards_them():
  from spjax.parallel import layouts
  cfg = model_lib.SIZES["tiny"]
  abstract = nnx.state(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))), nnx.Param)
  with workdirs.layout_scope("tp") as (mesh, layout):
    shardings = qz.shardings(qz.abstract(abstract, qz.Spec(8, 0, False)), mesh, layouts.parse("tp"))
  up = shardings["blocks"]["mlp"]["up"].get_raw_value()  # [L, D, F]: mlp over tensor
  assert up.qvalue.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  assert up.scale.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  down = shardings["blocks"]["mlp"]["down"].get_raw_value()  # [L, F, D]: its scale [L, 1, D]
  assert down.qvalue.spec == jax.sharding.PartitionSpec(None, "tensor", None)
  assert down.scale.spec == jax.sharding.PartitionSpec(None, None, None)


@pytest.fixture(scope="module")
def quantized(trained_workdir, tmp_path_factory):
  """{bits: quantized workdir} written by the command: int8 per channel (its layers multiplying by
  two int8 limbs of x, the default), int4 in groups."""
  out = {}
  for bits in (8, 4):
    directory = tmp_path_factory.mktemp(f"int{bits}")
    result = command("tools/quantize.py", f"--workdir={trained_workdir}", f"--bits={bits}",
                     f"--out={directory}", f"--json={directory}/bytes.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights" in result.stdout and "scales" in result.stdout
    out[bits] = directory
  return out


def test_the_quantized_checkpoint_holds_integers_and_scales(quantized):
  config = json.load(open(quantized[4] / "config.json"))
  assert config["quantization"] == {"bits": 4, "group_size": 128, "embeddings": False,
                                    "activations": "float"}
  assert json.load(open(quantized[8] / "config.json"))["quantization"]["activations"] == "int8x2"
  from spjax.train import checkpoint
  meta = checkpoint.Checkpointer(str(quantized[8]), max_to_keep=1, save_every_steps=1).metadata(20)
  up = meta["params"]["blocks"]["mlp"]["up"]["value"]
  assert up["qvalue"].dtype == np.int8 and up["scale"].dtype == np.float32
  sizes = json.load(open(quantized[8] / "bytes.json"))
  assert sizes["scales"] > 0 and sizes["weights"] < 0.6 * sizes["float"]
  sizes4 = json.load(open(quantized[4] / "bytes.json"))
  assert sizes4["weights"] < sizes["weights"]


def test_inspect_checkpoint_counts_int4_at_half_a_byte(quantized):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import inspect_checkpoint
  for bits in (8, 4):
    row = next(line.split() for line in inspect_checkpoint.describe(str(quantized[bits])).splitlines()
               if "params/blocks/mlp/up/value/qvalue " in line)
    shape = [int(n.strip("(),")) for n in row[1:] if n.strip("(),").isdigit()]
    assert row[-1] == f"{int(np.prod(shape)) * bits // 8:,}"


def test_int8_logits_are_close_to_float_and_int4_further(trained_workdir, quantized):
  tokens = np.arange(64, dtype=np.int32).reshape(2, 32) * 13 % 1024
  logits = {}
  for name, directory in [("fp32", trained_workdir), (8, quantized[8]), (4, quantized[4])]:
    model, _ = workdir_lib.load(str(directory))
    logits[name] = np.asarray(nnx.jit(lambda m: m(tokens))(model))
  scale = np.abs(logits["fp32"]).max()
  err8 = np.abs(logits[8] - logits["fp32"]).max() / scale
  err4 = np.abs(logits[4] - logits["fp32"]).max() / scale
  assert 0 < err8 < 0.02 and err8 < err4 < 0.2, (err8, err4)
  assert np.mean(logits[8].argmax(-1) == logits["fp32"].argmax(-1)) > 0.95


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_decode_equals_decoding_the_dequantized_weights(quantized, bits):
  """int4 dequantizes inside the layers: the same arithmetic. int8 (int8x2) multiplies by the
  integers with x rounded to ~15 bits: its logits within 2e-4 of the dequantized weights' (the
  greedy tokens could part on a near tie; on this model they do not)."""
  model, _ = workdir_lib.load(str(quantized[bits]))
  graphdef, state = nnx.split(model)
  assert {v.activations for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(
      v, qz.QArray)) if isinstance(v, qz.QArray)} == {"int8x2" if bits == 8 else "float"}
  dequantized = nnx.merge(graphdef, jax.tree.map(
      lambda v: v.dequantize() if isinstance(v, qz.QArray) else v, state,
      is_leaf=lambda v: isinstance(v, qz.QArray)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(dequantized)))
  prompts = [[1, 5, 9, 200], [3, 7]]
  ours = decode.generate(model_lib.unrolled(model), prompts, max_new_tokens=12)
  reference = decode.generate(dequantized, prompts, max_new_tokens=12)
  assert ours == reference and len(ours[0]) == 12
  tokens = np.asarray([prompts[0] + ours[0]])
  logits = [np.asarray(nnx.jit(lambda m: m(tokens))(m)) for m in (model, dequantized)]
  assert np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max() < 2e-4


def test_bad_bits_and_requantizing_exit_2(trained_workdir, quantized, tmp_path):
  result = command("tools/quantize.py", f"--workdir={trained_workdir}", "--bits=3",
                   f"--out={tmp_path}/q")
  assert result.returncode == 2 and "bits must be 8 or 4, got 3" in result.stderr
  result = command("tools/quantize.py", f"--workdir={quantized[8]}", "--bits=4",
                   f"--out={tmp_path}/q")
  assert result.returncode == 2 and "is quantized already" in result.stderr
  result = command("tools/quantize.py", f"--workdir={trained_workdir}", "--bits=4",
                   "--activations=int8", f"--out={tmp_path}/q")
  assert result.returncode == 2 and "activations 'int8' needs bits 8 per channel" in result.stderr
