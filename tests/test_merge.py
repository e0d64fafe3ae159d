"""spjax-merge: averages, greedy soup, task arithmetic, slerp, and the inputs it refuses."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from spjax.compress import merge
from spjax.convert import workdir as workdir_lib
from spjax.infer import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def params_of(spec):
  workdir, _, step = str(spec).partition("@")
  params, _, _ = workdir_lib.load_params(workdir, int(step) if step else None)
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_merging_identical_checkpoints_gives_them_back_bit_for_bit(trained_workdir, tmp_path):
  same = [f"{trained_workdir}@20"] * 3
  merge.merge("uniform", same, str(tmp_path / "u"), log=lambda _: None)
  merge.merge("weighted", same, str(tmp_path / "w"), weights="1,2,5", log=lambda _: None)
  original = params_of(f"{trained_workdir}@20")
  for name in ("u", "w"):
    merged = params_of(tmp_path / name)
    assert merged.keys() == original.keys()
    assert all(np.array_equal(merged[k], original[k]) for k in original)
  assert json.load(open(tmp_path / "w" / "config.json"))["merged_from"]["weights"] == [1, 2, 5]


def test_uniform_and_weighted_are_the_means(trained_workdir, tmp_path):
  a, b = params_of(f"{trained_workdir}@10"), params_of(f"{trained_workdir}@20")
  merge.merge("uniform", [f"{trained_workdir}@10", f"{trained_workdir}@20"], str(tmp_path / "u"))
  merge.merge("weighted", [f"{trained_workdir}@10", f"{trained_workdir}@20"], str(tmp_path / "w"),
              weights="1,3")
  u, w = params_of(tmp_path / "u"), params_of(tmp_path / "w")
  for k in a:
    np.testing.assert_allclose(u[k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(w[k], 0.25 * a[k] + 0.75 * b[k], rtol=1e-6, atol=1e-7)


def test_task_arithmetic_with_lambda_0_is_the_base_and_0_5_is_halfway(trained_workdir, tmp_path):
  base, ft = f"{trained_workdir}@10", f"{trained_workdir}@20"
  merge.merge("task_arithmetic", [ft], str(tmp_path / "zero"), base=base, lambdas="0")
  merge.merge("task_arithmetic", [ft, ft], str(tmp_path / "half"), base=base, lambdas="0.25,0.25")
  b, f = params_of(base), params_of(ft)
  zero, half = params_of(tmp_path / "zero"), params_of(tmp_path / "half")
  assert all(np.array_equal(zero[k], b[k]) for k in b)
  for k in b:
    np.testing.assert_allclose(half[k], (b[k] + f[k]) / 2, rtol=1e-5, atol=1e-6)


def test_slerp_ends_are_its_inputs_and_the_middle_keeps_the_arc(trained_workdir, tmp_path):
  a_spec, b_spec = f"{trained_workdir}@10", f"{trained_workdir}@20"
  a, b = params_of(a_spec), params_of(b_spec)
  for t in (0.0, 0.5, 1.0):
    merge.merge("slerp", [a_spec, b_spec], str(tmp_path / str(t)), t=t)
  np.testing.assert_allclose(params_of(tmp_path / "0.0")["['blocks']['mlp']['up'].value"],
                             a["['blocks']['mlp']['up'].value"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(params_of(tmp_path / "1.0")["['blocks']['mlp']['up'].value"],
                             b["['blocks']['mlp']['up'].value"], rtol=1e-4, atol=1e-6)
  key = "['blocks']['mlp']['up'].value"
  x, y, mid = (m[key].ravel().astype(np.float64) for m in (a, b, params_of(tmp_path / "0.5")))
  omega = np.arccos(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
  expected = (np.sin(omega / 2) * (x + y)) / np.sin(omega)
  np.testing.assert_allclose(mid, expected, rtol=1e-4, atol=1e-6)


def test_greedy_soup_is_never_worse_than_its_best_ingredient(trained_workdir, tmp_path):
  inputs = [f"{trained_workdir}@10", f"{trained_workdir}@20", f"{trained_workdir}@20"]
  result = merge.merge("greedy", inputs, str(tmp_path / "soup"), log=lambda _: None)
  losses = [i["eval/loss"] for i in result["ingredients"]]
  assert losses == sorted(losses) and result["ingredients"][0]["kept"]
  config = ml_collections.ConfigDict(workdir_lib.read_config(str(tmp_path / "soup")))
  soup = evaluate.evaluate_workdir(config, str(tmp_path / "soup"))
  assert soup["eval/loss"] <= min(losses) + 1e-6
  assert json.load(open(tmp_path / "soup" / "config.json"))["merged_from"]["method"] == "greedy"


def edited_copy(trained_workdir, directory, **model):
  """A workdir (config.json only: the checks run before any array is read) of another model."""
  directory.mkdir()
  config = json.load(open(os.path.join(trained_workdir, "config.json")))
  config["model"] |= model
  json.dump(config, open(directory / "config.json", "w"))
  return str(directory)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(method="average"), "unknown --method 'average'; valid methods: uniform, weighted"),
    (dict(method="slerp"), "slerp interpolates exactly 2 inputs, got 1"),
    (dict(method="weighted"), "--weights is required"),
    (dict(method="task_arithmetic"), "needs --base"),
])
def test_bad_settings_are_named(trained_workdir, tmp_path, kwargs, needle):
  method = kwargs.pop("method")
  with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
    merge.merge(method, [str(trained_workdir)], str(tmp_path / "out"), **kwargs)


def test_other_architectures_exit_2_naming_the_field(trained_workdir, tmp_path):
  vocab = edited_copy(trained_workdir, tmp_path / "vocab", vocab_size=2048)
  wider = edited_copy(trained_workdir, tmp_path / "wider", d_model=256)
  with pytest.raises(ValueError, match="model.d_model is 128 in .* but 256 in"):
    merge.merge("uniform", [str(trained_workdir), wider], str(tmp_path / "out"))
  env = dict(os.environ)
  result = subprocess.run([sys.executable, "tools/merge.py", "--method=uniform",
                           f"--out={tmp_path}/out", str(trained_workdir), vocab], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "different architectures: vocabulary size is 1024 in" in result.stderr


def test_a_merged_workdir_is_not_resumed_but_trained_from(trained_workdir, tmp_path):
  from configs import default
  from spjax.train import loop
  merge.merge("uniform", [f"{trained_workdir}@10", f"{trained_workdir}@20"], str(tmp_path / "u"),
              log=lambda _: None)
  config = default.get_config("tiny")
  config.model.dtype, config.ema_decay = "float32", 0.9
  with pytest.raises(ValueError, match="parameters only.*config.init_from"):
    loop.train_and_evaluate(config, str(tmp_path / "u"))
