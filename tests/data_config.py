"""The run config the data tests feed the pipeline: configs/default.py's, so fields stay in step."""

from configs import default


def data_config(seq_len: int, **data):
  cfg = default.get_config("tiny")
  cfg.seq_len = seq_len
  cfg.data.update({k: str(v) if k == "cache_dir" else v for k, v in data.items()})
  return cfg
