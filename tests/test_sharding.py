"""Layouts: parsing, golden placements per preset, meshes, and the errors promised before compile."""

import json

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import default
from spjax.parallel import layouts
from spjax.parallel.sharding import make_mesh
from spjax.train import program


def tiny(**overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict(overrides)
  return cfg


def trim(spec):
  """P(None, 'fsdp', None) and P(None, 'fsdp') place a tensor the same way."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


# Hand-written: what each preset must do to every parameter of the scanned tiny model.
# Stacked block params lead with the "layers" axis, which no preset shards.
GOLDEN = {
    "dp": {},
    "fsdp": {
        "blocks/attn/q": (None, "fsdp"), "blocks/attn/k": (None, "fsdp"),
        "blocks/attn/v": (None, "fsdp"), "blocks/attn/o": (None, None, None, "fsdp"),
        "blocks/attn_norm/scale": (None, "fsdp"), "blocks/mlp_norm/scale": (None, "fsdp"),
        "blocks/mlp/gate": (None, "fsdp"), "blocks/mlp/up": (None, "fsdp"),
        "blocks/mlp/down": (None, None, "fsdp"), "embed": (None, "fsdp"),
        "final_norm/scale": ("fsdp",), "unembed": ("fsdp",),
    },
    "tp": {
        "blocks/attn/q": (None, None, "tensor"), "blocks/attn/k": (None, None, "tensor"),
        "blocks/attn/v": (None, None, "tensor"), "blocks/attn/o": (None, "tensor"),
        "blocks/mlp/gate": (None, None, "tensor"), "blocks/mlp/up": (None, None, "tensor"),
        "blocks/mlp/down": (None, "tensor"), "embed": ("tensor",),
        "unembed": (None, "tensor"),
    },
    "fsdp_tp": {
        "blocks/attn/q": (None, "fsdp", "tensor"), "blocks/attn/k": (None, "fsdp", "tensor"),
        "blocks/attn/v": (None, "fsdp", "tensor"), "blocks/attn/o": (None, "tensor", None, "fsdp"),
        "blocks/attn_norm/scale": (None, "fsdp"), "blocks/mlp_norm/scale": (None, "fsdp"),
        "blocks/mlp/gate": (None, "fsdp", "tensor"), "blocks/mlp/up": (None, "fsdp", "tensor"),
        "blocks/mlp/down": (None, "tensor", "fsdp"), "embed": ("tensor", "fsdp"),
        "final_norm/scale": ("fsdp",), "unembed": ("fsdp", "tensor"),
    },
}
PARAMS = ["blocks/attn/q", "blocks/attn/k", "blocks/attn/v", "blocks/attn/o",
          "blocks/attn_norm/scale", "blocks/mlp_norm/scale", "blocks/mlp/gate", "blocks/mlp/up",
          "blocks/mlp/down", "embed", "final_norm/scale", "unembed"]
MESHES = {"dp": {"data": 8}, "fsdp": {"fsdp": 8}, "tp": {"data": 2, "tensor": 4},
          "fsdp_tp": {"fsdp": 4, "tensor": 2}}


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_places_every_parameter_as_designed(preset):
  prog = program.build(tiny(layout=preset))
  assert {a: s for a, s in prog.mesh.shape.items() if s > 1} == MESHES[preset]
  placed = {"/".join(map(str, path)): trim(var.get_value().spec)
            for path, var in nnx.to_flat_state(prog.state_shardings["params"])}
  assert sorted(placed) == sorted(PARAMS)
  for name in PARAMS:
    assert placed[name] == GOLDEN[preset].get(name, ()), name


def test_three_spellings_parse_to_the_same_layout(tmp_path):
  mtf = "batch:data,fsdp;embed:fsdp"
  rules_json = tmp_path / "fsdp.json"
  rules_json.write_text(json.dumps({"rules": {"batch": ["data", "fsdp"], "embed": ["fsdp"]}}))
  rules_py = tmp_path / "fsdp.py"
  rules_py.write_text("RULES = {'batch': ('data', 'fsdp'), 'embed': 'fsdp'}\n")
  preset = layouts.PRESETS["fsdp"]
  for spelling in (mtf, str(rules_json), str(rules_py)):
    assert layouts.parse(spelling).rules == preset.rules
  assert layouts.parse(mtf).spec(("layers", "embed", "mlp")) == P(None, "fsdp", None)


def test_mtf_string_trains_the_same_placement_as_its_preset():
  by_string = program.build(tiny(layout="batch:data,fsdp;embed:fsdp", **{"mesh.ici.fsdp": -1}))
  by_name = program.build(tiny(layout="fsdp"))
  assert by_string.state_shardings["params"] == by_name.state_shardings["params"]


@pytest.mark.parametrize("spec,needle", [
    ("fsdq", "neither a preset"),
    ("batch:data;embd:fsdp", "unknown logical axis 'embd'"),
    ("batch:data;embed:fsbp", "unknown mesh axis 'fsbp'"),
    ("batch:data;embed:fsdp,fsdp", "names a mesh axis twice"),
    ("batch:data;embed", "not of the form"),
    ("/no/such/rules.json", "does not exist"),
])
def test_bad_layout_strings_are_named(spec, needle):
  with pytest.raises(ValueError, match=needle):
    layouts.parse(spec)


def test_mesh_axis_used_twice_in_one_tensor_names_the_tensor():
  cfg = tiny(layout="batch:data;embed:fsdp;mlp:fsdp", **{"mesh.ici.fsdp": -1})
  with pytest.raises(ValueError, match=r"blocks/mlp/.* would use mesh axis 'fsdp' twice"):
    program.build(cfg)


def test_non_divisible_dimension_names_tensor_shape_and_axes():
  cfg = tiny(layout="tp", **{"mesh.ici.tensor": 8})  # tiny has 4 kv heads
  with pytest.raises(ValueError, match=r"blocks/attn/k has shape \(2, 128, 4, 16\).*'kv_heads' "
                                       r"dimension \(4\) is not divisible by 8 \(mesh axes "
                                       r"tensor=8\)"):
    program.build(cfg)


def test_batch_not_divisible_by_data_parallel_size():
  cfg = tiny(layout="batch:data,fsdp,tensor", **{"mesh.ici.data": 8, "seq_len": 64})
  prog = program.build(cfg)
  from spjax.parallel.sharding import validate_tensor
  with pytest.raises(ValueError, match=r"batch \(tokens\).*'batch' dimension \(12\) is not "
                                       r"divisible by 8"):
    validate_tensor(prog.layout, prog.mesh, "batch (tokens)", (12, 64), ("batch", "length"))


def test_activation_dimension_checked_too():
  cfg = tiny(layout="batch:data;length:sequence", **{"mesh.ici.sequence": 8, "seq_len": 36})
  with pytest.raises(ValueError, match=r"'length' dimension \(36\) is not divisible by 8"):
    program.build(cfg)


@pytest.mark.parametrize("overrides,needle", [
    ({"mesh.ici.data": 3}, r"mesh.ici: the fixed sizes data=3 x fsdp=fill multiply to 3, which "
                           r"does not divide the 8 devices"),
    ({"mesh.ici.data": 2, "mesh.ici.fsdp": 2}, r"sizes data=2 x fsdp=2 multiply to 4 but there are "
                                               r"8 devices"),
    ({"mesh.dcn.data": 3}, r"mesh.dcn sizes multiply to 3 simulated slices"),
    ({"mesh.ici.data": -1, "mesh.ici.fsdp": -1}, "only one axis may be -1"),
    ({"mesh.ici.tensor": 3}, "do not divide|does not divide"),
    ({"mesh.ici.data": -2}, "mesh.ici.data = -2"),
])
def test_bad_mesh_sizes(overrides, needle):
  with pytest.raises(ValueError, match=needle):
    program.build(tiny(**overrides))


def test_config_values_override_preset_mesh_and_user_fill_wins():
  layout = layouts.PRESETS["fsdp_tp"]
  assert make_mesh(tiny(**{"mesh.ici.tensor": 4}).mesh, layout).shape["fsdp"] == 2
  mesh = make_mesh(tiny(**{"mesh.ici.data": -1, "mesh.ici.tensor": 1}).mesh, layout)
  assert (mesh.shape["data"], mesh.shape["fsdp"], mesh.shape["tensor"]) == (8, 1, 1)


def test_dcn_axes_multiply_into_the_mesh_with_slices_outermost():
  cfg = tiny(layout="fsdp", **{"mesh.dcn.data": 2})
  mesh = make_mesh(cfg.mesh, layouts.PRESETS["fsdp"])
  assert (mesh.shape["data"], mesh.shape["fsdp"]) == (2, 4)
  ids = [[d.id for d in row] for row in mesh.devices.reshape(2, 4)]
  assert ids == [[0, 1, 2, 3], [4, 5, 6, 7]]  # each "slice" a contiguous block


@pytest.mark.parametrize("key,value", [("num_train_steps", 0), ("seq_len", -1),
                                       ("grad_accum_steps", 0), ("z_loss", -1.0)])
def test_bad_top_level_values_name_the_field(key, value):
  with pytest.raises(ValueError, match=f"config.{key}"):
    program.build(tiny(**{key: value}))


def test_param_shardings_are_the_same_with_flax_rules_active():
  """Under active rules nnx.get_partition_spec already gives mesh axes; placement must not change."""
  from spjax.parallel import sharding
  prog = program.build(tiny(layout="fsdp_tp"))
  with prog.activate():
    inside = sharding.param_shardings(prog.abstract_params, prog.mesh, prog.layout)
  assert inside == prog.state_shardings["params"]
