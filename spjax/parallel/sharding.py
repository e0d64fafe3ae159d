"""Logical axes, layouts (logical axis -> mesh axes) and meshes.

The model names tensor dimensions with the logical axes below; a Layout maps each to a tuple of mesh
axes (empty = replicated). Nothing else in spjax decides where a tensor lives. Validation happens here,
on shapes only, so a bad layout fails with a sentence before anything is traced or compiled.
"""

import ast
import dataclasses
import json
import math
import os

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# lora_rank: the low-rank dimension of LoRA adapters (spjax/tune/lora.py); replicated unless a layout
# maps it (it is small, and its partners' axes already shard each adapter).
PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "expert",
              "lora_rank")
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_kv_heads", "act_mlp",
                   "act_vocab")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "expert", "stage")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Ordered rules logical axis -> mesh axes, plus the mesh sizes the layout was designed for."""
  rules: tuple[tuple[str, tuple[str, ...]], ...]  # every logical axis, in LOGICAL_AXES order
  mesh: dict  # default ici sizes, e.g. {"fsdp": -1, "tensor": 2}; config overrides
  dcn_mesh: dict  # default dcn (across slices) sizes
  source: str  # what the user wrote, for messages

  @classmethod
  def from_rules(cls, rules: dict, source: str, mesh=None, dcn_mesh=None) -> "Layout":
    full = {}
    for logical, axes in rules.items():
      if logical not in LOGICAL_AXES:
        raise ValueError(f"layout {source!r}: unknown logical axis {logical!r}; valid logical axes: "
                         f"{', '.join(LOGICAL_AXES)}")
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      for axis in axes:
        if axis not in MESH_AXES:
          raise ValueError(f"layout {source!r}: logical axis {logical!r} maps to unknown mesh axis "
                           f"{axis!r}; valid mesh axes: {', '.join(MESH_AXES)}")
      if len(set(axes)) != len(axes):
        raise ValueError(f"layout {source!r}: logical axis {logical!r} names a mesh axis twice: "
                         f"{axes}")
      full[logical] = axes
    for group, sizes in (("mesh", mesh or {}), ("dcn_mesh", dcn_mesh or {})):
      for axis in sizes:
        if axis not in MESH_AXES:
          raise ValueError(f"layout {source!r}: {group} names unknown mesh axis {axis!r}; "
                           f"valid mesh axes: {', '.join(MESH_AXES)}")
    # Without mesh defaults the remaining devices go to data parallelism.
    return cls(tuple((a, full.get(a, ())) for a in LOGICAL_AXES), dict(mesh or {"data": -1}),
               dict(dcn_mesh or {"data": -1}), source)

  @classmethod
  def parse(cls, spec: str, presets: dict | None = None) -> "Layout":
    """A preset name (a key of `presets`), a "logical:mesh,mesh;logical:mesh" string, or a
    .json/.py rules file. `spjax.parallel.layouts.parse` passes the named presets in, so this
    module depends on nothing above it."""
    presets = presets or {}
    spec = spec.strip()
    if spec in presets:
      return presets[spec]
    if spec.endswith((".json", ".py")):
      return _load_rules_file(spec)
    if ":" not in spec:
      raise ValueError(f"layout {spec!r} is neither a preset ({', '.join(presets)}), a "
                       "rules string like 'batch:data,fsdp;embed:fsdp', nor a .json/.py rules file")
    rules = {}
    for item in filter(None, (s.strip() for s in spec.split(";"))):
      logical, sep, axes = item.partition(":")
      if not sep:
        raise ValueError(f"layout {spec!r}: {item!r} is not of the form logical:mesh_axis[,...]")
      names = [a.strip() for a in axes.split(",") if a.strip() and a.strip().lower() != "none"]
      rules[logical.strip()] = tuple(names)
    return cls.from_rules(rules, spec)

  def axes_for(self, logical: str) -> tuple[str, ...]:
    return dict(self.rules)[logical]

  def spec(self, names) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions have these logical names (None = replicated)."""
    table = dict(self.rules)
    return PartitionSpec(*(_spec_entry(table.get(n, ())) if n else None for n in names))

  def flax_rules(self):
    """The rules in the form `nnx.logical_axis_rules` takes, read back by `constrain`."""
    return tuple((logical, axes or None) for logical, axes in self.rules)

  def describe(self) -> str:
    width = max(map(len, LOGICAL_AXES))
    return "\n".join(f"  {logical:<{width}} -> {','.join(axes) or '(replicated)'}"
                     for logical, axes in self.rules)


def _spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, an axis, or a tuple of axes) as a tuple."""
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _load_rules_file(path: str) -> Layout:
  """JSON: {"rules": {logical: [mesh axes]}, "mesh": {...}}; Python: RULES = {...}, MESH = {...}."""
  if not os.path.exists(path):
    raise ValueError(f"layout rules file {path!r} does not exist")
  with open(path) as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"layout rules file {path!r} is not valid JSON: {e}") from None
  else:  # a Python file of plain literals: RULES = {...}; MESH = {...}; DCN_MESH = {...}
    data = {}
    for node in ast.parse(text, path).body:
      if isinstance(node, ast.Assign) and len(node.targets) == 1:
        data[node.targets[0].id.lower()] = ast.literal_eval(node.value)
  if not isinstance(data.get("rules"), dict):
    raise ValueError(f"layout rules file {path!r} must define a 'rules' mapping (RULES in Python) "
                     "of logical axis -> list of mesh axes")
  return Layout.from_rules(data["rules"], path, data.get("mesh"), data.get("dcn_mesh"))


# ---------------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------------


def resolve_mesh_shape(mesh_cfg, layout: Layout, num_devices: int, num_slices: int = 1):
  """(ici sizes, dcn sizes) per MESH_AXES from config, layout defaults and the device count.

  Config values: 0 = the layout's default (else 1), -1 = fill the remaining devices, n = exactly n.
  On one physical slice (CPU, one TPU slice) dcn sizes > 1 simulate slices as device blocks.
  """
  if num_slices == 1:
    num_slices = math.prod(max(int(mesh_cfg.dcn[a]) or layout.dcn_mesh.get(a, 1), 1)
                           for a in MESH_AXES)
    if num_devices % num_slices:
      raise ValueError(f"mesh.dcn sizes multiply to {num_slices} simulated slices, which does not "
                       f"divide the {num_devices} devices")
  dcn = _fill("mesh.dcn", mesh_cfg.dcn, layout.dcn_mesh, num_slices)
  ici = _fill("mesh.ici", mesh_cfg.ici, layout.mesh, num_devices // num_slices)
  return ici, dcn


def _fill(group: str, cfg_sizes, defaults: dict, total: int) -> dict:
  user = {axis: int(cfg_sizes[axis]) for axis in MESH_AXES}
  for axis, size in user.items():
    if size < -1:
      raise ValueError(f"{group}.{axis} = {size}: use a positive size, -1 (fill) or 0 (default)")
  user_fills = -1 in user.values()  # then the layout's own fill axis steps aside
  sizes = {a: user[a] or (1 if user_fills and defaults.get(a) == -1 else defaults.get(a, 1))
           for a in MESH_AXES}
  fills = [a for a, s in sizes.items() if s == -1]
  if len(fills) > 1:
    raise ValueError(f"{group}: only one axis may be -1 (fill), got {', '.join(fills)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fills:
    if total % known:
      raise ValueError(f"{group}: the fixed sizes {_fmt(sizes)} multiply to {known}, which does not "
                       f"divide the {total} devices available")
    sizes[fills[0]] = total // known
  elif known != total:
    raise ValueError(f"{group}: sizes {_fmt(sizes)} multiply to {known} but there are {total} "
                     "devices; change a size or set one axis to -1 to fill")
  return sizes


def _fmt(sizes: dict) -> str:
  return " x ".join(f"{a}={'fill' if s == -1 else s}" for a, s in sizes.items() if s != 1) or "all 1"


def make_mesh(mesh_cfg, layout: Layout, devices=None) -> Mesh:
  """A mesh with every axis in MESH_AXES (size-1 axes included) and Auto axis types.

  Across slices (dcn sizes > 1) each mesh axis is dcn x ici, slices outermost, so collectives over
  an axis that is only in ici stay within a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  ici, dcn = resolve_mesh_shape(mesh_cfg, layout, len(devices), len(slices))
  if math.prod(dcn.values()) > 1 and len(slices) > 1:
    from jax.experimental import mesh_utils  # real multislice: let JAX place slices
    grid = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES],
                                                [dcn[a] for a in MESH_AXES], devices)
  elif math.prod(dcn.values()) == 1:
    grid = _physical_order([ici[a] for a in MESH_AXES], devices)
  else:  # dcn axes on one slice (simulated devices): dcn groups are contiguous blocks of devices
    n = len(MESH_AXES)
    grid = np.array(devices).reshape([dcn[a] for a in MESH_AXES] + [ici[a] for a in MESH_AXES])
    grid = grid.transpose([i for pair in zip(range(n), range(n, 2 * n)) for i in pair])
    grid = grid.reshape([dcn[a] * ici[a] for a in MESH_AXES])
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _physical_order(shape: list[int], devices: list) -> np.ndarray:
  """`devices` arranged as `shape` so that each mesh axis runs along rings of the TPU interconnect
  (on CPU the given order; on GPU ordered by device id).

  On the v5p:4x4x4 torus (wraparound links in all three dimensions) in jax.devices() order, the
  hosts' 2x2 trays one after another, the compiler gathered an fsdp axis as a zero-padded
  dynamic-update-slice plus an all-reduce: twice the ICI bytes, a full-size buffer per gather and,
  on the 7B, 0.64 GiB more generated code (BENCHMARKS.md). In this order it emits 3D all-gathers.
  """
  from jax.experimental import mesh_utils
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError):  # devices that are not a whole box of the torus
    return np.array(devices).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Validation (shapes only; nothing is compiled)
# ---------------------------------------------------------------------------------------------------


def validate_tensor(layout: Layout, mesh: Mesh, name: str, shape, names):
  """Raises ValueError if `names` cannot place a tensor of `shape` on `mesh` under `layout`."""
  seen = {}
  for dim, logical in zip(shape, names):
    if logical is None:
      continue
    if logical not in LOGICAL_AXES:
      raise ValueError(f"tensor {name} uses unknown logical axis {logical!r}; valid: "
                       f"{', '.join(LOGICAL_AXES)}")
    axes = layout.axes_for(logical)
    for axis in axes:
      if axis in seen:
        raise ValueError(
            f"layout {layout.source!r}: tensor {name} {tuple(names)} would use mesh axis {axis!r} "
            f"twice (for {seen[axis]!r} and {logical!r}); map one of them elsewhere")
      seen[axis] = logical
    parts = math.prod(mesh.shape[a] for a in axes)
    if dim % parts:
      sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in axes)
      raise ValueError(
          f"layout {layout.source!r}: tensor {name} has shape {tuple(shape)} with logical axes "
          f"{tuple(names)}; its {logical!r} dimension ({dim}) is not divisible by {parts} "
          f"(mesh axes {sizes}); change the mesh sizes, the layout rule for {logical!r} or the model")


def logical_names_of(abstract_state) -> dict:
  """{'path/to/param': (shape, logical names)} for every array in an abstract nnx State."""
  out = {}
  for path, var in nnx.to_flat_state(abstract_state):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    out["/".join(map(str, path))] = (tuple(var.shape), tuple(names))
  return out


def param_shardings(abstract_state, mesh: Mesh, layout: Layout):
  """NamedSharding for every parameter of an abstract nnx State, validated first.

  Read from each param's logical names (its `out_sharding` metadata), not from
  `nnx.get_partition_spec`: with flax logical rules active that returns mesh axes already, which a
  layout cannot translate again, so every parameter would silently replicate.
  """
  for name, (shape, names) in logical_names_of(abstract_state).items():
    validate_tensor(layout, mesh, name, shape, names)

  def place(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return var.replace(NamedSharding(mesh, layout.spec(names)))
  return jax.tree.map(place, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def logical_spec(names) -> PartitionSpec | None:
  """The PartitionSpec of logical `names` under the rules active via `nnx.logical_axis_rules`, or
  None when no rules and mesh are active (tracing for one device)."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return None
  table = dict(rules)
  return PartitionSpec(*(_spec_entry(tuple(table.get(n) or ())) if n else None for n in names))


def constrain(x, names):
  """Pin an activation to the layout active via `nnx.logical_axis_rules`; a no-op without a mesh."""
  spec = logical_spec(names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)
