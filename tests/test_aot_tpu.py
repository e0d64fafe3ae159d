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
from spjax.model import attention  # noqa: E402
from spjax.train import metrics  # noqa: E402

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'): it is the TPU compiler the tool "
           "runs on this CPU; it installs only on Linux x86_64/aarch64")


def aot_tiny(tmp_path, *flags):
  out = tmp_path / "aot.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # no simulated CPU devices
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "aot_tpu.py"),
       "--config=" + os.path.join(REPO, "configs", "default.py") + ":tiny", "--topology=v5e:2x2",
       f"--json={out}", *flags],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text())


@needs_libtpu
def test_tiny_on_v5e_2x2(tmp_path):
  proc, r = aot_tiny(tmp_path, "--config.layout=fsdp_tp", "--config.model.remat_policy=full")
  assert r["chips"] == 4 and r["device_kind"] == "TPU v5 lite"
  assert r["layout"] == "fsdp_tp" and r["mesh"] == {"fsdp": 2, "tensor": 2}
  assert r["model"]["remat_policy"] == "full"
  assert r["model"]["attention"] == "splash" and r["kernel_seconds"]  # "auto" on TPU
  assert r["fits"] and 0 < r["memory_gib_per_device"] < r["hbm_gib_per_device"] == 16
  assert r["compile_seconds"] > 0
  cfg = default.get_config("tiny")
  tokens = cfg.per_device_batch_size * 4 * cfg.seq_len
  assert r["model_flops_per_step"] == metrics.flops_per_token(cfg.model, cfg.seq_len) * tokens
  assert r["estimated_step_seconds"] >= r["compute_seconds"] > 0 and 0 < r["estimated_mfu"] < 1
  assert r["cost_model_time_shares"] and r["collectives"]["count"]["all-gather"] > 0  # fsdp
  assert "ESTIMATE MFU" in proc.stdout and "fits" in proc.stdout


@needs_libtpu
@pytest.mark.parametrize("remat,forward_runs", [("full", 2), ("save_dots_no_batch", 1)])
def test_splash_kernels_are_costed_per_executed_call(tmp_path, remat, forward_runs):
  # The Mosaic kernels compile for TPU here; the cost model leaves them at zero cycles, so the tool
  # charges their FLOPs at --kernel_efficiency. Under full remat the forward kernel runs twice per
  # layer (forward and recompute), inside the layer scan: the count must see through the loop.
  # The matmul policies keep the kernel's residuals, so it runs forward once.
  proc, r = aot_tiny(tmp_path, "--config.layout=tp", "--config.model.attention=splash",
                     f"--config.model.remat_policy={remat}", "--kernel_efficiency=0.25")
  cfg = default.get_config("tiny")
  rows, heads = cfg.per_device_batch_size * 4, cfg.model.num_heads // 4  # tp: tensor=4
  rate = 0.25 * r["peak_tflops_per_chip"] * 1e12
  one_call = {name: attention.kernel_flops(name, rows, heads, cfg.seq_len, cfg.model.head_dim) / rate
              for name in r["kernel_seconds"]}
  calls = {name.split("_")[2]: r["kernel_seconds"][name] / one_call[name] for name in one_call}
  assert calls == pytest.approx({"fwd": forward_runs * cfg.model.num_layers, "dq": cfg.model.num_layers,
                                 "dkv": cfg.model.num_layers})
  assert r["kernel_efficiency"] == 0.25 and "of which Pallas splash_mha_fwd" in proc.stdout


def test_out_of_memory_message_is_read_as_bytes():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (31.35G) exceeds available HBM (15.75G).")
  assert aot_tpu._oom_bytes(msg) == pytest.approx(31.35 * 1024**3)
