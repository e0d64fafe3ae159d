"""Parity with Hugging Face transformers (CPU torch, fp32): small random Llama and GPT-NeoX models
converted both ways give the same logits and the same greedy tokens. Needs the `[hf]` extra."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="HF parity needs the [hf] extra (torch, transformers)")
transformers = pytest.importorskip("transformers",
                                   reason="HF parity needs the [hf] extra (torch, transformers)")

from spjax.convert import hf  # noqa: E402
from spjax.infer import decode  # noqa: E402
from spjax.model import model as model_lib  # noqa: E402

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, bos_token_id=None, eos_token_id=None, pad_token_id=None)
HF_CONFIGS = {
    "llama_gqa_bias": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_theta=500.0, attention_bias=True, mlp_bias=True),
    "llama_tied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True,
                                                   hidden_act="gelu_pytorch_tanh"),
    "neox_parallel": lambda: transformers.GPTNeoXConfig(**SMALL, rotary_pct=0.25),
    "neox_sequential": lambda: transformers.GPTNeoXConfig(
        **SMALL, rotary_pct=0.5, use_parallel_residual=False, attention_bias=False),
}
PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38, 32]]
NEW = 8


def random_hf_model(name):
  """HF initialises norms to 1 and biases to 0, which would hide mapping mistakes: randomise all."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]())
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  return model.eval()


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def pair(request, tmp_path_factory):
  """(HF model, the spjax model imported from its saved directory, the config, that directory)."""
  ref = random_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(path)
  model, cfg = hf.from_pretrained(str(path))
  return ref, model, cfg, path


def hf_logits(ref, tokens):
  with torch.no_grad():
    return ref(torch.tensor(np.asarray(tokens))).logits.numpy()


def tokens(cfg, seed=0):
  return np.random.RandomState(seed).randint(0, cfg.vocab_size, (2, 12))


def test_imported_model_gives_the_same_logits(pair):
  ref, model, cfg, _ = pair
  x = tokens(cfg)
  got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))  # [B, T, V]
  assert got.shape == (2, 12, cfg.vocab_size)
  np.testing.assert_allclose(got, hf_logits(ref, x), atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_identical_weights(pair, tmp_path):
  ref, model, cfg, _ = pair
  hf.save_pretrained(model, cfg, str(tmp_path))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(back) is type(ref)
  want, got = ref.state_dict(), back.state_dict()
  assert want.keys() == got.keys()
  for name in want:
    torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_greedy_generation_matches_token_for_token(pair):
  ref, model, _, _ = pair
  ours = decode.generate(model, PROMPTS, max_new_tokens=NEW)  # one left-padded batch
  for prompt, row in zip(PROMPTS, ours):
    with torch.no_grad():
      out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0)
    assert row == out[0, len(prompt):].tolist()


def test_native_spjax_model_exports_and_reimports(tmp_path):
  """A model spjax trained (unrolled layers, bf16 storage) round-trips through the HF format."""
  cfg = dataclasses.replace(model_lib.SIZES["tiny"], vocab_size=101, dtype="float32",
                            param_dtype="bfloat16", scan_layers=False)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))))
  rng = np.random.RandomState(1)
  model = nnx.merge(graphdef, jax.tree.map(
      lambda a: jnp.asarray(rng.normal(0, 0.3, a.shape), a.dtype), abstract))
  hf.save_pretrained(model, cfg, str(tmp_path), extra_config={"max_position_embeddings": 128})
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  x = tokens(cfg, seed=2)
  np.testing.assert_allclose(hf_logits(back.eval(), x), np.asarray(model(jnp.asarray(x))),
                             atol=1e-4, rtol=0)
  again, again_cfg = hf.from_pretrained(str(tmp_path), param_dtype="bfloat16")
  assert dataclasses.replace(again_cfg, scan_layers=False) == cfg
  np.testing.assert_array_equal(again.blocks.mlp.up[...][1], model.blocks[1].mlp.up[...])


def test_unsupported_configs_are_refused_with_a_reason(tmp_path):
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    hf.config_from_hf({"model_type": "gpt2"})
  llama = random_hf_model("llama_tied").config.to_dict()
  with pytest.raises(ValueError, match="RoPE scaling"):
    hf.config_from_hf(llama | {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
  cfg = dataclasses.replace(model_lib.SIZES["tiny"], parallel_residual=True)
  with pytest.raises(ValueError, match="no Hugging Face architecture"):
    hf.config_to_hf(cfg)
