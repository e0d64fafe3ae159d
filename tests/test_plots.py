"""Charts of metrics.jsonl: tools/plot_metrics.py and config.plot_every_eval."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import default
from spjax.train import loop as train
from spjax.train import plots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed: it is the 'plot' extra (pip install -e '.[plot]'), which "
           "the test extra leaves out")
PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(workdir, lines):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


def fake_run(workdir, lr, domains=()):
  lines = []
  for step in (10, 20, 30, 20, 30):  # resumed after step 10: 20 and 30 written twice
    lines.append({"step": step, "train/loss": 5.0 - step / 10 + lr, "train/learning_rate": lr,
                  "train/tokens_per_sec": 1e4, "train/mfu": 0.1, "train/tokens": step * 512})
    if step % 20 == 0 or step == 30:
      lines.append({"step": step, "eval/loss": 5.1 - step / 10,
                    **{f"eval/{d}/loss": 5.2 - step / 10 for d in domains}})
  write_metrics(workdir, lines)


def test_read_merges_lines_per_step_the_last_winning(tmp_path):
  fake_run(str(tmp_path), lr=0.5)
  rows = plots.read(str(tmp_path))
  assert [r["step"] for r in rows] == [10, 20, 30]
  assert rows[1]["train/loss"] == 3.5 and rows[1]["eval/loss"] == pytest.approx(3.1)
  write_metrics(str(tmp_path), [{"train/loss": 1.0}])
  with pytest.raises(ValueError, match="metrics.jsonl:1 is not a metrics line"):
    plots.read(str(tmp_path))
  with pytest.raises(ValueError, match="has no metrics.jsonl"):
    plots.read(str(tmp_path / "missing"))


@needs_matplotlib
def test_figure_has_every_run_and_domain_against_steps_and_tokens(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  fake_run(a, 0.1, domains=("CommonCrawl", "GitHub"))
  fake_run(b, 0.2)
  fig = plots.figure([a, b], labels=["dc-3", "dc-1"])
  steps_loss, tokens_loss = fig.axes[0], fig.axes[len(plots.PANELS)]
  assert [line.get_label() for line in steps_loss.lines if not line.get_label().startswith("_")] \
      == ["dc-3 train", "dc-3 eval", "dc-1 train", "dc-1 eval"]
  assert len(steps_loss.lines) == 4 + 2  # and the two domains of run a
  assert {t.get_text() for t in steps_loss.texts} == {"CommonCrawl", "GitHub"}
  assert list(tokens_loss.lines[0].get_xdata()) == [10 * 512, 20 * 512, 30 * 512]
  assert list(fig.axes[1].lines[1].get_ydata()) == [0.2] * 3  # learning rate of run b


@needs_matplotlib
def test_plot_metrics_tool_and_plot_every_eval_write_pngs(tmp_path):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"num_train_steps": 4, "log_every_steps": 1, "eval_every_steps": 2,
                                  "eval_batches": 1, "checkpoint_every_steps": 100,
                                  "plot_every_eval": True})
  run = str(tmp_path / "run")
  train.train_and_evaluate(cfg, run)
  with open(os.path.join(run, "metrics.png"), "rb") as f:
    assert f.read(8) == PNG
  other = str(tmp_path / "other")
  fake_run(other, 0.1, domains=("C4",))
  out = str(tmp_path / "both.png")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), run, other,
                         f"--out={out}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  with open(out, "rb") as f:
    assert f.read(8) == PNG
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"), run,
                         str(tmp_path / "nope"), f"--out={out}"], capture_output=True, text=True)
  assert proc.returncode == 2 and "nope has no metrics.jsonl" in proc.stderr


def test_plot_every_eval_without_matplotlib_is_a_config_error(monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name.startswith("matplotlib"):
      raise ImportError(name)
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr(builtins, "__import__", no_matplotlib)
  with pytest.raises(ValueError, match="plot_every_eval needs matplotlib"):
    plots.require()
