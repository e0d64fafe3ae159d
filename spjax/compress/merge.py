"""Model fusion: one set of params from several checkpoints of the same architecture.

  spjax-merge --method=uniform --out=/tmp/soup /tmp/run@800 /tmp/run@900 /tmp/run@1000
  spjax-merge --method=weighted --weights=1,2,1 --out=DIR A B C
  spjax-merge --method=greedy --out=DIR A@800 A@900 A@1000        # greedy soup by eval loss
  spjax-merge --method=task_arithmetic --base=BASE --lambdas=0.5,0.5 --out=DIR FT1 FT2
  spjax-merge --method=slerp --t=0.5 --out=DIR A B

An INPUT is a workdir (its newest checkpoint) or WORKDIR@STEP: steps of one run, or runs fine-tuned
from one base. Methods:
- uniform: the mean; weighted: sum w_i p_i / sum w_i (--weights, positive).
- greedy (Wortsman et al., model soups): ingredients sorted by eval loss, best first; each joins the
  (uniform) soup only if the soup's eval loss falls. The eval is spjax-eval's, on the first input's
  config.data, so the soup is never worse than its best ingredient on that data.
- task_arithmetic: base + sum lambda_i (p_i - base) (--base, --lambdas; default 1 each).
- slerp: spherical interpolation of two, tensor by tensor, at --t (0 = the first, 1 = the second);
  nearly parallel tensors are interpolated linearly.

All arithmetic is float32 on params restored shard by shard into the first input's layout (one
input at a time beside the running result, never gathered on one host); running means update
m += (p - m) * w / W, so merging identical checkpoints returns them bit for bit. OUT is a workdir
(config.json: the first input's plus "merged_from") that spjax-eval, spjax-generate,
spjax-convert-hf and spjax-quantize read. Bad inputs exit with status 2 and a sentence naming the
problem.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections

from spjax.convert import hf
from spjax.convert import workdir as workdir_lib

METHODS = ("uniform", "weighted", "greedy", "task_arithmetic", "slerp")


def check_compatible(inputs: list[tuple[str, int | None]]) -> dict:
  """The first input's config; ValueError if any input is quantized or has another architecture."""
  configs = [workdir_lib.read_config(w) for w, _ in inputs]
  first_dir, first = inputs[0][0], configs[0]["model"]
  for (workdir, _), config in zip(inputs, configs):
    if config.get("quantization"):
      raise ValueError(f"input {workdir} is quantized; merge the float checkpoints it came from")
    model = config["model"]
    for field in ("vocab_size",) + tuple(f for f in hf.ARCHITECTURE_FIELDS if f != "vocab_size") \
        + ("scan_layers",):
      if model.get(field) != first.get(field):
        what = "vocabulary size" if field == "vocab_size" else f"model.{field}"
        raise ValueError(f"inputs have different architectures: {what} is {first.get(field)} in "
                         f"{first_dir} but {model.get(field)} in {workdir}; only checkpoints of "
                         "one architecture can be merged")
  return configs[0]


# Running-result updates, jitted once per tree structure; the running result is donated.
@jax.jit
def _f32(params):
  return jax.tree.map(lambda p: p.astype(jnp.float32), params)


@jax.jit
def _running_mean(mean, params, share):
  """mean + (params - mean) * share: exact where params == mean."""
  return jax.tree.map(lambda m, p: m + (p.astype(jnp.float32) - m) * share, mean, params)


@jax.jit
def _add_task(acc, params, base, lam):
  return jax.tree.map(lambda a, p, b: a + lam * (p.astype(jnp.float32) - b), acc, params, base)


@jax.jit
def _slerp(a, b, t):
  def one(x, y):
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    nx, ny = jnp.linalg.norm(x32), jnp.linalg.norm(y32)
    cos = jnp.clip(jnp.vdot(x32, y32) / jnp.maximum(nx * ny, 1e-30), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    linear = x32 + t * (y32 - x32)
    # Plain slerp of the raw tensors (their norms interpolate along the arc as well).
    spherical = (jnp.sin((1 - t) * omega) * x32 + jnp.sin(t * omega) * y32) / jnp.where(
        sin > 1e-6, sin, 1.0)
    return jnp.where(sin > 1e-6, spherical, linear)
  return jax.tree.map(one, a, b)


@dataclasses.dataclass
class Merger:
  """Restores inputs into the active layout and combines them; `evaluate(params)` -> eval loss."""
  evaluate: object = None  # params -> float, for greedy

  def load(self, spec):
    params, _, step = workdir_lib.load_params(*spec)
    return params, step

  def mean(self, inputs, weights):
    total, out = 0.0, None
    for spec, w in zip(inputs, weights):
      params, _ = self.load(spec)
      total += w
      out = _f32(params) if out is None else _running_mean(out, params, w / total)
    return out

  def task_arithmetic(self, base_spec, inputs, lambdas):
    base = _f32(self.load(base_spec)[0])
    out = base
    for spec, lam in zip(inputs, lambdas):
      out = _add_task(out, self.load(spec)[0], base, lam)
    return out

  def slerp(self, inputs, t):
    return _slerp(self.load(inputs[0])[0], self.load(inputs[1])[0], t)

  def greedy(self, inputs, log=print):
    """(soup, [(input, its loss, kept)]): best ingredient first, then each one that lowers the loss."""
    losses = [self.evaluate(self.load(spec)[0]) for spec in inputs]
    order = sorted(range(len(inputs)), key=lambda i: losses[i])
    soup, n, best = _f32(self.load(inputs[order[0]])[0]), 1, losses[order[0]]
    report = [(inputs[order[0]], best, True)]
    log(f"greedy soup: {_name(inputs[order[0]])} (loss {best:.4f}) starts the soup")
    for i in order[1:]:
      candidate = _running_mean(soup, self.load(inputs[i])[0], 1.0 / (n + 1))
      loss = self.evaluate(candidate)
      kept = loss < best
      log(f"greedy soup: + {_name(inputs[i])} (alone {losses[i]:.4f}): soup loss {loss:.4f} -> "
          f"{'kept' if kept else 'left out'}")
      if kept:
        soup, n, best = candidate, n + 1, loss
      report.append((inputs[i], losses[i], kept))
    return soup, report


def _name(spec):
  workdir, step = spec
  return workdir if step is None else f"{workdir}@{step}"


def _floats(text: str, flag: str, count: int, default: float | None = None) -> list[float]:
  if not text:
    if default is None:
      raise ValueError(f"--{flag} is required: {count} comma-separated numbers, one per input")
    return [default] * count
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    raise ValueError(f"--{flag}={text!r} must be comma-separated numbers") from None
  if len(values) != count:
    raise ValueError(f"--{flag} has {len(values)} values for {count} inputs; give one per input")
  return values


def merge(method: str, specs: list[str], out: str, *, weights: str = "", lambdas: str = "",
          base: str = "", t: float = 0.5, log=print, force: bool = False) -> dict:
  """Runs one merge and writes OUT (replacing its checkpoints if `force`); returns {"step",
  "method", "inputs", ... (greedy: its report)}. Every input check runs before any array is read."""
  from spjax.compress import workdirs
  from spjax.data import tokenizer as tokenizer_lib
  from spjax.infer import evaluate as evaluate_lib
  from spjax.train import program as program_lib
  if method not in METHODS:
    raise ValueError(f"unknown --method {method!r}; valid methods: {', '.join(METHODS)}")
  if not specs:
    raise ValueError("give at least one INPUT (a workdir or WORKDIR@STEP)")
  inputs = [workdirs.parse_input(s) for s in specs]
  base_spec = workdirs.parse_input(base) if base else None
  config = check_compatible(inputs + ([base_spec] if base_spec else []))
  extra = {}
  if method == "weighted":
    w = _floats(weights, "weights", len(inputs))
    if min(w) <= 0:
      raise ValueError(f"--weights must all be positive, got {weights}")
    extra["weights"] = w
  if method == "task_arithmetic":
    if base_spec is None:
      raise ValueError("--method=task_arithmetic needs --base=WORKDIR[@STEP], the model the inputs "
                       "were fine-tuned from")
    extra |= {"base": _name(base_spec), "lambdas": _floats(lambdas, "lambdas", len(inputs), 1.0)}
  if method == "slerp":
    if len(inputs) != 2:
      raise ValueError(f"--method=slerp interpolates exactly 2 inputs, got {len(inputs)}")
    if not 0.0 <= t <= 1.0:
      raise ValueError(f"--t must be in [0, 1], got {t}")
    extra["t"] = t
  if method == "greedy" and len(inputs) < 2:
    raise ValueError("--method=greedy needs at least 2 inputs to choose from")
  steps = [workdir_lib.state_dir(*spec)[1] for spec in inputs]  # ValueError for a missing step

  run = ml_collections.ConfigDict(config)
  run.init_from = ""  # the weights are the inputs'
  prog = program_lib.build(run)
  merger = Merger()
  with prog.activate():
    if method == "greedy":
      evaluation = evaluate_lib.Evaluation(
          run, tokenizer_lib.load(run.data.tokenizer), prog.batch_sharding,
          batch_size=run.per_device_batch_size * prog.mesh.size)
      eval_step = prog.jit_eval_step()
      merger.evaluate = lambda params: evaluation(eval_step, params)[0]["eval/loss"]
      merged, report = merger.greedy(inputs, log)
      extra["ingredients"] = [{"input": _name(s), "eval/loss": float(l), "kept": k}
                              for s, l, k in report]
    elif method in ("uniform", "weighted"):
      merged = merger.mean(inputs, extra.get("weights", [1.0] * len(inputs)))
    elif method == "task_arithmetic":
      merged = merger.task_arithmetic(base_spec, inputs, extra["lambdas"])
    else:
      merged = merger.slerp(inputs, t)
    dtype = jnp.dtype(run.model.param_dtype)
    merged = jax.tree.map(lambda p: p.astype(dtype), merged)  # stored as the run stores params
    record = {"method": method, "inputs": [_name(s) for s in inputs], **extra}
    workdirs.write(out, config | {"merged_from": record}, merged, max(steps), force=force)
  return {"step": max(steps), **record}


def main(argv):
  from absl import flags, logging
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every array at INFO
  try:
    if not FLAGS.out:
      raise ValueError("--out=DIR is required: where the merged workdir goes")
    result = merge(FLAGS.method, [os.path.expanduser(a) for a in argv[1:]], FLAGS.out,
                   weights=FLAGS.weights, lambdas=FLAGS.lambdas, base=FLAGS.base, t=FLAGS.t)
  except ValueError as e:
    print(f"spjax-merge: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"spjax-merge: {result['method']} of {len(result['inputs'])} input(s) -> {FLAGS.out} "
        f"(step {result['step']})")


def run():
  from absl import app, flags
  flags.DEFINE_string("method", "uniform", f"One of {', '.join(METHODS)}.")
  flags.DEFINE_string("out", None, "Directory to write the merged workdir to (new).")
  flags.DEFINE_string("weights", "", "weighted: one positive weight per input, comma-separated.")
  flags.DEFINE_string("lambdas", "", "task_arithmetic: one scale per input; default 1 each.")
  flags.DEFINE_string("base", "", "task_arithmetic: WORKDIR[@STEP] the inputs were tuned from.")
  flags.DEFINE_float("t", 0.5, "slerp: 0 = the first input, 1 = the second.")
  app.run(main)


if __name__ == "__main__":
  run()
