"""Checkpoints and failures: exact resume, resharded restore, kill -9, SIGTERM, NaN steps."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from spjax.data import pipeline
from spjax.model.config import ModelConfig
from spjax.train import checkpoint
from spjax.train import loop as train
from spjax.train import program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The schedule must not depend on num_train_steps, or stopping early would change the math.
COMMON = {"log_every_steps": 1, "eval_every_steps": 1000, "eval_batches": 1,
          "checkpoint_every_steps": 6, "optimizer.warmup_steps": 2, "optimizer.decay_steps": 10}


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict(COMMON | overrides)
  return cfg


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}


def restore(workdir, cfg, step=None):
  prog = program.build(cfg)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=1, save_every_steps=1)
  with prog.activate():
    state = ckpt.restore(step or ckpt.latest_step(), prog.abstract_state())
  ckpt.close()
  return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted 12-step run and one stopped at 6 and resumed, both on the fsdp layout."""
  straight = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(tiny(num_train_steps=12), straight)
  resumed = str(tmp_path_factory.mktemp("resumed"))
  train.train_and_evaluate(tiny(num_train_steps=6), resumed)
  train.train_and_evaluate(tiny(num_train_steps=12), resumed)
  return straight, resumed


def test_resume_is_bit_identical(runs):
  straight, resumed = runs
  assert losses(resumed) == losses(straight)  # every step's loss, to the bit
  a, b = restore(straight, tiny()), restore(resumed, tiny())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  data_state = "checkpoints/12/data_iter/process_0-of-1.json"  # the next batch is the same one
  with open(os.path.join(straight, data_state)) as f, open(os.path.join(resumed, data_state)) as g:
    assert json.load(f) == json.load(g)


def test_restore_onto_4_devices_under_another_layout(runs, tmp_path):
  straight, _ = runs
  saved = jax.device_get(restore(straight, tiny())["params"])
  np.savez(tmp_path / "saved.npz", **{"/".join(map(str, k)): v for k, v in _flat(saved)})
  script = textwrap.dedent(f"""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      import sys; sys.path.insert(0, {REPO!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax, numpy as np
      from test_reliability import restore, tiny, _flat
      state = restore({straight!r}, tiny(layout="tp"))
      q = state["params"]["blocks"]["attn"]["q"][...]
      assert len(jax.devices()) == 4 and q.sharding.spec[2] == "tensor", q.sharding
      assert q.addressable_shards[0].data.shape == (2, 128, 2, 16)  # 8 heads / tensor=4
      saved = np.load({str(tmp_path / "saved.npz")!r})
      for k, v in _flat(jax.device_get(state["params"])):
        np.testing.assert_array_equal(v, saved["/".join(map(str, k))])
      print("restored", int(state["step"]))
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, XLA_FLAGS=""))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "restored 12" in result.stdout


def _flat(tree):
  return [(tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_checkpoint_of_another_model_names_the_first_mismatch(runs):
  straight, _ = runs
  with pytest.raises(ValueError, match=r"does not match the model at params/blocks/mlp/down"):
    train.train_and_evaluate(tiny(num_train_steps=14, **{"model.mlp_dim": 256}), straight)


def test_non_finite_step_is_skipped_and_counted():
  prog = program.build(tiny(**{"model.dtype": "float32"}))
  tokens = jnp.zeros((prog.global_batch, 128), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": jnp.ones_like(tokens),
           "loss_mask": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(128), tokens.shape)}
  poisoned = batch | {"inputs": tokens + 5000}  # ids past the vocab embed as NaN
  with prog.activate():
    step = prog.jit_train_step()
    state, _ = step(prog.jit_init()(), batch)
    before = jax.device_get(state["params"])
    state, metrics = step(state, poisoned)
    assert not np.isfinite(metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)
    assert int(state["opt_state"].total_notfinite) == 1 and int(state["step"]) == 2
    state, metrics = step(state, batch)  # and training carries on
    assert np.isfinite(metrics["loss"]) and int(state["opt_state"].total_notfinite) == 1


def poison_train_batches(monkeypatch, bad_batches):
  """Train batches number `bad_batches` (1-based) get token ids past the vocabulary."""
  make_dataset = pipeline.make_dataset
  def poisoned(config, split, *args, **kwargs):
    ds = make_dataset(config, split, *args, **kwargs)
    if split != "train":
      return ds
    count = iter(range(1, 10**6))
    def poison(batch):
      return batch | {"inputs": batch["inputs"] + 5000} if next(count) in bad_batches else batch
    return ds.map(poison)
  monkeypatch.setattr(pipeline, "make_dataset", poisoned)


def test_nan_policy_skip_trains_through(monkeypatch, tmp_path):
  poison_train_batches(monkeypatch, {3, 4})
  final = train.train_and_evaluate(tiny(num_train_steps=6), str(tmp_path))
  assert final["train/skipped_steps"] == 2 and np.isfinite(final["train/loss"])
  curve = losses(str(tmp_path))  # logged every step: the poisoned ones show their NaN loss
  assert {s for s, v in curve.items() if not np.isfinite(v)} == {3, 4} and len(curve) == 6
  state = restore(str(tmp_path), tiny())
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_nan_policy_abort_saves_the_last_good_state(monkeypatch, tmp_path):
  poison_train_batches(monkeypatch, {3})
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train.BadStepError, match="step 3.*nan_policy"):
    train.train_and_evaluate(tiny(num_train_steps=6, nan_policy="abort"), str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is handler  # the run's preemption handler is gone
  state = restore(str(tmp_path), tiny(), step=3)
  assert int(state["opt_state"].total_notfinite) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def test_failed_background_save_raises_in_the_loop(monkeypatch, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, save_every_steps=1)
  state = {"w": jnp.ones((8, 4))}
  ckpt.save(1, state)
  ckpt.wait()
  async def failing_save(self, *args, **kwargs):
    return [_Failing()]  # the write starts, and fails in the background
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_save)
  with pytest.raises(Exception, match="disk full"):
    ckpt.save(2, state)
    ckpt.wait()
  assert ckpt.latest_step() == 1


class _Failing:
  """A background commit future that fails, as a full disk would."""

  def result(self, timeout=None):
    raise OSError("disk full")


# ---------------------------------------------------------------------------------------------------
# Whole processes: kill -9 during async saves, SIGTERM.
# ---------------------------------------------------------------------------------------------------


def launch(workdir, *flags, devices=8, env=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  return subprocess.Popen(
      [sys.executable, "-m", "spjax.main", "--config=configs/default.py:tiny", f"--workdir={workdir}",
       "--config.log_every_steps=1", "--config.eval_every_steps=100000", *flags],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def wait_for_steps(proc, workdir, count, timeout=240):
  """Waits until `count` more train steps are logged."""
  path = os.path.join(workdir, "metrics.jsonl")
  start = len(open(path).readlines()) if os.path.exists(path) else 0
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    if os.path.exists(path) and len(open(path).readlines()) >= start + count:
      return
    time.sleep(0.1)
  raise TimeoutError("training made no progress")


def test_kill_9_during_async_saves_then_sigterm_then_resume(tmp_path):
  workdir = str(tmp_path)
  flags = ["--config.num_train_steps=100000", "--config.checkpoint_every_steps=1",
           "--config.max_checkpoints_to_keep=1"]
  rng = random.Random(0)
  for _ in range(3):  # a save is in flight nearly all the time: one per step
    proc = launch(workdir, *flags)
    wait_for_steps(proc, workdir, 3)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    steps = complete_steps(workdir)
    assert steps, "retention deleted the only complete checkpoint"
    state = restore(workdir, tiny())  # the newest complete one restores
    assert int(state["step"]) == steps[-1]

  proc = launch(workdir, *flags)
  wait_for_steps(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = int(out.split("preempted; saved step ")[1].split(".")[0])
  assert complete_steps(workdir)[-1] == saved

  proc = launch(workdir, f"--config.num_train_steps={saved + 2}")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"resumed from {workdir}/checkpoints at step {saved}" in out
  assert complete_steps(workdir)[-1] == saved + 2


def test_sigterm_stops_two_processes_at_the_same_step(tmp_path):
  workdir = str(tmp_path)
  port = 20000 + os.getpid() % 20000
  procs = [launch(workdir, "--config.num_train_steps=100000", "--config.checkpoint_every_steps=1000",
                  devices=4, env={"SPJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "SPJAX_NUM_PROCESSES": "2", "SPJAX_PROCESS_ID": str(i)})
           for i in range(2)]
  wait_for_steps(procs[0], workdir, 3)
  procs[0].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  saved = int(outs[0][0].split("preempted; saved step ")[1].split(".")[0])
  assert complete_steps(workdir) == [saved]
  data_files = os.listdir(os.path.join(workdir, "checkpoints", str(saved), "data_iter"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data_files)  # both positions saved


def test_inspect_checkpoint_lists_steps_shapes_shardings_and_bytes(runs):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  import inspect_checkpoint
  straight, _ = runs
  report = inspect_checkpoint.describe(straight)
  assert "complete steps 6, 12" in report and "step 12 (saved on mesh fsdp=8)" in report
  q_line = next(line for line in report.splitlines() if "params/blocks/attn/q " in line)
  assert q_line.split()[1:] == ["(2,", "128,", "8,", "16)", "float32", "-,fsdp,-,-", "131,072"]
  expected = ModelConfig.from_config(tiny().model).num_params() * 4 / 2**20  # fp32 params
  assert f"total params: {expected:,.2f} MiB" in report
  with pytest.raises(ValueError, match="step 5 has no complete checkpoint"):
    inspect_checkpoint.describe(straight, step=5)


def test_two_processes_train_like_one(tmp_path):
  """2 processes x 4 devices reach the losses of 1 process x 8 devices (fixed data shards)."""
  flags = ["--config.num_train_steps=4", "--config.data.shards=2", "--config.model.dtype=float32",
           "--config.checkpoint_every_steps=2"]
  one = str(tmp_path / "one")
  single = launch(one, *flags)
  two = str(tmp_path / "two")
  port = 20000 + (os.getpid() + 7) % 20000
  pair = [launch(two, *flags, devices=4, env={"SPJAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                              "SPJAX_NUM_PROCESSES": "2", "SPJAX_PROCESS_ID": str(i)})
          for i in range(2)]
  for proc in [single] + pair:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  a, b = losses(one), losses(two)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)

  # Resuming that 2-process checkpoint as one process cannot place the data iterators: say so.
  proc = launch(two, "--config.num_train_steps=6", "--config.data.shards=2",
                "--config.model.dtype=float32")
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 2 and "data positions of 2 process(es)" in err, err[-2000:]
