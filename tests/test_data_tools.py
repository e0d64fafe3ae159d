"""tools/train_tokenizer.py and tools/prepare_data.py, run as a user runs them."""

import os
import subprocess
import sys

from spjax.data import synthetic
from spjax.data import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tool, *flags):
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool),
                         f"--config={ROOT}/configs/default.py:tiny", *flags],
                        capture_output=True, text=True, env=env, timeout=300)


def test_train_tokenizer_then_prepare(tmp_path):
  synthetic.write(str(tmp_path / "DIR"), {"train": 280, "validation": 70}, scale=0.05)
  data = [f"--config.data.source=slimpajama:{tmp_path / 'DIR'}", "--config.data.mixture=DC-2",
          f"--config.data.cache_dir={tmp_path / 'tfds'}"]
  run = _run("train_tokenizer.py", *data, f"--output={tmp_path / 'sp'}", "--vocab_size=600",
             "--sample_chars=30000")
  assert run.returncode == 0, run.stderr
  tok = tokenizer_lib.load(str(tmp_path / "sp.model"))
  assert tok.vocab_size == 600
  run = _run("prepare_data.py", *data, f"--config.data.tokenizer={tmp_path / 'sp.model'}",
             "--workers=2", "--config.data.packed=True", "--config.seq_len=96")
  assert run.returncode == 0, run.stderr
  assert "train_CommonCrawl" in run.stdout and "tokens" in run.stdout
  assert "4 files, 0 already done" in run.stderr  # two files in each of two splits
  assert "4/4" in run.stderr  # the progress bar reached the end
  assert "packed rows of 96 tokens in" in run.stdout and "train_GitHub" in run.stderr
