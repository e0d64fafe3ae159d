"""LoRA (Hu et al. 2021): a trainable low-rank path beside frozen kernels, W x + B A x * alpha / r.

`attach` puts an `Adapter` next to each kernel whose path ("blocks/attn/q"; unscanned models
"blocks/0/attn/q") a `config.lora.targets` regex finds, as the module's attribute `<kernel>_lora`;
`spjax.model.layers.adapted` adds its output to the kernel's wherever the kernel is used.

The adapter matrices are `nnx.LoRAParam`s (flax's LoRA type, a subclass of `nnx.Param`) with
logical axis names, so every layout shards them as it shards their kernel, and a scanned stack's
adapters are stacked along `layers` as its kernels are. Everything else follows from the type:
the train step differentiates and the optimizer updates only `LoRAParam`s; checkpoints hold only
them. Kernels here are not always matrices (q is [D, H, Dh], o is [H, Dh, D]), so the adapter keeps
the kernel's input dimensions on A and its output dimensions on B, e.g. q: A [D, r], B [r, H, Dh];
flax's `nnx.LoRA` module, matrices only, does not fit those, so only its type and initializers are
used. `merge` folds adapters into their kernels (W + A @ B * alpha / r) for export and decoding.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from spjax.model import layers
from spjax.model import model as model_lib

ADAPTERS = nnx.LoRAParam  # filter: what trains under LoRA
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # filter: everything else, frozen
_STREAM = 1  # adapters draw from the seed folded with this: the base's init never depends on them


class Adapter(nnx.Module):
  """x -> dropout(x) . A . B * alpha / rank for one kernel; A's init is nnx.LoRA's, B starts at 0.

  A [*in, r] has the kernel's input dimensions and logical names, B [r, *out] its output ones
  (both with a leading `layers` axis when the kernel is a scanned stack's).
  """

  def __init__(self, kernel: nnx.Param, inputs: int, rank: int, alpha: float, dropout: float,
               key):
    names = tuple(kernel.get_metadata()["out_sharding"])
    lead = 1 if names[0] == "layers" else 0  # scanned: one adapter per layer, stacked
    shape = tuple(kernel.shape)
    cut = lead + inputs
    stack, ins, outs = shape[:lead], shape[lead:cut], shape[cut:]
    stack_names, in_names, out_names = names[:lead], names[lead:cut], names[cut:]
    # he_uniform is nnx.LoRA's default for A; batch_axis keeps each layer's fan-in its own.
    init_a = nnx.initializers.he_uniform(batch_axis=tuple(range(lead)))
    self.lora_a = nnx.LoRAParam(init_a(key, stack + ins + (rank,), kernel.dtype),
                                out_sharding=stack_names + in_names + ("lora_rank",),
                                eager_sharding=False)
    self.lora_b = nnx.LoRAParam(jnp.zeros(stack + (rank,) + outs, kernel.dtype),
                                out_sharding=stack_names + ("lora_rank",) + out_names,
                                eager_sharding=False)
    self.inputs, self.scale, self.rate, self.stacked = inputs, alpha / rank, dropout, bool(lead)

  def __call__(self, x, key, name: str):  # x [B, T, *in] -> [B, T, *out]; key None in eval
    """`name`: the checkpoint name of the [B, T, r] product, what remat policies may keep."""
    x = layers.dropout(x, self.rate, key)
    h = jnp.tensordot(x, self.lora_a[...].astype(x.dtype), axes=self.inputs)  # [B, T, r]
    h = jax.ad_checkpoint.checkpoint_name(h, name)
    return jnp.tensordot(h * self.scale, self.lora_b[...].astype(x.dtype), axes=1)


def kernels(model) -> dict:
  """{path: (module, kernel name, input dims)} of every kernel an adapter can sit beside."""
  out = {}
  for path, module in nnx.iter_graph(model):
    for name, inputs in getattr(type(module), "KERNELS", {}).items():
      if isinstance(getattr(module, name, None), nnx.Param):
        out["/".join(map(str, path + (name,)))] = (module, name, inputs)
  return dict(sorted(out.items()))


def targeted(model, patterns) -> dict:
  """The part of `kernels(model)` some regex of `patterns` finds (re.search); ValueError naming a
  pattern that is not a regex or finds nothing."""
  if isinstance(patterns, str) or not patterns:
    raise ValueError(f"lora.targets must be a non-empty tuple of regexes, got {patterns!r}")
  found = kernels(model)
  chosen = {}
  for pattern in patterns:
    try:
      regex = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ValueError(f"lora.targets: {pattern!r} is not a regular expression ({e})") from None
    hits = {p: v for p, v in found.items() if regex.search(p)}
    if not hits:
      raise ValueError(f"lora.targets: {pattern!r} matches no kernel; kernels: "
                       f"{', '.join(found)}")
    chosen |= hits
  return dict(sorted(chosen.items()))


def validate(lora_cfg, model_cfg: model_lib.ModelConfig) -> None:
  """Raises ValueError naming the `lora.*` field that cannot work."""
  rank = lora_cfg.rank
  if not isinstance(rank, int) or rank < 0:
    raise ValueError(f"lora.rank must be an integer >= 0 (0 = off), got {rank!r}")
  if rank == 0:
    return
  if not lora_cfg.alpha > 0:
    raise ValueError(f"lora.alpha must be > 0 (adapters are scaled by alpha / rank), got "
                     f"{lora_cfg.alpha}")
  if not 0.0 <= lora_cfg.dropout < 1.0:
    raise ValueError(f"lora.dropout must be in [0, 1), got {lora_cfg.dropout}")
  model = nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(0)))
  for path, (module, name, inputs) in targeted(model, lora_cfg.targets).items():
    shape = getattr(module, name).shape[1 if model_cfg.scan_layers else 0:]
    fan_in, fan_out = math.prod(shape[:inputs]), math.prod(shape[inputs:])
    if rank > min(fan_in, fan_out):
      raise ValueError(f"lora.rank={rank} is not low rank for {path} ({fan_in} inputs x "
                       f"{fan_out} outputs); use at most {min(fan_in, fan_out)}")


def attach(model, lora_cfg, seed: int):
  """`model` (in place) with a fresh Adapter beside each targeted kernel; returns it."""
  key = jax.random.fold_in(jax.random.key(seed), _STREAM)
  for i, (module, name, inputs) in enumerate(targeted(model, lora_cfg.targets).values()):
    setattr(module, name + "_lora",
            Adapter(getattr(module, name), inputs, lora_cfg.rank, lora_cfg.alpha,
                    lora_cfg.dropout, jax.random.fold_in(key, i)))
  return model


def with_adapters(params: nnx.State, model_cfg, lora_cfg, seed: int) -> nnx.State:
  """A base model's param State plus fresh adapters (what `attach` adds) beside its kernels."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Transformer(model_cfg, nnx.Rngs(0))))
  return nnx.state(attach(nnx.merge(graphdef, params), lora_cfg, seed), nnx.Param)


def merge(model):
  """In place: each adapted kernel becomes W + A @ B * alpha / rank (summed in float32, stored in
  W's dtype and sharding) and its adapter is removed. Returns the model, now a plain Transformer."""
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
  for module in modules:
    for attr, adapter in list(vars(module).items()):
      if isinstance(adapter, Adapter):
        kernel = getattr(module, attr.removesuffix("_lora"))
        fold = jax.jit(functools.partial(_merged, scale=adapter.scale, stacked=adapter.stacked),
                       out_shardings=kernel[...].sharding)
        kernel[...] = fold(kernel[...], adapter.lora_a[...], adapter.lora_b[...])
        delattr(module, attr)
  return model


def _merged(w, a, b, *, scale: float, stacked: bool):
  """w [L?, *in, *out] + a [L?, *in, r] . b [L?, r, *out] * scale."""
  delta = functools.partial(jnp.tensordot, axes=1)  # a's last dimension with b's first
  delta = jax.vmap(delta) if stacked else delta
  update = delta(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
  return (w.astype(jnp.float32) + update).astype(w.dtype)
