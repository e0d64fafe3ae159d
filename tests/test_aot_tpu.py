"""tools/aot_tpu.py compiles the real step for a small TPU topology on this CPU and estimates it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import aot_tpu  # noqa: E402  (tools/ is a folder of scripts, not a package)

from configs import default  # noqa: E402
from spjax import metrics  # noqa: E402

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'): it is the TPU compiler the tool "
           "runs on this CPU; it installs only on Linux x86_64/aarch64")


@needs_libtpu
def test_tiny_on_v5e_2x2(tmp_path):
  out = tmp_path / "aot.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_tpu.py"),
       "--config=" + os.path.join(REPO, "configs", "default.py") + ":tiny", "--topology=v5e:2x2",
       "--config.layout=fsdp_tp", "--config.model.remat_policy=full", f"--json={out}"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["layout"] == "fsdp_tp" and r["mesh"] == {"fsdp": 2, "tensor": 2}
  assert r["model"]["remat_policy"] == "full"
  assert r["fits"] and 0 < r["memory_gib_per_device"] < r["hbm_gib_per_device"] == 16
  assert r["compile_seconds"] > 0
  cfg = default.get_config("tiny")
  tokens = cfg.per_device_batch_size * 4 * cfg.seq_len
  assert r["model_flops_per_step"] == metrics.flops_per_token(cfg.model, cfg.seq_len) * tokens
  assert r["estimated_step_seconds"] >= r["compute_seconds"] > 0 and 0 < r["estimated_mfu"] < 1
  assert r["cost_model_time_shares"] and r["collectives"]["count"]["all-gather"] > 0  # fsdp
  assert "ESTIMATE MFU" in proc.stdout and "fits" in proc.stdout


def test_out_of_memory_message_is_read_as_bytes():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (31.35G) exceeds available HBM (15.75G).")
  assert aot_tpu._oom_bytes(msg) == pytest.approx(31.35 * 1024**3)
