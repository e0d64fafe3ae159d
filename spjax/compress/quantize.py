"""Weight-only quantization of a Transformer's matrices: int8 per output channel or int4 in groups.

A quantized param stays where it was in the model, with its logical names; its value becomes a
`QArray` (the integers, the weight's shape, and float32 scales). Reading it (`param[...]`, which is
how every layer reads its weights) returns the dequantized weight, so the model code runs unchanged
and XLA fuses the dequantize into the convert to the compute dtype that was already there. Only
integers and scales are stored: in the checkpoint and on the devices.

Symmetric absmax: scale = max |w| / qmax over the contracted axes of each output channel (int8,
qmax 127), or over each group of `group_size` consecutive entries of the last contracted axis (int4,
qmax 7); w ~ round(w / scale) * scale, off by at most scale / 2 per entry.

How a layer multiplies by an int8 per-channel weight is the spec's `activations` (each is measured
in BENCHMARKS.md, "Decode speed, int8 weights"):
  "float"   dequantize the weight, then the float matmul: exactly x @ (q * scale). XLA:CPU does
            not fuse the dequantize into the dot, so each weight is written out in float32 and
            read back: slower than float32 weights.
  "int8x2"  x split per row into two int8 limbs, x ~ sx * (x1 + x2 / 254) (an error of at most
            max|x| / 64516 per entry, about 15 bits), both limbs the rows of one int8 x int8 ->
            int32 dot (XLA:CPU hands it to YNNPACK's int8 kernels), times sx and the scales:
            weight-only accuracy from integer kernels, reading each weight once as int8.
  "int8"    w8a8: x quantized per row to int8 (absmax), one int8 dot: activations rounded to 8
            bits, so the model's quality changes (measured perplexity in BENCHMARKS.md).
Groups (int4) and the embeddings always take "float".

Which axes a matrix contracts is known from its name: attention o contracts (heads, head_dim), the
MLP's down contracts mlp, every other matrix contracts embed. The token embedding [V, D] gets one
scale per row, which serves both the lookup and the tied unembedding; embeddings are quantized only
when asked (`embeddings=True`).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

CONFIG_KEY = "quantization"  # a quantized workdir's config.json: Spec.to_dict()
_CONTRACTED = {"o": ("heads", "head_dim"), "down": ("mlp",)}  # the rest contract "embed"
_MATRICES = ("q", "k", "v", "o", "gate", "up", "down")
_EMBEDDINGS = ("embed", "unembed")
_QMAX = {8: 127, 4: 7}
_DTYPES = {8: jnp.int8, 4: jnp.int4}
ACTIVATIONS = ("float", "int8x2", "int8")  # how x meets an int8 per-channel weight (above)


@dataclasses.dataclass(frozen=True)
class QArray:
  """Integers and scales of one weight; `[...]` dequantizes (float32)."""
  qvalue: jax.Array  # the weight's shape, int8 or int4
  scale: jax.Array  # float32: the weight's shape with the contracted axes 1 (per channel), or the
  #                   last contracted axis in groups (size / group_size)
  axes: tuple[int, ...]  # the contracted axes, counted from the end (a layer stack adds a leading L)
  group_size: int  # 0 = per output channel
  activations: str = "float"  # one of ACTIVATIONS: how `product` multiplies by this weight

  @property
  def shape(self):
    return self.qvalue.shape

  @property
  def dtype(self):
    return jnp.dtype(jnp.float32)

  def dequantize(self) -> jax.Array:
    q = self.qvalue.astype(jnp.float32)
    if not self.group_size:
      return q * self.scale
    a = self.qvalue.ndim + self.axes[-1]
    grouped = q.reshape(q.shape[:a] + (-1, self.group_size) + q.shape[a + 1:])  # [.., A/g, g, ..]
    return (grouped * jnp.expand_dims(self.scale, a + 1)).reshape(q.shape)

  def __getitem__(self, index):
    return self.dequantize()[index]

  def product(self, x, fn, dtype):
    """fn(x, weight in dtype), the layer's product of x with this weight, whose contracted axes are
    x's trailing ones in order; "int8x2" / "int8" compute it from the integers (`int8_matmul`)."""
    nc = len(self.axes)
    leading = self.axes == tuple(range(-self.qvalue.ndim, -self.qvalue.ndim + nc))
    if self.activations == "float" or self.group_size or not leading:
      return fn(x, self.dequantize().astype(dtype))
    shape = self.qvalue.shape
    k, n = math.prod(shape[:nc]), math.prod(shape[nc:])
    y = int8_matmul(x.reshape(-1, k), self.qvalue.reshape(k, n), self.scale.reshape(1, n),
                    self.activations)  # [M, N] float32
    return y.reshape(x.shape[:-nc] + shape[nc:]).astype(dtype)


jax.tree_util.register_dataclass(QArray, data_fields=["qvalue", "scale"],
                                 meta_fields=["axes", "group_size", "activations"])


def int8_matmul(x, q, scale, activations: str):
  """x [M, K] (float) x the int8 weight q [K, N] with scale [1, N] -> [M, N] float32, the
  activations "int8x2" (two int8 limbs) or "int8" (one): see the module docstring. int32
  accumulation holds any K below 2^31 / 127^2 = 133,000."""
  x = x.astype(jnp.float32)
  m = x.shape[0]
  sx = jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-30) / 127  # [M, 1]
  x1 = jnp.clip(jnp.round(x / sx), -127, 127)
  if activations == "int8x2":  # the rounding residual, in [-sx/2, sx/2], on 254 steps per sx
    x2 = jnp.clip(jnp.round((x - x1 * sx) * (254 / sx)), -127, 127)
    rows = jnp.stack([x1, x2], axis=1)  # [M, 2, K]: a row's limbs side by side, so a sharded M
  elif m == 1:  # stays sharded. A one-row dot is a matrix-vector product XLA:CPU does in int32:
    rows = jnp.stack([x1, x1], axis=1)  # give it a second row (a zero row XLA folds back)
  else:
    rows = x1[:, None]  # [M, 1, K]
  acc = jax.lax.dot_general(rows.reshape(-1, x.shape[1]).astype(jnp.int8), q,
                            (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  acc = acc.astype(jnp.float32).reshape(m, rows.shape[1], -1)  # [M, 2 | 1, N]
  y = acc[:, 0] + acc[:, 1] * (1 / 254) if activations == "int8x2" else acc[:, 0]
  return y * sx * scale


def with_activations(params, activations: str):
  """A param State with every QArray set to multiply as `activations` says (one of ACTIVATIONS)."""
  if activations not in ACTIVATIONS:
    raise ValueError(f"quantization activations must be one of {ACTIVATIONS}, got {activations!r}")
  return jax.tree.map(
      lambda v: dataclasses.replace(v, activations=activations) if isinstance(v, QArray) else v,
      params, is_leaf=lambda v: isinstance(v, QArray))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to quantize and how (recorded in the workdir's config.json under CONFIG_KEY)."""
  bits: int = 8
  group_size: int = 0  # 0 = one scale per output channel
  embeddings: bool = False  # also the token embedding and the unembedding
  activations: str = "float"  # how layers multiply by int8 per-channel weights (ACTIVATIONS)

  @classmethod
  def from_dict(cls, d) -> "Spec":
    spec = cls(int(d["bits"]), int(d["group_size"]), bool(d["embeddings"]),
               str(d.get("activations", "float")))  # workdirs written before it: "float"
    if spec.activations not in ACTIVATIONS:
      raise ValueError(f"quantization activations must be one of {', '.join(ACTIVATIONS)}, got "
                       f"{spec.activations!r}")
    if spec.activations != "float" and (spec.bits != 8 or spec.group_size):
      raise ValueError(f"quantization activations {spec.activations!r} needs bits 8 per channel "
                       f"(group_size 0), got bits {spec.bits} group_size {spec.group_size}")
    if spec.bits not in _QMAX:
      raise ValueError(f"quantization bits must be 8 or 4, got {spec.bits}")
    if spec.group_size < 0:
      raise ValueError(f"quantization group_size must be >= 0 (0 = per channel), got "
                       f"{spec.group_size}")
    return spec

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def contracted_axes(path, var, spec: Spec) -> tuple[int, ...] | None:
  """Axes (negative) a param contracts in its matmul, or None if `spec` leaves it in float."""
  name = str(path[-1])
  if name not in _MATRICES + (_EMBEDDINGS if spec.embeddings else ()):
    return None
  names = tuple(var.get_metadata().get("out_sharding") or ())
  wanted = _CONTRACTED.get(name, ("embed",))
  if len(names) != len(var.shape) or not set(wanted) <= set(names):
    raise ValueError(f"param {'/'.join(map(str, path))} has logical names {names}, not the "
                     f"{wanted} quantization contracts over")
  return tuple(i - len(names) for i, n in enumerate(names) if n in wanted)


def _group(path, shape, axes, spec: Spec) -> int:
  """The group size along the last contracted axis: spec's, or the whole axis if it is shorter."""
  if not spec.group_size:
    return 0
  size = shape[axes[-1]]
  group = min(spec.group_size, size)
  if size % group:
    raise ValueError(f"param {'/'.join(map(str, path))} has {size} entries along its contracted "
                     f"axis, not a multiple of quantization group_size {group}; pick a divisor")
  return group


def quantize_array(w, axes: tuple[int, ...], bits: int, group_size: int) -> QArray:
  """Symmetric absmax quantization of w over `axes` (per channel) or in groups of the last one."""
  w = w.astype(jnp.float32)
  qmax = _QMAX[bits]
  if group_size:
    a = w.ndim + axes[-1]
    grouped = w.reshape(w.shape[:a] + (-1, group_size) + w.shape[a + 1:])  # [.., A/g, g, ..]
    absmax = jnp.max(jnp.abs(grouped), axis=a + 1, keepdims=True)
  else:
    grouped, absmax = w, jnp.max(jnp.abs(w), axis=axes, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / qmax, 1.0)  # an all-zero channel stays zero
  q = jnp.clip(jnp.round(grouped / scale), -qmax, qmax).astype(_DTYPES[bits]).reshape(w.shape)
  return QArray(q, jnp.squeeze(scale, a + 1) if group_size else scale, axes, group_size)


def abstract(abstract_params, spec: Spec):
  """The quantized counterpart of an abstract param State: QArrays of ShapeDtypeStructs."""
  def one(path, var):
    axes = contracted_axes(path, var, spec)
    if axes is None:
      return var
    shape = tuple(var.shape)
    group = _group(path, shape, axes, spec)
    scale = list(shape)
    for a in axes:
      scale[a] = 1
    if group:
      scale[axes[-1]] = shape[axes[-1]] // group
      for a in axes[:-1]:
        scale[a] = shape[a]  # grouped scales keep the other contracted axes (o: one per head)
    return var.replace(QArray(jax.ShapeDtypeStruct(shape, _DTYPES[spec.bits]),
                              jax.ShapeDtypeStruct(tuple(scale), jnp.float32), axes, group,
                              spec.activations))
  return _map_vars(one, abstract_params)


def shardings(abstract_qparams, mesh, layout):
  """NamedShardings of a (quantized) param State: integers as the weight, scales by the weight's
  logical names with the contracted axes unnamed (replicated along them)."""
  def one(path, var):
    names = tuple(var.get_metadata().get("out_sharding") or (None,) * len(var.shape))
    value = var.get_raw_value()
    if not isinstance(value, QArray):
      return var.replace(NamedSharding(mesh, layout.spec(names)))
    contracted = {len(names) + a for a in value.axes}
    scale_names = tuple(None if i in contracted else n for i, n in enumerate(names))
    return var.replace(QArray(NamedSharding(mesh, layout.spec(names)),
                              NamedSharding(mesh, layout.spec(scale_names)), value.axes,
                              value.group_size, value.activations))
  return _map_vars(one, abstract_qparams)


def quantize_params(params, spec: Spec, target_shardings=None):
  """Quantized copy of a param State, each matrix quantized where its shards live."""
  def one(path, var):
    axes = contracted_axes(path, var, spec)
    if axes is None:
      return var
    group = _group(path, tuple(var.shape), axes, spec)
    q = _quantize_jit(var[...], axes, spec.bits, group)
    return var.replace(dataclasses.replace(q, activations=spec.activations))
  out = _map_vars(one, params)
  if target_shardings is not None:
    out = jax.device_put(out, target_shardings)
  return out


_quantize_jit = jax.jit(quantize_array, static_argnums=(1, 2, 3))


def weight_bytes(params) -> dict:
  """{"weights": bytes of every param as stored (int4 counted as half a byte), "scales": bytes of
  the scales, "float": bytes the same params take in float32}."""
  out = {"weights": 0, "scales": 0, "float": 0}
  for _, var in nnx.to_flat_state(params):
    value = var.get_raw_value()
    size = math.prod(value.shape)
    out["float"] += 4 * size
    if isinstance(value, QArray):
      bits = 4 if value.qvalue.dtype == jnp.int4 else 8
      out["weights"] += size * bits // 8
      out["scales"] += math.prod(value.scale.shape) * value.scale.dtype.itemsize
    else:
      out["weights"] += size * jnp.dtype(value.dtype).itemsize
  return out


def _map_vars(fn, state):
  """fn(path, variable) -> variable over every Variable of an nnx State, keeping its structure."""
  flat = [(path, fn(path, var)) for path, var in nnx.to_flat_state(state)]
  return nnx.from_flat_state(flat)


# ==================================================================================================
# The command: spjax-quantize (tools/quantize.py); its usage is in tools/quantize.py.
# ==================================================================================================
def main(argv):
  import json
  import os
  import sys

  from absl import app, flags, logging
  from spjax.compress import workdirs
  from spjax.convert import workdir as workdir_lib
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every array at INFO
  try:
    config = workdir_lib.read_config(FLAGS.workdir)
    if config.get(CONFIG_KEY):
      raise ValueError(f"{FLAGS.workdir} is quantized already ({config[CONFIG_KEY]}); quantize "
                       "its source")
    group = FLAGS.group_size if FLAGS.group_size is not None else (128 if FLAGS.bits == 4 else 0)
    activations = FLAGS.activations or ("int8x2" if FLAGS.bits == 8 and not group else "float")
    spec = Spec.from_dict({"bits": FLAGS.bits, "group_size": group,
                           "embeddings": FLAGS.embeddings, "activations": activations})
    with workdirs.layout_scope(FLAGS.layout or config["layout"]) as (mesh, layout):
      params, _, step = workdir_lib.load_params(FLAGS.workdir, FLAGS.step)
      target = shardings(abstract(jax.eval_shape(lambda: params), spec), mesh, layout)
      qparams = quantize_params(params, spec, target)
      saved = workdirs.write(FLAGS.out, config | {
          CONFIG_KEY: spec.to_dict(),
          "quantized_from": f"{os.path.abspath(FLAGS.workdir)}@{step}"}, qparams, step)
  except ValueError as e:
    print(f"spjax-quantize: {e}", file=sys.stderr)
    sys.exit(2)
  sizes = weight_bytes(qparams) | {"checkpoint_on_disk": workdirs.disk_bytes(saved)}
  print(f"spjax-quantize: step {step} of {FLAGS.workdir} as int{spec.bits}"
        f"{f' groups of {spec.group_size}' if spec.group_size else ' per channel'} -> {FLAGS.out}: "
        f"weights {sizes['weights']:,} bytes + scales {sizes['scales']:,} (float32: "
        f"{sizes['float']:,}); checkpoint on disk {sizes['checkpoint_on_disk']:,} bytes")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"step": step, **spec.to_dict(), **sizes}, f, indent=2)


def run():
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "spjax run directory to quantize.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
  flags.DEFINE_string("out", None, "Directory to write the quantized workdir to (new).")
  flags.DEFINE_integer("bits", None, "8: int8 per output channel; 4: int4 in groups.")
  flags.DEFINE_integer("group_size", None, "Entries per scale along the contracted axis; 0 = per "
                       "channel. Default 128 for --bits=4, 0 for --bits=8.")
  flags.DEFINE_bool("embeddings", False, "Also quantize the token embedding and unembedding.")
  flags.DEFINE_enum("activations", None, list(ACTIVATIONS), "How layers multiply by int8 "
                    "per-channel weights: float (dequantize), int8x2 (two int8 limbs: weight-only "
                    "accuracy, integer kernels), int8 (w8a8). Default int8x2 for int8 per channel, "
                    "else float. See spjax/compress/quantize.py.")
  flags.DEFINE_string("layout", None, "Layout to place the params under; default the run's.")
  flags.DEFINE_string("json", "", "Write the step, spec and byte counts to this JSON file.")
  flags.mark_flags_as_required(["workdir", "out", "bits"])
  app.run(main)
