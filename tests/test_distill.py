"""Distillation: the loss against an independent KL + CE, alpha=0 is the CE, chunking changes
nothing, a teacher of another vocabulary is refused, and a distilled run logs train/kl and train/ce."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.convert import hf
from spjax.convert import workdir as workdir_lib
from spjax.train import loop as train
from spjax.train import program
from spjax.train import step as step_lib
from spjax.tune import distill

STUDENT = {"model.d_model": 64, "model.num_layers": 1, "model.num_heads": 4,
           "model.num_kv_heads": 4, "model.head_dim": 16, "model.mlp_dim": 128,
           "model.dtype": "float32"}


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"log_every_steps": 1, "eval_batches": 1,
                                  "model.dtype": "float32"} | overrides)
  return cfg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A tiny run of 3 steps: the teacher (twice the student's width, two layers)."""
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(tiny(num_train_steps=3, eval_every_steps=3), workdir)
  return workdir


def hand_batch(rows=16, length=128, seed=0):
  """Random tokens, two documents per row, padding at the end of odd rows, a partial loss mask."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, 1024, (rows, length)).astype(np.int32)
  targets = rng.integers(0, 1024, (rows, length)).astype(np.int32)
  segment_ids = np.where(np.arange(length) < length // 2, 1, 2)[None].repeat(rows, 0)
  segment_ids[1::2, -length // 4:] = 0
  positions = np.where(np.arange(length) < length // 2, np.arange(length),
                       np.arange(length) - length // 2)[None].repeat(rows, 0)
  loss_mask = (segment_ids > 0) & (rng.random((rows, length)) < 0.7)
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids.astype(np.int32),
          "positions": positions.astype(np.int32), "loss_mask": loss_mask.astype(np.float32)}


def objective_value(prog, params, batch, teacher_params, *, z_loss=0.0, grad=False):
  fn = prog.teacher.objective()
  mask_sum = float(np.sum(batch["loss_mask"]))
  def loss(p):
    return fn(p, prog.graphdef, batch, None, z_loss, 1.0 / mask_sum, teacher_params)
  with prog.activate():
    if grad:
      return jax.jit(jax.grad(lambda p: loss(p)[0]))(params)
    value, (nll, _, means) = jax.jit(loss)(params)  # means: the batch's share (all of it here)
  return float(value), float(nll) / mask_sum, {k: float(v) for k, v in means.items()}


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("top_k", [0, 7])
def test_loss_equals_an_independent_kl_plus_ce(teacher_dir, top_k):
  t, alpha = 2.0, 0.3
  cfg = tiny(**STUDENT, **{"distill.teacher": teacher_dir, "distill.temperature": t,
                           "distill.alpha": alpha, "distill.top_k": top_k,
                           "distill.chunk_size": 32})
  prog = program.build(cfg)
  batch = hand_batch()
  with prog.activate():
    params = prog.jit_init()()["params"]
    teacher_params = prog.teacher.load_params(prog.mesh, prog.layout)
    teacher, _ = workdir_lib.load(teacher_dir)
    student = nnx.merge(prog.graphdef, params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    s = np.asarray(student(*args), np.float64)  # [B, T, V], whole: the reference may hold them
    te = np.asarray(teacher(*args), np.float64)
  value, ce, sums = objective_value(prog, params, batch, teacher_params)

  mask = batch["loss_mask"].astype(np.float64)
  nll = -np.take_along_axis(log_softmax(s), batch["targets"][..., None], -1)[..., 0]
  log_q = log_softmax(s / t)
  if top_k:
    idx = np.argsort(-te, -1)[..., :top_k]
    log_p = log_softmax(np.take_along_axis(te / t, idx, -1))
    log_q = np.take_along_axis(log_q, idx, -1)
  else:
    log_p = log_softmax(te / t)
  kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  want_kl, want_ce = (kl * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum()
  assert want_kl > 1e-3  # the teacher and the fresh student disagree: the KL term is exercised
  np.testing.assert_allclose(sums["kl"], want_kl, rtol=2e-5)
  np.testing.assert_allclose(sums["ce"], want_ce, rtol=2e-5)
  np.testing.assert_allclose(ce, want_ce, rtol=2e-5)
  np.testing.assert_allclose(value, alpha * t * t * want_kl + (1 - alpha) * want_ce, rtol=2e-5)


def test_alpha_zero_is_the_plain_cross_entropy(teacher_dir):
  cfg = tiny(**STUDENT, **{"distill.teacher": teacher_dir, "distill.alpha": 0.0,
                           "distill.temperature": 3.0})
  prog = program.build(cfg)
  batch = hand_batch(seed=1)
  batch.pop("loss_mask")  # then the padding mask, as loss_sums uses
  batch["loss_mask"] = (batch["segment_ids"] > 0).astype(np.float32)
  with prog.activate():
    params = prog.jit_init()()["params"]
    teacher_params = prog.teacher.load_params(prog.mesh, prog.layout)
    plain, (nll, count, _) = jax.jit(lambda p: step_lib.loss_sums(
        p, prog.graphdef, batch, None, 1e-3, 1.0 / batch["loss_mask"].sum()))(params)
  value, ce, _ = objective_value(prog, params, batch, teacher_params, z_loss=1e-3)
  np.testing.assert_allclose(value, float(plain), rtol=1e-6)
  np.testing.assert_allclose(ce, float(nll) / float(count), rtol=1e-6)


def test_chunked_equals_unchunked_in_value_and_gradient(teacher_dir):
  out = {}
  for chunk in (0, 16):
    prog = program.build(tiny(**STUDENT, **{"distill.teacher": teacher_dir,
                                            "distill.chunk_size": chunk}))
    batch = hand_batch(seed=2)
    with prog.activate():
      params = prog.jit_init()()["params"]
      teacher_params = prog.teacher.load_params(prog.mesh, prog.layout)
    value, _, _ = objective_value(prog, params, batch, teacher_params)
    grads = objective_value(prog, params, batch, teacher_params, grad=True)
    out[chunk] = value, jax.device_get(grads)
  np.testing.assert_allclose(out[0][0], out[16][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[16][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_vocabulary_mismatch_is_refused_before_compiling(teacher_dir):
  with pytest.raises(ValueError, match=r"vocabulary of 1024 tokens, the student.*512"):
    program.build(tiny(**STUDENT, **{"distill.teacher": teacher_dir, "model.vocab_size": 512}))


@pytest.mark.parametrize("field,value,message", [
    ("distill.alpha", 1.5, "alpha"), ("distill.temperature", 0.0, "temperature"),
    ("distill.chunk_size", 48, "divide seq_len"), ("distill.top_k", 5000, "top_k")])
def test_bad_settings_name_the_field(teacher_dir, field, value, message):
  with pytest.raises(ValueError, match=message):
    program.build(tiny(**STUDENT, **{"distill.teacher": teacher_dir, field: value}))


def test_loss_chunk_size_is_refused_in_a_distillation_run(teacher_dir):
  # The distilled step chunks by distill.chunk_size: a loss_chunk_size there would do nothing.
  with pytest.raises(ValueError, match=r"loss_chunk_size=32 is not used when distill.teacher.*"
                                       r"distill.chunk_size"):
    program.build(tiny(**STUDENT, **{"distill.teacher": teacher_dir, "loss_chunk_size": 32}))
  prog = program.build(tiny(**STUDENT, **{"distill.teacher": teacher_dir,
                                          "distill.chunk_size": 32}))
  assert prog._loss_chunk() == 32  # the eval loss chunks by distill.chunk_size too


def test_a_hugging_face_teacher_loads_the_same_weights(teacher_dir, tmp_path):
  model, run = workdir_lib.load(teacher_dir)
  cfg = model.cfg
  hf.save_pretrained(model, cfg, str(tmp_path / "hf"))
  from_hf = program.build(tiny(**STUDENT, **{"distill.teacher": str(tmp_path / "hf")}))
  from_run = program.build(tiny(**STUDENT, **{"distill.teacher": teacher_dir}))
  assert from_hf.teacher.is_hf and not from_run.teacher.is_hf
  a = from_hf.teacher.load_params(from_hf.mesh, from_hf.layout)
  b = from_run.teacher.load_params(from_run.mesh, from_run.layout)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_a_distilled_run_logs_kl_and_ce_and_keeps_the_teacher_out_of_its_state(teacher_dir,
                                                                             tmp_path):
  """Under tp, with two microbatches per step (their KL and CE sums add up)."""
  cfg = tiny(**STUDENT, num_train_steps=2, eval_every_steps=2, layout="tp", grad_accum_steps=2,
             **{"distill.teacher": teacher_dir, "distill.chunk_size": 64})
  train.train_and_evaluate(cfg, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  logged = [m for m in lines if "train/kl" in m]
  assert len(logged) == 2 and all(m["train/kl"] > 0 for m in logged)
  assert all(abs(m["train/ce"] - m["train/loss"]) < 1e-5 for m in logged)
  prog = program.build(cfg)
  state = prog.abstract_state()
  assert set(state) == {"step", "params", "opt_state"}
  shapes = {tuple(a.shape) for a in jax.tree.leaves(state)}
  assert (2, 128, 512) not in shapes  # the teacher's mlp kernels: nowhere in the student's state
  assert (2, 128, 512) in {tuple(a.shape) for a in jax.tree.leaves(prog.teacher.abstract_params())}
