"""tools/tpu_vm.py: the gcloud fan-out it prints, what it refuses, and a local fleet that trains."""

import os
import subprocess
import sys

import numpy as np
import pytest

from test_reliability import REPO, launch, losses

TOOL = os.path.join(REPO, "tools", "tpu_vm.py")
DC1 = "--config=configs/slimpajama_dc.py:DC-1:gs://data/SlimPajama-627B"


def tool(*args, timeout=120):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO,
                        timeout=timeout)


def test_dry_run_prints_the_per_worker_commands():
  proc = tool("--tpu=t", "--zone=z", "--project=p", "--dry_run", "--env=LIBTPU_INIT_ARGS=--x=1",
              "--", "spjax-train", DC1, "--workdir=gs://bucket/run")
  assert proc.returncode == 0, proc.stderr
  archive, scp, ssh = proc.stdout.strip().split("\n", 2)
  assert archive.startswith(f"git -C {REPO} archive")
  assert scp.startswith("gcloud compute tpus tpu-vm scp") and "--worker=all" in scp
  assert ssh.startswith("gcloud compute tpus tpu-vm ssh t --worker=all --zone=z --project=p")
  # one script for every host: install, mounts of both buckets, the environment, the log
  assert 'pip install -q -e "$HOME/spjax[tpu]"' in ssh
  assert "gcsfuse --implicit-dirs bucket /gcs/bucket" in ssh
  assert "gcsfuse --implicit-dirs data /gcs/data" in ssh
  assert "export SPJAX_COORDINATOR_ADDRESS=auto" in ssh and "export LIBTPU_INIT_ARGS=--x=1" in ssh
  assert ("python3 -m spjax.main --config=configs/slimpajama_dc.py:DC-1:/gcs/data/SlimPajama-627B "
          "--workdir=/gcs/bucket/run > ~/spjax-logs/run.log 2>&1") in ssh


@pytest.mark.parametrize("command,error", [
    (["spjax-train", DC1, "--workdir=/tmp/run"], "not shared storage"),
    (["spjax-train", "--config=configs/slimpajama_dc.py:DC-9", "--workdir=gs://b/r"],
     "does not parse: ValueError: unknown SlimPajama-DC configuration 'DC-9'"),
    (["spjax-train", DC1, "--config.nope=1", "--workdir=gs://b/r"], "unknown config key 'nope'"),
    (["spjax-train", DC1, "--workdir=gs://b/r", "--process_id=1"], "--process_id is set for each"),
    (["python", "train.py"], "expected `-- spjax-train"),
])
def test_refuses_before_touching_a_host(command, error):
  proc = tool("--tpu=t", "--zone=z", "--dry_run", "--", *command)
  assert proc.returncode == 2 and error in proc.stderr, proc.stderr
  assert proc.stdout == ""


def test_local_fleet_of_2x4_trains_the_1x8_losses(tmp_path):
  flags = ["--config.num_train_steps=3", "--config.data.shards=2", "--config.model.dtype=float32",
           "--config.checkpoint_every_steps=1000"]
  one = str(tmp_path / "one")
  single = launch(one, *flags)
  two = str(tmp_path / "two")
  fleet = tool("--local_processes=2", "--local_devices=4", "--", "spjax-train",
               "--config=configs/default.py:tiny", f"--workdir={two}", "--config.log_every_steps=1",
               "--config.eval_every_steps=100000", *flags, timeout=600)
  out, err = single.communicate(timeout=600)
  assert single.returncode == 0, err[-3000:]
  logs = {i: open(os.path.join(two, "logs", f"worker-{i}.log")).read() for i in range(2)}
  assert fleet.returncode == 0, fleet.stderr + logs[0][-2000:] + logs[1][-2000:]
  assert "mesh {'fsdp': 8}" in logs[0]  # process 0 saw the fleet's 8 devices as one mesh
  a, b = losses(one), losses(two)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
