"""Every test sees 8 simulated CPU devices: XLA reads the flag once, when the backend starts."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A tiny run of 20 steps (float32 compute, EMA on) with checkpoints at steps 10 and 20: what the
  compression tests (eval, quantize, merge) start from."""
  from configs import default
  from spjax.train import loop
  config = default.get_config("tiny")
  config.num_train_steps, config.log_every_steps, config.eval_every_steps = 20, 10, 10
  config.checkpoint_every_steps, config.eval_batches, config.ema_decay = 10, 2, 0.9
  config.model.dtype = "float32"
  workdir = tmp_path_factory.mktemp("trained")
  loop.train_and_evaluate(config, str(workdir))
  return workdir
