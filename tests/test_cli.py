"""The installed commands a user chains: spjax-train -> spjax-generate, spjax-convert-hf."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from spjax.convert import hf, workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(module, *flags):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  run = tmp_path_factory.mktemp("run")
  result = command("spjax.main", "--config=configs/default.py:tiny", f"--workdir={run}",
                   "--config.num_train_steps=3", "--config.eval_every_steps=3",
                   "--config.model.dtype=float32")  # HF import computes in fp32: exact compare
  assert result.returncode == 0, result.stderr[-2000:]
  return run


def test_generate_prints_prompt_and_completion(trained):
  result = command("spjax.infer.generate", f"--workdir={trained}", "--prompt=The with statement",
                   "--prompt=def", "--max_new_tokens=5")
  assert result.returncode == 0, result.stderr[-2000:]
  first, separator, second = result.stdout.strip().split("\n")[:3]
  assert first.startswith("The with statement") and len(first) > len("The with statement")
  assert separator == "-" * 40 and second.startswith("def")


def test_generate_without_a_source_is_a_usage_error(trained):
  result = command("spjax.infer.generate", "--prompt=x")
  assert result.returncode != 0 and "exactly one of --workdir and --hf_dir" in result.stderr


def test_generate_from_a_directory_that_is_not_a_run_names_it(tmp_path):
  result = command("spjax.infer.generate", f"--workdir={tmp_path}", "--prompt=x")
  assert result.returncode == 2 and f"{tmp_path} is not an spjax workdir" in result.stderr


def test_export_writes_a_checkpoint_that_loads_back_to_the_same_logits(trained, tmp_path):
  out = tmp_path / "hf"
  result = command("spjax.convert.export", f"--workdir={trained}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
  assert (out / "tokenizer.model").exists()
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12)
  original, _ = workdir.load(str(trained))
  exported, _ = hf.from_pretrained(str(out))
  logits = [np.asarray(nnx.jit(lambda m: m(tokens))(m)) for m in (original, exported)]
  np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
  assert jax.tree.leaves(nnx.state(exported))  # real arrays, not abstract
