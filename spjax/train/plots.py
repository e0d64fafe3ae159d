"""Charts of runs' metrics.jsonl: loss (train, eval, eval per domain), learning rate, tokens/s, MFU.

One figure, two rows: the same four panels against optimizer steps and against training tokens
(`train/tokens`), each run in its own colour, so runs of different batch sizes (layouts, mixtures)
compare on either axis. matplotlib is imported only when a chart is drawn: `pip install spjax[plot]`.
"""

import json
import os

PANELS = (("loss", "loss (train solid, eval dashed, eval per domain dotted)"),
          ("train/learning_rate", "learning rate"),
          ("train/tokens_per_sec", "tokens/s"),
          ("train/mfu", "MFU"))


def require():
  """ValueError if matplotlib is missing (checked before a run that plots at every eval compiles)."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise ValueError("config.plot_every_eval needs matplotlib: pip install 'spjax[plot]' "
                     "(or set config.plot_every_eval=False)") from None


def read(workdir: str) -> list[dict]:
  """The lines of WORKDIR/metrics.jsonl merged per step, the last write of a key winning (a resumed
  run repeats the steps after its checkpoint), in step order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no metrics.jsonl: not a spjax run directory")
  by_step = {}
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record.pop("step"))
      except (ValueError, KeyError):
        raise ValueError(f"{path}:{n} is not a metrics line (JSON with a 'step')") from None
      by_step.setdefault(step, {}).update(record)
  return [{"step": s, **by_step[s]} for s in sorted(by_step)]


def _series(rows, key, x):
  pts = [(r[x], r[key]) for r in rows if key in r and x in r]
  return [p[0] for p in pts], [p[1] for p in pts]


def figure(workdirs, labels=None):
  """The matplotlib figure of the runs in `workdirs`."""
  import matplotlib
  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  labels = list(labels or [os.path.basename(os.path.normpath(w)) for w in workdirs])
  runs = [read(w) for w in workdirs]
  fig, axes = plt.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 7.2), squeeze=False)
  for color, (label, rows) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10,
                                  zip(labels, runs)):
    # tokens seen after each step: from train lines; eval lines share their step's count
    tokens = {r["step"]: r["train/tokens"] for r in rows if "train/tokens" in r}
    for r in rows:
      if r["step"] in tokens:
        r["tokens"] = tokens[r["step"]]
    domains = sorted({k.split("/")[1] for r in rows for k in r
                      if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2})
    for row, x in enumerate(("step", "tokens")):
      for col, (key, _) in enumerate(PANELS):
        ax = axes[row][col]
        if key == "loss":
          ax.plot(*_series(rows, "train/loss", x), color=color, label=f"{label} train")
          ax.plot(*_series(rows, "eval/loss", x), color=color, linestyle="--", marker="o",
                  markersize=3, label=f"{label} eval")
          for d in domains:
            xs, ys = _series(rows, f"eval/{d}/loss", x)
            ax.plot(xs, ys, color=color, linestyle=":", linewidth=1)
            if xs:
              ax.annotate(d, (xs[-1], ys[-1]), fontsize=6, color=color)
        else:
          ax.plot(*_series(rows, key, x), color=color, label=label)
  for row, x in enumerate(("optimizer step", "training tokens")):
    for col, (key, title) in enumerate(PANELS):
      ax = axes[row][col]
      ax.set_xlabel(x)
      ax.set_title(title, fontsize=9)
      ax.grid(alpha=0.3)
      if key == "loss":
        ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot(workdirs, out: str, labels=None) -> str:
  """Draws the runs in `workdirs` into the PNG `out`; returns `out`."""
  import matplotlib.pyplot as plt
  fig = figure(workdirs, labels)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out + ".tmp.png", dpi=90)  # whole or not at all: a reader never sees half a file
  os.replace(out + ".tmp.png", out)
  plt.close(fig)
  return out
