"""tools/plan.py: search, cache, ranking and the config file it writes (fake compiles)."""

import importlib.util
import os
import sys

import jax
import pytest

from configs import default
from spjax.train import program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import plan  # noqa: E402  (tools/ is a folder of scripts, not a package)

GIB = 1024**3


def fake_compile(calls):
  """A compile that costs nothing: step time falls with the microbatch, full remat costs 30%."""
  def compile_fn(config_arg, topology, num_slices, cand, extra, out_json):
    calls.append(cand)
    step = (1.3 if cand.remat == "full" else 1.0) * (1 + 1 / cand.batch)
    return {"topology": topology, "num_slices": num_slices, "chips": 8, "fits": cand.batch < 4,
            "memory_gib_per_device": 0.5 * cand.batch, "estimated_step_seconds": step,
            "estimated_mfu": 0.5 / step, "tokens_per_step": 8 * 4 * 128,
            "xla_estimate": {"step_seconds": None, "mfu": None}, "libtpu_init_args": ""}
  return compile_fn


def tiny():
  cfg = default.get_config("tiny")
  cfg.per_device_batch_size = 4  # 4 sequences per chip per step: (1, 4), (2, 2), (4, 1)
  return cfg


def test_search_ranks_what_fits_and_caches_compiles(tmp_path):
  cfg = tiny()
  cands = plan.candidates(cfg, ["fsdp"], ["full", "save_dots_no_batch"], [1, 2, 4, 3], [True],
                          [0])
  assert {(c.batch, c.accum) for c in cands} == {(1, 4), (2, 2), (4, 1)}  # 3 does not divide 4
  calls = []
  search = lambda: plan.search(cfg, "configs/default.py:tiny", "v5e:2x2", 1, cands,
                               jax.devices(), 16 * GIB, 1.3, str(tmp_path),
                               compile_fn=fake_compile(calls), log=lambda m: None)
  rows = plan.ranked(search())
  assert len(calls) == 6
  best = rows[0][0]
  assert (best.remat, best.batch, best.accum) == ("save_dots_no_batch", 2, 2)  # batch 4 won't fit
  steps = [r[2]["estimated_step_seconds"] for r in rows if not r[3]]
  assert steps == sorted(steps) and len(steps) == 4
  assert [r[3] for r in rows[4:]] == ["does not fit"] * 2
  text = plan.table(rows)
  assert "save_dots_no_batch" in text and "does not fit" in text
  assert len(plan.ranked(search())) == 6 and len(calls) == 6  # all six from the cache


def test_estimate_skips_what_cannot_fit(tmp_path):
  cfg = tiny()
  cands = plan.candidates(cfg, ["fsdp"], ["none", "full"], [4], [True], [0])
  est = {c.remat: plan.estimate_bytes(plan.apply(cfg, c.overrides()), jax.devices())
         for c in cands}
  assert est["none"] > est["full"] > 0  # full remat keeps less
  calls = []
  hbm = (est["none"] + est["full"]) / 2  # only full remat's estimate is under it
  rows = plan.search(cfg, "configs/default.py:tiny", "v5e:2x2", 1, cands, jax.devices(), hbm,
                     1.0, str(tmp_path), compile_fn=fake_compile(calls), log=lambda m: None)
  assert [c.remat for c in calls] == ["full"]
  assert rows[0][3].startswith("skipped: estimate")


def test_winner_is_written_as_a_config_train_accepts(tmp_path):
  cfg = tiny()
  cand = plan.Candidate("fsdp_tp", "full", 2, 2, False, 64)
  result = {"topology": "v5e:2x2", "num_slices": 1, "estimated_step_seconds": 0.5,
            "estimated_mfu": 0.4, "memory_gib_per_device": 1.0, "libtpu_init_args": "--x=1"}
  path = tmp_path / "planned.py"
  plan.write_config(str(path), cfg, cand, result)
  spec = importlib.util.spec_from_file_location("planned", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  got = module.get_config()
  assert got.to_dict() == plan.apply(cfg, cand.overrides()).to_dict()
  assert (got.layout, got.model.remat_policy, got.per_device_batch_size, got.grad_accum_steps,
          got.model.scan_layers, got.loss_chunk_size) == ("fsdp_tp", "full", 2, 2, False, 64)
  program.check_config(got)
  assert "LIBTPU_INIT_ARGS" in path.read_text()


def test_bad_search_spaces_are_refused():
  with pytest.raises(ValueError, match="divides"):
    plan.candidates(tiny(), ["fsdp"], ["full"], [3], [True], [0])
  with pytest.raises(ValueError, match="loss_chunk"):
    plan.candidates(tiny(), ["fsdp"], ["full"], [2], [True], [48])
  with pytest.raises(ValueError, match="--scan"):
    plan._list("yes", bool)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.parametrize("size,topology,hbm_gib", [("1b", "v5e:4x4", 16), ("7b", "v5p:4x4x4", 95)])
def test_size_defaults_fit_the_topologies_the_docs_show(size, topology, hbm_gib):
  # Before remat was on by default the 1B compiled to 21 GiB per v5e chip (remat none).
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-16"),
                     ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  cfg = default.get_config(size)
  fits = plan.estimate_bytes(cfg, devices)
  cfg.model.remat_policy = "none"
  assert fits < hbm_gib * GIB and fits < plan.estimate_bytes(cfg, devices)


def test_cli_names_a_bad_search_space_and_exits_2(tmp_path):
  import subprocess
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "plan.py"),
       "--config=" + os.path.join(REPO, "configs", "default.py") + ":tiny", "--topology=v5e:2x2",
       "--layouts=fsdp,nope", f"--cache_dir={tmp_path}", f"--out={tmp_path / 'p.py'}"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert proc.returncode == 2 and "--layouts ['nope']" in proc.stderr
