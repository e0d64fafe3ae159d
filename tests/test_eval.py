"""spjax-eval: the train loop's evaluation for one checkpoint, raw or EMA; the EMA itself."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from spjax.infer import evaluate
from spjax.train import program as program_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(module, *flags):
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=dict(os.environ),
                        capture_output=True, text=True, timeout=300)


def logged_eval(workdir, step):
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return next(m for m in lines if m["step"] == step and "eval/loss" in m)


def test_spjax_eval_writes_the_metrics_keys_and_matches_the_train_loop(trained_workdir, tmp_path):
  out = tmp_path / "eval.json"
  result = command("spjax.infer.evaluate", f"--workdir={trained_workdir}", "--step=10",
                   f"--json={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  metrics = json.loads(out.read_text())
  assert set(metrics) == {"step", "eval/loss", "eval/perplexity"} and metrics["step"] == 10
  logged = logged_eval(trained_workdir, 10)
  np.testing.assert_allclose(metrics["eval/loss"], logged["eval/loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["eval/perplexity"], np.exp(metrics["eval/loss"]), rtol=1e-6)
  assert "eval at step 10 | loss" in result.stdout


def test_ema_flag_evaluates_the_moving_average_the_loop_logged(trained_workdir):
  config = ml_collections.ConfigDict(
      json.load(open(os.path.join(trained_workdir, "config.json"))))
  out = evaluate.evaluate_workdir(config, str(trained_workdir), 20, ema=True)
  logged = logged_eval(trained_workdir, 20)
  np.testing.assert_allclose(out["eval/loss"], logged["eval/ema/loss"], rtol=1e-5)
  assert abs(logged["eval/ema/loss"] - logged["eval/loss"]) > 1e-3  # really another set of params


def test_bad_overrides_and_steps_exit_2_naming_them(trained_workdir):
  result = command("spjax.infer.evaluate", f"--workdir={trained_workdir}", "--config.bogus=1")
  assert result.returncode == 2 and "unknown config key bogus" in result.stderr
  result = command("spjax.infer.evaluate", f"--workdir={trained_workdir}", "--step=7")
  assert result.returncode == 2 and "no checkpoint at step 7; it has [10, 20]" in result.stderr


def test_several_domains_get_their_own_keys_and_the_mixture_weights_the_total():
  class Batches:  # two domains, each batch's (nll_sum, tokens) known
    def __init__(self, sums):
      self.sums = sums

    def __iter__(self):
      return iter(self.sums)
  evaluation = object.__new__(evaluate.Evaluation)
  evaluation.batches, evaluation._to_global = 2, lambda b: b
  evaluation.sets = {"a": Batches([(2.0, 1.0), (4.0, 1.0), (100.0, 1.0)]),
                     "b": Batches([(1.0, 2.0), (1.0, 2.0)])}
  evaluation.weights = {"a": 0.25, "b": 0.75}
  out, _ = evaluation(lambda params, b: {"nll_sum": b[0], "tokens": b[1]}, None, "eval/ema")
  assert out["eval/ema/a/loss"] == 3.0 and out["eval/ema/b/loss"] == 0.5  # 2 batches each
  np.testing.assert_allclose(out["eval/ema/loss"], 0.25 * 3.0 + 0.75 * 0.5)
  np.testing.assert_allclose(out["eval/ema/b/perplexity"], np.exp(0.5))


def test_ema_matches_a_hand_computed_average_over_a_few_steps():
  config = default.get_config("tiny")
  config.ema_decay, config.model.dtype = 0.7, "float32"
  prog = program_lib.build(config)
  rng = np.random.default_rng(0)
  with prog.activate():
    state = prog.jit_init()()
    step = prog.jit_train_step()
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    expected = flat(state["params"])
    assert np.array_equal(flat(state["ema_params"]), expected)  # starts at the initial params
    for _ in range(3):
      tokens = rng.integers(0, 1024, (prog.global_batch, config.seq_len + 1)).astype(np.int32)
      batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
               "segment_ids": np.ones_like(tokens[:, 1:]), "loss_mask": np.ones_like(tokens[:, 1:]),
               "positions": np.broadcast_to(np.arange(config.seq_len), tokens[:, 1:].shape)}
      state, _ = step(state, {k: jax.device_put(v, prog.batch_sharding) for k, v in batch.items()})
      expected = 0.7 * expected + 0.3 * flat(state["params"])
    np.testing.assert_allclose(flat(state["ema_params"]), expected, rtol=1e-6, atol=1e-7)
    assert prog.state_shardings["ema_params"] == prog.state_shardings["params"]
    assert not np.allclose(flat(state["ema_params"]), flat(state["params"]))


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_ema_decay_outside_0_1_is_named(decay):
  config = default.get_config("tiny")
  config.ema_decay = decay
  with pytest.raises(ValueError, match="config.ema_decay must be in"):
    program_lib.build(config)
