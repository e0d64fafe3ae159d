"""What the data tests share: the run config they feed the pipeline (configs/default.py's, so fields
stay in step) and the check that a restored iterator continues exactly."""

import json

import numpy as np

from configs import default
from spjax.data import pipeline


def data_config(seq_len: int, **data):
  cfg = default.get_config("tiny")
  cfg.seq_len = seq_len
  cfg.data.update({k: str(v) if k == "cache_dir" else v for k, v in data.items()})
  return cfg


def assert_resumes_exactly(config, tok, batch_size: int, skip: int):
  """After `skip` batches, an iterator restored from the saved state yields the same next batches."""
  it = iter(pipeline.make_dataset(config, "train", tok, batch_size=batch_size))
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(3)]
  resumed = iter(pipeline.make_dataset(config, "train", tok, batch_size=batch_size))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
