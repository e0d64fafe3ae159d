"""Pruning: sparsity on the cubic schedule, N:M per group, pruned weights exactly zero after every
update, masks sharded like their params and kept through save, resume and a layout change."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.compress import prune
from spjax.data import pipeline, tokenizer
from spjax.train import checkpoint
from spjax.train import loop as train
from spjax.train import program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = {"prune.sparsity": 0.75, "prune.start_step": 2, "prune.end_step": 8,
            "prune.every_steps": 2}


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"log_every_steps": 1, "eval_batches": 1, "eval_every_steps": 1000,
                                  "model.dtype": "float32", "optimizer.warmup_steps": 2} | overrides)
  return cfg


def flat(tree):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(tree)}


def masks_of(state):
  return flat(state["opt_state"].inner_state.masks)


def train_steps(cfg, steps):
  """(state after each update) of `steps` updates on real batches."""
  prog = program.build(cfg)
  batches = iter(pipeline.make_dataset(cfg, "train", tokenizer.load(""),
                                       batch_size=prog.global_batch))
  out = []
  with prog.activate():
    state, step_fn = prog.jit_init()(), prog.jit_train_step()
    for _ in range(steps):
      state, _ = step_fn(state, {k: jax.device_put(v, prog.batch_sharding)
                                 for k, v in next(batches).items()})
      out.append(jax.device_get({"params": state["params"], "masks": masks_of(state)}))
  return prog, out


def test_schedule_is_zhu_and_gupta_cubic():
  s = prune.Schedule.from_config(tiny(**SCHEDULE).prune)
  for t in range(12):
    frac = min(max((t - 2) / 6, 0), 1)
    want = 0.0 if t < 2 else 0.75 * (1 - (1 - frac) ** 3)
    assert float(s.sparsity_at(t)) == pytest.approx(want)
  assert [t for t in range(12) if s.prunes_at(t)] == [2, 4, 6, 8]


def test_sparsity_follows_the_schedule_and_pruned_weights_stay_zero():
  cfg = tiny(**SCHEDULE)
  prog, states = train_steps(cfg, 10)
  schedule = prune.Schedule.from_config(cfg.prune)
  names = set(states[0]["masks"])
  assert names == {f"blocks/{m}" for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate",
                                           "mlp/up", "mlp/down")}
  last_prune = None
  for t, state in enumerate(states):
    if schedule.prunes_at(t):
      last_prune = t
    want = 0.0 if last_prune is None else float(schedule.sparsity_at(last_prune))
    params = flat(state["params"])
    for name, mask in state["masks"].items():
      per_layer = mask.reshape(mask.shape[0], -1)  # scanned stack: [L, ...], each layer a matrix
      n = per_layer.shape[1]
      np.testing.assert_array_equal((~per_layer).sum(1), round(want * n), err_msg=f"{name} {t}")
      assert np.all(params[name][~mask] == 0.0), f"{name}: a pruned weight moved at update {t}"
    for name in ("embed", "unembed", "blocks/attn_norm/scale"):
      assert np.count_nonzero(params[name] == 0) == 0
  assert want == 0.75
  def specs(tree):
    return {"/".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(tree)}
  shardings = specs(prog.state_shardings["params"])
  mask_shardings = specs(prog.state_shardings["opt_state"].inner_state.masks)
  assert mask_shardings.keys() == names
  assert all(mask_shardings[n] == shardings[n] for n in names)
  assert shardings["blocks/mlp/up"] != jax.sharding.PartitionSpec()  # fsdp splits it


def test_two_four_keeps_two_of_every_four_along_the_input_axis():
  cfg = tiny(**{"prune.pattern": "2:4", "prune.start_step": 1, "layout": "tp"})
  _, states = train_steps(cfg, 3)
  assert all(np.all(m) for m in states[0]["masks"].values())  # before start_step
  for state in states[1:]:
    params = flat(state["params"])
    for name, mask in state["masks"].items():
      kept = np.moveaxis(mask, 1, -1)  # [L, ..., In]: groups along the first axis after layers
      groups = kept.reshape(*kept.shape[:-1], -1, 4).sum(-1)
      np.testing.assert_array_equal(groups, 2, err_msg=name)
      assert np.all(params[name][~mask] == 0.0) and np.all(params[name][mask] != 0.0)


def test_masks_survive_save_resume_and_a_layout_change(tmp_path):
  common = {**SCHEDULE, "checkpoint_every_steps": 5}
  train.train_and_evaluate(tiny(num_train_steps=5, **common), str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_every_steps=5)
  restored = {}
  for layout in ("fsdp", "tp"):
    prog = program.build(tiny(layout=layout, **common))
    with prog.activate():
      state = ckpt.restore(5, prog.abstract_state())
    masks = state["opt_state"].inner_state.masks
    restored[layout] = masks_of(state)
    for path, mask in nnx.to_flat_state(masks):  # read into the param's sharding of this layout
      param = dict(nnx.to_flat_state(state["params"]))[path]
      assert mask[...].sharding.spec == param[...].sharding.spec
  ckpt.close()
  for name, mask in restored["fsdp"].items():
    np.testing.assert_array_equal(mask, restored["tp"][name])
    assert 0 < (~mask).mean() < 0.75  # mid-schedule: pruned, not yet at the target

  train.train_and_evaluate(tiny(num_train_steps=10, layout="tp", **common), str(tmp_path))
  prog = program.build(tiny(layout="tp", **common))
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, save_every_steps=5)
  with prog.activate():
    state = ckpt.restore(10, prog.abstract_state())
  ckpt.close()
  params, masks = flat(state["params"]), masks_of(state)
  for name, mask in masks.items():
    assert not np.any(mask & ~restored["fsdp"][name])  # nothing pruned at step 5 grew back
    assert (~mask).mean() == pytest.approx(0.75, abs=1e-3)
    assert np.all(params[name][~mask] == 0.0)

  out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "inspect_checkpoint.py"),
                        str(tmp_path), "--sparsity", "--filter=params/blocks/mlp"],
                       capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  assert re.search(r"blocks/mlp/up\[1\]\s+75.00%", out.stdout), out.stdout
  assert "all matrices: 75.00%" in out.stdout


@pytest.mark.parametrize("overrides,message", [
    ({"prune.sparsity": 1.0}, r"prune.sparsity=1.0: must be in \[0, 1\)"),
    ({"prune.pattern": "4:2"}, "0 < N < M"),
    ({"prune.pattern": "2:4", "prune.sparsity": 0.5}, "leave prune.sparsity at 0"),
    ({"prune.pattern": "1:3"}, r"blocks/attn/k has shape \(2, 128, 4, 16\).*multiple of 3"),
    ({"prune.sparsity": 0.5, "prune.start_step": 5, "prune.end_step": 3}, "end_step=3"),
    ({"prune.sparsity": 0.5, "prune.exclude": "("}, "not a regular expression"),
    ({"prune.sparsity": 0.5, "prune.exclude": "."}, "leaves no matrix"),
])
def test_bad_prune_config_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    program.build(tiny(**overrides))
