"""LoRA adapters and NEFTune: layouts agree, only adapters train, checkpoints, merge and export."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.convert import hf
from spjax.convert import workdir as workdir_lib
from spjax.data import pipeline, tokenizer
from spjax.model import layers
from spjax.model import model as model_lib
from spjax.train import checkpoint as checkpoint_lib
from spjax.train import loop as train
from spjax.train import program
from spjax.train import step as step_lib
from spjax.tune import lora

import residuals
import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"model.dtype": "float32", "lora.rank": 4, **overrides})
  return cfg


def run_layout(layout, steps=10, **overrides):
  """(losses, initial params, final state) of `steps` LoRA train steps on embedded-corpus data."""
  return test_train.run_layout(layout, steps, **{"lora.rank": 4, "optimizer.warmup_steps": 2,
                                                  **overrides})


@pytest.fixture(scope="module")
def dp_run():
  return run_layout("dp")


@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_lora_under_other_layouts_gives_the_dp_losses_and_init(dp_run, layout):
  losses, params, state = run_layout(layout)
  ref_losses, ref_params, _ = dp_run
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)  # adapters and base, bitwise
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert ref_losses[-1] < ref_losses[0] - 0.05  # the adapters learn
  # Adapters are laid out by their logical names, stacked along layers like their kernels.
  a = state["params"]["blocks"]["attn"]["q_lora"]["lora_a"]
  b = state["params"]["blocks"]["attn"]["q_lora"]["lora_b"]
  assert a.get_metadata()["out_sharding"] == ("layers", "embed", "lora_rank")
  assert b.get_metadata()["out_sharding"] == ("layers", "lora_rank", "heads", "head_dim")
  if layout == "fsdp":  # embed 128 over 8 devices
    assert a[...].addressable_shards[0].data.shape == (2, 16, 4)
  else:  # heads 8 over tensor=4
    assert b[...].addressable_shards[0].data.shape == (2, 4, 2, 16)


def test_base_weights_stay_bit_identical_and_only_adapters_have_optimizer_state(dp_run):
  _, init_params, state = dp_run
  final = jax.device_get(state["params"])
  jax.tree.map(np.testing.assert_array_equal, nnx.filter_state(final, lora.BASE),
               nnx.filter_state(init_params, lora.BASE))
  adapters = nnx.to_flat_state(nnx.filter_state(final, lora.ADAPTERS))
  kernels = {"q", "k", "v", "o", "gate", "up", "down"}  # the default targets: every kernel
  assert {path[-2] for path, _ in adapters} == {f"{k}_lora" for k in kernels}
  assert all(np.any(v[...] != 0) for path, v in adapters if path[-1] == "lora_b")  # B moved off 0
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert len(moments) == 2 * len(adapters)  # Adam's mu and nu, of the adapters only
  assert sum(x.size for x in moments) == 2 * sum(v[...].size for _, v in adapters)


def test_merged_adapters_compute_what_the_adapted_model_does():
  """Scanned and unrolled stacks, every kernel kind (q [D,H,Dh], o [H,Dh,D], MLP matrices)."""
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 1024)
  for scan in (True, False):
    cfg = tiny(**{"model.scan_layers": scan, "lora.dropout": 0.5})
    model_cfg = program.check_config(cfg)
    model = lora.attach(model_lib.Transformer(model_cfg, nnx.Rngs(0)), cfg.lora, 0)
    base = jax.device_get(nnx.state(model, lora.BASE))
    for path, var in nnx.to_flat_state(nnx.state(model, lora.ADAPTERS)):  # B = 0 would hide bugs
      if path[-1] == "lora_b":
        var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.02
    adapted = model(tokens)  # eval: no adapter dropout
    merged = lora.merge(model)
    assert not nnx.state(merged, lora.ADAPTERS)  # a plain Transformer again
    np.testing.assert_allclose(merged(tokens), adapted, atol=2e-5)
    changed = [p for p, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))
               if not np.array_equal(v[...], dict(nnx.to_flat_state(base))[p][...])]
    assert len(changed) == 7 * (1 if scan else model_cfg.num_layers)  # every kernel, nothing else


def test_adapter_only_checkpoint_is_small_resumes_and_exports_merged(tmp_path):
  source = model_lib.Transformer(model_lib.ModelConfig.from_config(tiny().model), nnx.Rngs(7))
  hf.save_pretrained(source, source.cfg, str(tmp_path / "base"))
  cfg = tiny(num_train_steps=4, checkpoint_every_steps=2, log_every_steps=1, eval_every_steps=4,
             eval_batches=1, init_from=str(tmp_path / "base"),
             **{"optimizer.warmup_steps": 1, "lora.rank": 2})
  run = str(tmp_path / "run")
  train.train_and_evaluate(cfg, run)
  losses = train_losses(run)

  # Only adapters and their moments are saved: a small fraction of a full fine-tuning state.
  ckpt = checkpoint_lib.Checkpointer(run, max_to_keep=3, save_every_steps=2)
  saved = ckpt.metadata(4)
  assert all("_lora" in jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(saved["params"])[0])
  full = program.build(tiny(**{"lora.rank": 0})).abstract_state()
  assert array_bytes(saved) < 0.02 * array_bytes(full), (array_bytes(saved), array_bytes(full))

  # The adapted model of the last checkpoint, restored as a resumed run does: base from init_from.
  prog = program.build(cfg)
  tokens = np.random.default_rng(2).integers(0, 1024, (8, 32))  # a row per device
  with prog.activate():
    state = prog.restore(ckpt, 4)
    jax.tree.map(np.testing.assert_array_equal, nnx.filter_state(state["params"], lora.BASE),
                 nnx.state(source, nnx.Param))  # the base, bit for bit
    adapted = nnx.merge(prog.graphdef, state["params"])(tokens)
  # The base is checked: adapters trained on one base never resume on another.
  with pytest.raises(ValueError, match="trained on the base weights of .*/base, but this run's "
                                       "base is config.seed=0"):
    program.build(cfg_with(cfg, init_from="")).restore(ckpt, 4)
  with pytest.raises(ValueError, match="holds LoRA adapters only; resume it with the config.lora"):
    program.build(cfg_with(cfg, **{"lora.rank": 0})).restore(ckpt, 4)
  ckpt.close()

  # spjax-convert-hf writes the merged model; its logits are the adapted model's.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-m", "spjax.convert.export", f"--workdir={run}",
                           f"--out={tmp_path / 'hf'}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  exported, _ = hf.from_pretrained(str(tmp_path / "hf"))
  np.testing.assert_allclose(exported(tokens), adapted, atol=2e-5)
  assert not np.allclose(source(tokens), adapted, atol=1e-3)  # and they differ from the base's

  # Resume: drop the last checkpoint, rerun, and steps 3-4 repeat exactly.
  merged_before = nnx.state(workdir_lib.load(run)[0], nnx.Param)
  shutil.rmtree(f"{run}/checkpoints/4")
  train.train_and_evaluate(cfg, run)
  resumed = train_losses(run)[len(losses):]
  np.testing.assert_allclose(resumed, losses[2:], rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(workdir_lib.load(run)[0], nnx.Param),
               merged_before)


def saved_bytes(rank):
  """Bytes of the activations the backward reads (not the arguments), as jax prints them."""
  prog = program.build(tiny(**{"lora.rank": rank, "model.remat_policy": "save_dots_no_batch"}),
                       jax.devices()[:1])
  with prog.activate():
    params, base = nnx.split_state(prog.abstract_state()["params"], prog.trainable, ...)
    loss = lambda p, b, batch: step_lib.loss_sums(p, prog.graphdef, batch, None, 0.0, base=b)[0]
    kept = residuals.saved(loss, params, base, prog.abstract_batch())
  return prog, sum(r.nbytes for r in kept if not r.is_argument)


def test_save_dots_no_batch_keeps_only_the_adapters_rank_wide_inputs():
  """An adapter's [B, T, r] x [r, out] is recomputed, not a second saved [B, T, out] per kernel."""
  full, full_bytes = saved_bytes(0)
  lora_prog, lora_bytes = saved_bytes(8)
  m, c = full.model_cfg, full.config
  # 6 adapted kernels per layer keep their f32 [B, T, r] (q, k, v, gate, up, down); o's adapter
  # is recomputed with o's own product, as o's output is under this policy.
  assert lora_bytes - full_bytes == 6 * m.num_layers * full.global_batch * c.seq_len * 8 * 4


def test_neftune_noise_has_the_papers_scale_and_is_off_at_eval():
  x = jnp.zeros((4, 64, 128))
  noise = layers.neftune(x, 5.0, jax.random.key(0))
  bound = 5.0 / np.sqrt(64 * 128)  # alpha / sqrt(T * d_model)
  assert 0.99 * bound < float(jnp.max(jnp.abs(noise))) <= bound
  np.testing.assert_allclose(float(jnp.std(noise)), bound / np.sqrt(3), rtol=0.02)  # uniform
  np.testing.assert_allclose(float(jnp.mean(noise)), 0.0, atol=0.01 * bound)
  assert layers.neftune(x, 5.0, None) is x and layers.neftune(x, 0.0, jax.random.key(0)) is x

  cfg = tiny(**{"lora.rank": 0, "neftune_alpha": 5.0, "per_device_batch_size": 1, "seq_len": 32})
  model = model_lib.Transformer(program.check_config(cfg), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 1024)
  key = jax.random.key(3)
  clean = model(tokens)
  np.testing.assert_array_equal(model(tokens, neftune_alpha=5.0), clean)  # eval: no key, no noise
  noisy = model(tokens, dropout_key=key, neftune_alpha=5.0)
  assert not np.allclose(noisy, clean, atol=1e-4)
  np.testing.assert_array_equal(model(tokens, dropout_key=key, neftune_alpha=5.0), noisy)

  # Wired through the Program: the train step's loss sees the noise, the eval step's never does.
  losses = {}
  for alpha in (0.0, 5.0):
    prog = program.build(cfg_with(cfg, neftune_alpha=alpha))
    batch = next(iter(pipeline.make_dataset(prog.config, "train", tokenizer.load(""),
                                            batch_size=prog.global_batch)))
    with prog.activate():
      state = prog.jit_init()()
      batch = {k: jax.device_put(v, prog.batch_sharding) for k, v in batch.items()}
      evaluated = prog.jit_eval_step()(state["params"], batch)
      _, metrics = prog.jit_train_step()(state, batch)
    losses[alpha] = (float(metrics["loss"]), float(evaluated["nll_sum"]))
  assert losses[5.0][0] != losses[0.0][0]
  assert losses[5.0][1] == losses[0.0][1]


@pytest.mark.parametrize("overrides,needle", [
    ({"lora.rank": -1}, "lora.rank must be an integer >= 0"),
    ({"lora.rank": 65}, r"lora.rank=65 is not low rank for blocks/attn/k \(128 inputs x 64"),
    ({"lora.alpha": 0.0}, "lora.alpha must be > 0"),
    ({"lora.dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
    ({"lora.targets": ("attn/q$", "mlp/nope")}, "'mlp/nope' matches no kernel; kernels: "
                                                "blocks/attn/k, blocks/attn/o"),
    ({"lora.targets": ("attn/(q",)}, "not a regular expression"),
    ({"lora.targets": ()}, "non-empty tuple of regexes"),
    ({"neftune_alpha": -1.0}, "config.neftune_alpha must be >= 0"),
])
def test_bad_lora_config_is_refused_before_anything_is_built(overrides, needle):
  with pytest.raises(ValueError, match=needle):
    program.check_config(tiny(**overrides))


def test_cli_lora_targets_flag_and_its_error(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-m", "spjax.main", "--config=configs/default.py:tiny",
                           f"--workdir={tmp_path}", "--config.lora.rank=4",
                           "--config.lora.targets=('attn/q$', 'attn/zz')"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "lora.targets: 'attn/zz' matches no kernel" in result.stderr
  assert "Traceback" not in result.stderr + result.stdout


def cfg_with(cfg, **overrides):
  cfg = cfg.copy_and_resolve_references()
  cfg.update_from_flattened_dict(overrides)
  return cfg


def train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [m["train/loss"] for m in map(json.loads, f) if "train/loss" in m]


def array_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
