"""Parity with Hugging Face Mixtral (CPU torch, fp32): a small random MixtralForCausalLM converted
both ways gives the same logits, tensors and greedy tokens; a run starts from one and exports one.
Needs the `[hf]` extra."""

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

torch = pytest.importorskip("torch", reason="HF parity needs the [hf] extra (torch, transformers)")
transformers = pytest.importorskip("transformers",
                                   reason="HF parity needs the [hf] extra (torch, transformers)")

from configs import default  # noqa: E402
from spjax.convert import hf, safetensors_io  # noqa: E402
from spjax.convert import workdir as workdir_lib  # noqa: E402
from spjax.infer import decode  # noqa: E402
from spjax.model import model as model_lib  # noqa: E402
from spjax.train import loop as train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E, K = 4, 2


SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
             num_experts_per_tok=K, max_position_embeddings=64, router_aux_loss_coef=0.02,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)


def random_mixtral():
  """HF initialises norms to 1, which would hide mapping mistakes: every tensor random."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**SMALL))
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(HF model, the directory it saved itself to, spjax's import of that directory, its config)."""
  ref = random_mixtral()
  path = tmp_path_factory.mktemp("mixtral")
  ref.save_pretrained(path)
  model, cfg = hf.from_pretrained(str(path))
  return ref, path, model, cfg


def hf_logits(ref, tokens, **kwargs):
  with torch.no_grad():
    return ref(torch.tensor(np.asarray(tokens)), **kwargs)


def tokens(vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, (2, 12))


def test_import_sets_the_moe_fields_and_dropless_routing(pair):
  _, _, _, cfg = pair
  assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_every, cfg.capacity_factor) == (E, K, 1,
                                                                                          0.0)
  assert cfg.moe_lb_loss_weight == pytest.approx(0.02 * K) and cfg.moe_z_loss_weight == 0.0
  assert cfg.rope_theta == 1e6 and not cfg.attn_bias  # Mixtral's default theta, no biases


@pytest.mark.parametrize("scan_layers", [True, False])
def test_imported_model_gives_the_same_logits(pair, scan_layers):
  ref, path, model, cfg = pair
  if not scan_layers:
    model, _ = hf.from_pretrained(str(path), scan_layers=False)
  x = tokens(cfg.vocab_size)
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))  # [B, T, V]
  assert got.shape == (2, 12, cfg.vocab_size)
  np.testing.assert_allclose(got, hf_logits(ref, x).logits.numpy(), atol=1e-4, rtol=0)


def test_load_balance_weight_scales_like_hf_aux_loss(pair):
  """Per layer HF's aux loss is k x spjax's lb_loss: weight x lb_loss = coef x HF's loss."""
  ref, _, model, cfg = pair
  x = tokens(cfg.vocab_size, seed=1)
  model(jnp.asarray(x))
  ours = float(model.moe_aux.get_value()["lb_loss"])  # mean over the layers
  func = sys.modules[type(ref).__module__].load_balancing_loss_func
  per_layer = [float(func((logits,), E, K)) for logits in
               hf_logits(ref, x, output_router_logits=True).router_logits]
  assert cfg.moe_lb_loss_weight * ours == pytest.approx(0.02 * np.mean(per_layer), rel=1e-5)


def test_export_loads_in_transformers_with_identical_weights(pair, tmp_path):
  ref, _, model, cfg = pair
  hf.save_pretrained(model, cfg, str(tmp_path), extra_config={"max_position_embeddings": 64})
  names = safetensors_io.load(str(tmp_path / "model.safetensors"))
  assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names  # the Hub's layout
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(back) is type(ref)
  want, got = ref.state_dict(), back.state_dict()
  assert want.keys() == got.keys()
  for name in want:
    torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
  assert back.config.router_aux_loss_coef == pytest.approx(0.02)
  assert back.config.sliding_window is None and back.config.num_local_experts == E
  x = tokens(cfg.vocab_size, seed=2)
  np.testing.assert_array_equal(hf_logits(back, x).logits.numpy(), hf_logits(ref, x).logits.numpy())


def test_fused_expert_layout_of_transformers_5_imports_the_same(pair, tmp_path):
  ref, path, model, _ = pair
  fused = {n: t.numpy() for n, t in ref.state_dict().items()}  # mlp.experts.gate_up_proj ...
  assert "model.layers.0.mlp.experts.gate_up_proj" in fused
  safetensors_io.save(fused, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  again, _ = hf.from_pretrained(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(again, nnx.Param),
               nnx.state(model, nnx.Param))


def test_greedy_generation_matches_token_for_token(pair):
  ref, _, model, _ = pair
  prompts = [[3, 14, 15, 92, 65], [35, 89]]
  ours = decode.generate(model, prompts, max_new_tokens=6)  # one left-padded batch
  for prompt, row in zip(prompts, ours):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    assert row == out[0, len(prompt):].tolist()


def test_config_round_trips():
  cfg = dataclasses.replace(model_lib.SIZES["tiny"], num_experts=8, experts_per_token=2,
                            moe_lb_loss_weight=0.04, moe_z_loss_weight=0.0, rope_theta=5e5,
                            dtype="float32")
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  dense = dataclasses.replace(cfg, num_experts=0)  # the Llama branch Mixtral shares
  for spjax_cfg, hf_class in ((cfg, transformers.MixtralConfig), (dense, transformers.LlamaConfig)):
    fields = set(hf_class().to_dict()) | {"rope_theta"}  # the pre-5.0 spelling, also written
    assert set(hf.config_to_hf(spjax_cfg)) <= fields, set(hf.config_to_hf(spjax_cfg)) - fields
  hf_cfg = transformers.MixtralConfig(**SMALL | {"num_experts_per_tok": 3}).to_dict()
  back = hf.config_to_hf(hf.config_from_hf(hf_cfg))
  for key in ("num_local_experts", "num_experts_per_tok", "hidden_size", "num_key_value_heads",
              "intermediate_size", "rms_norm_eps", "model_type", "rope_parameters"):
    assert back[key] == hf_cfg[key], key
  assert back["architectures"] == ["MixtralForCausalLM"]
  assert back["router_aux_loss_coef"] == pytest.approx(hf_cfg["router_aux_loss_coef"])


def test_what_spjax_cannot_compute_is_refused_with_the_field(pair, tmp_path):
  _, path, _, cfg = pair
  mixtral = json.loads((path / "config.json").read_text())
  with pytest.raises(ValueError, match="sliding_window=16 is smaller than max_position_embed"):
    hf.config_from_hf(mixtral | {"sliding_window": 16})
  assert hf.config_from_hf(mixtral | {"sliding_window": 64}).num_experts == E  # covers all
  with pytest.raises(ValueError, match="router_jitter_noise=0.1"):
    hf.config_from_hf(mixtral | {"router_jitter_noise": 0.1})
  with pytest.raises(ValueError, match=r"model.experts_per_token must be in \[1, model.num_exp"):
    hf.config_from_hf(mixtral | {"num_experts_per_tok": 5})
  tensors = dict(safetensors_io.load(str(path / "model.safetensors")))
  del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
  safetensors_io.save(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(mixtral))
  with pytest.raises(ValueError, match=r"experts\.2\.w3\.weight is missing"):
    hf.from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=r"MixtralForCausalLM needs model.parallel_residual=False"):
    hf.config_to_hf(dataclasses.replace(cfg, parallel_residual=True))


def test_run_starts_from_a_mixtral_directory_and_exports_one(tmp_path):
  """init_from=<HF Mixtral dir> trains from its weights; spjax-convert-hf writes them back."""
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({
      "num_train_steps": 1, "eval_every_steps": 1, "eval_batches": 1, "model.dtype": "float32",
      "model.num_experts": E, "model.experts_per_token": K,
      "optimizer.learning_rate": 0.0})  # the step leaves the params as loaded
  source = model_lib.Transformer(model_lib.ModelConfig.from_config(cfg.model), nnx.Rngs(7))
  hf.save_pretrained(source, source.cfg, str(tmp_path / "hf"))
  cfg.init_from = str(tmp_path / "hf")
  train.train_and_evaluate(cfg, str(tmp_path / "run"))
  trained, _ = workdir_lib.load(str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(trained, nnx.Param),
               nnx.state(source, nnx.Param))

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-m", "spjax.convert.export",
                           f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "wrote mixtral model" in result.stdout
  written, exported = (safetensors_io.load(str(tmp_path / d / "model.safetensors"))
                       for d in ("hf", "out"))
  assert written.keys() == exported.keys()
  for name in written:
    np.testing.assert_array_equal(exported[name], written[name], err_msg=name)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  x = tokens(cfg.model.vocab_size, seed=3)
  np.testing.assert_allclose(hf_logits(back, x).logits.numpy(), np.asarray(source(jnp.asarray(x))),
                             atol=1e-4, rtol=0)
