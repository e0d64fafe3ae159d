"""Knowledge distillation: a frozen teacher inside the student's jitted train step (config.distill).

The objective per token, masked and normalised like the cross-entropy it extends:

  alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student)

(Hinton et al. 2015: T^2 keeps the soft term's gradients on the scale of the hard one's.) With
`top_k` > 0 the teacher's distribution is its k most likely tokens, renormalised.

The teacher is any spjax workdir or Hugging Face directory with the student's vocabulary; every other
size may differ. Its params are an argument of the jitted step (never in the optimizer state, never
differentiated), sharded by the student's layout from their own logical names, and its output passes
through `stop_gradient`. Neither model's [B, T, V] logits are materialised whole: both run to their
final hidden states, and the unembedding, softmaxes and sums are taken `chunk_size` positions at a
time under `jax.checkpoint` (train/loss.py's `chunked_sums`, the loop config.loss_chunk_size's
cross-entropy uses too), so the backward pass recomputes one chunk's logits at a time.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from spjax import convert
from spjax.convert import hf
from spjax.convert import workdir as workdir_lib
from spjax.model import attention
from spjax.model import model as model_lib
from spjax.model import moe
from spjax.parallel import sharding
from spjax.train import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  temperature: float
  alpha: float
  top_k: int  # 0 = the full distribution
  chunk_size: int  # sequence positions per chunk; 0 = the whole sequence at once


@dataclasses.dataclass(frozen=True)
class Teacher:
  source: str
  is_hf: bool
  model_cfg: model_lib.ModelConfig
  graphdef: nnx.GraphDef
  shardings: nnx.State  # NamedSharding per param, from the student's layout
  settings: Settings

  def abstract_params(self):
    """ShapeDtypeStructs with shardings: what the step is lowered with (AOT, layout reports)."""
    abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(self.model_cfg,
                                                                        nnx.Rngs(0))), nnx.Param)[1]
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.shardings)

  def load_params(self, mesh, layout):
    """The teacher's params, each read straight into its sharding."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(layout.flax_rules()):
      if self.is_hf:
        model, _ = hf.from_pretrained(self.source, **_run_fields(self.model_cfg))
      else:
        model, _ = workdir_lib.load(self.source)
    return jax.device_put(nnx.state(model, nnx.Param), self.shardings)

  def objective(self):
    """`step.train_step`'s objective hook: loss_sums' arguments plus the teacher's params."""
    return functools.partial(objective, teacher_graphdef=self.graphdef, settings=self.settings)


def _run_fields(cfg: model_lib.ModelConfig) -> dict:
  """How the teacher runs (dtypes, scan, remat, attention): not its architecture."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if f.name not in hf.ARCHITECTURE_FIELDS}


def check_settings(config) -> Settings:
  d = config.distill
  def fail(field, why):
    raise ValueError(f"distill.{field}={d[field]!r}: {why}")
  if d.temperature <= 0:
    fail("temperature", "must be > 0")
  if not 0 <= d.alpha <= 1:
    fail("alpha", "must be in [0, 1] (the weight of the KL term; 1 - alpha weighs the CE)")
  if not 0 <= d.top_k < config.model.vocab_size:
    fail("top_k", f"must be in [0, model.vocab_size={config.model.vocab_size}) (0 = all tokens)")
  if config.loss_chunk_size:  # one chunking field per run, so none is silently ignored
    raise ValueError(f"config.loss_chunk_size={config.loss_chunk_size} is not used when "
                     f"distill.teacher is set: a distillation run chunks its loss (train step and "
                     f"eval) by distill.chunk_size (now {d.chunk_size}); set loss_chunk_size=0 and "
                     "distill.chunk_size to the positions per chunk")
  if d.chunk_size < 0:
    fail("chunk_size", "must be >= 0 (0 = the whole sequence at once)")
  if 0 < d.chunk_size < config.seq_len and config.seq_len % d.chunk_size:
    fail("chunk_size", f"must divide seq_len ({config.seq_len})")
  return Settings(float(d.temperature), float(d.alpha), int(d.top_k), int(d.chunk_size))


def build_teacher(config, student: model_lib.ModelConfig, layout, mesh) -> Teacher | None:
  """The teacher of `config.distill.teacher` (None when empty), checked on shapes only."""
  source = config.distill.teacher
  if not source:
    return None
  settings = check_settings(config)
  if not os.path.isdir(source):
    raise ValueError(f"distill.teacher={source!r} is not a directory; give a spjax workdir or a "
                     "Hugging Face model directory")
  saved = convert.read_config_json(source, "a spjax workdir or a Hugging Face model directory")
  is_hf = "model_type" in saved
  run_as = dict(dtype=student.dtype, remat_policy="none")  # no gradients: nothing to rematerialise
  if is_hf:
    cfg = hf.config_from_hf(saved, dtype=student.dtype, param_dtype=student.param_dtype)
    cfg = dataclasses.replace(cfg, scan_layers=student.scan_layers, remat_policy="none")
  elif "model" in saved:
    cfg = dataclasses.replace(
        model_lib.ModelConfig.from_config(ml_collections.ConfigDict(saved["model"])), **run_as)
  else:
    raise ValueError(f"distill.teacher={source!r}: its config.json is neither a spjax run's "
                     "(no 'model') nor a Hugging Face model's (no 'model_type')")
  if cfg.vocab_size != student.vocab_size:
    raise ValueError(f"distill.teacher={source!r} has a vocabulary of {cfg.vocab_size} tokens, the "
                     f"student (model.vocab_size) {student.vocab_size}; distillation compares "
                     "distributions over one vocabulary, so both must use the same tokenizer and "
                     "vocab_size")
  cfg = dataclasses.replace(cfg, attention=attention.choose(cfg, config.seq_len, layout, mesh))
  abstract_model = nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0)))
  graphdef, abstract = nnx.split(abstract_model, nnx.Param)
  shardings = sharding.param_shardings(abstract, mesh, layout)  # ValueError names a bad tensor
  micro_batch = config.per_device_batch_size * mesh.size
  for name, (shape, names) in model_lib.activation_shapes(cfg, micro_batch, config.seq_len).items():
    sharding.validate_tensor(layout, mesh, f"teacher {name}", shape, names)
  return Teacher(source, is_hf, cfg, graphdef, shardings, settings)


class BoundStep:
  """A jitted (state, batch, teacher_params) step used as (state, batch), like the plain step.

  The teacher's params are read on the first call (not at build, which works on shapes only);
  `lower` uses their abstract shapes, so ahead-of-time compiles need no checkpoint data.
  """

  def __init__(self, jitted, teacher: Teacher, mesh, layout):
    self._jitted, self._teacher, self._mesh, self._layout = jitted, teacher, mesh, layout
    self._params = None

  def __call__(self, state, batch):
    if self._params is None:
      self._params = self._teacher.load_params(self._mesh, self._layout)
    return self._jitted(state, batch, self._params)

  def lower(self, state, batch):
    return self._jitted.lower(state, batch, self._teacher.abstract_params())


def loss_mask(batch):
  """The tokens that count: `loss_mask` when the data provides one, else every non-padding token."""
  if "loss_mask" in batch:
    return batch["loss_mask"].astype(jnp.float32)
  return (batch["segment_ids"] > 0).astype(jnp.float32)  # [B, T]


def token_terms(student_logits, teacher_logits, targets, settings: Settings):
  """Per-token (nll, kl, log Z) [B, C] of logits [B, C, V]: KL(teacher_T || student_T)."""
  t = settings.temperature
  log_z = jax.nn.logsumexp(student_logits, axis=-1)  # [B, C]
  target = jnp.take_along_axis(student_logits, targets[..., None], axis=-1)[..., 0]
  log_q = jax.nn.log_softmax(student_logits / t, axis=-1)  # [B, C, V]
  if settings.top_k:
    top, idx = jax.lax.top_k(teacher_logits / t, settings.top_k)  # [B, C, k]
    log_p = jax.nn.log_softmax(top, axis=-1)
    log_q = jnp.take_along_axis(log_q, idx, axis=-1)
  else:
    log_p = jax.nn.log_softmax(teacher_logits / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return log_z - target, kl, log_z


def distill_sums(student, teacher, student_h, teacher_h, targets, mask, settings: Settings):
  """(nll sum, kl sum, log Z^2 sum) over the tokens of `mask` [B, T], from hidden states [B, T, D].

  `student`/`teacher` give `logits`. Chunked over the sequence by train/loss.py's loop: each
  chunk's logits of both models exist only inside its `jax.checkpoint`, forward and backward.
  """
  def sums(h_s, h_t, tgt, m):  # [B, C, D], [B, C, D'], [B, C], [B, C]
    nll, kl, log_z = token_terms(student.logits(h_s),
                                 jax.lax.stop_gradient(teacher.logits(h_t)), tgt, settings)
    return jnp.stack([jnp.sum(nll * m), jnp.sum(kl * m), jnp.sum(jnp.square(log_z) * m)])

  return loss_lib.chunked_sums(sums, (student_h, teacher_h, targets, mask), settings.chunk_size)


def objective(params, graphdef, batch, dropout_key, z_loss: float, scale, teacher_params, *,
              teacher_graphdef, settings: Settings, base=None, neftune_alpha: float = 0.0):
  """As `step.loss_sums` (`base`: a LoRA student's frozen weights): (objective * scale,
  (nll sum, token count, {"kl", "ce": sums x scale, i.e. this microbatch's share of the means}))."""
  student = nnx.merge(graphdef, params, *([] if base is None else [base]), copy=True)
  teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  student_h = student.hidden(*args, dropout_key=dropout_key,
                             neftune_alpha=neftune_alpha)  # [B, T, D]
  teacher_h = jax.lax.stop_gradient(teacher.hidden(*args))  # [B, T, D']
  nll, kl, log_z_sq = distill_sums(student, teacher, student_h, teacher_h, batch["targets"],
                                   loss_mask(batch), settings)
  a, t = settings.alpha, settings.temperature
  total = (a * t * t * kl + (1 - a) * nll + z_loss * log_z_sq) * scale
  count = jnp.sum(loss_mask(batch))
  total, logged = moe.add_aux(student, total, count, scale)  # an MoE student's aux losses
  return total, (nll, count, {"kl": kl * scale, "ce": nll * scale, **logged})
