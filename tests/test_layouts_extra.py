"""The sequence-parallel, hybrid (multislice), split-residual and expert presets: placement and math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from spjax.train import program

SP = ("fsdp", "sequence")
# Hand-written: what each preset must do to every parameter of the scanned tiny model (trailing
# None entries dropped), the tokens of a batch, and the residual stream [B, T, D] between blocks.
GOLDEN = {
    "fsdp_sp": {
        "mesh": {"fsdp": 4, "sequence": 2},
        "params": {
            "blocks/attn/q": (None, SP), "blocks/attn/k": (None, SP), "blocks/attn/v": (None, SP),
            "blocks/attn/o": (None, None, None, SP), "blocks/attn_norm/scale": (None, SP),
            "blocks/mlp_norm/scale": (None, SP), "blocks/mlp/gate": (None, SP),
            "blocks/mlp/up": (None, SP), "blocks/mlp/down": (None, None, SP),
            "embed": (None, SP), "final_norm/scale": (SP,), "unembed": (SP,),
        },
        "tokens": (("data", "fsdp"), "sequence"),
        "residual": (("data", "fsdp"), "sequence"),
    },
    "hsdp": {
        "mesh": {"data": 2, "fsdp": 4},
        "params": {
            "blocks/attn/q": (None, "fsdp"), "blocks/attn/k": (None, "fsdp"),
            "blocks/attn/v": (None, "fsdp"), "blocks/attn/o": (None, None, None, "fsdp"),
            "blocks/attn_norm/scale": (None, "fsdp"), "blocks/mlp_norm/scale": (None, "fsdp"),
            "blocks/mlp/gate": (None, "fsdp"), "blocks/mlp/up": (None, "fsdp"),
            "blocks/mlp/down": (None, None, "fsdp"), "embed": (None, "fsdp"),
            "final_norm/scale": ("fsdp",), "unembed": ("fsdp",),
        },
        "tokens": (("data", "fsdp"),),
        "residual": (("data", "fsdp"),),
    },
    "fsdp_ep": {  # a dense model: `expert` only splits the batch (tests/test_moe.py: experts)
        "mesh": {"fsdp": 4, "expert": 2},
        "params": {
            "blocks/attn/q": (None, "fsdp"), "blocks/attn/k": (None, "fsdp"),
            "blocks/attn/v": (None, "fsdp"), "blocks/attn/o": (None, None, None, "fsdp"),
            "blocks/attn_norm/scale": (None, "fsdp"), "blocks/mlp_norm/scale": (None, "fsdp"),
            "blocks/mlp/gate": (None, "fsdp"), "blocks/mlp/up": (None, "fsdp"),
            "blocks/mlp/down": (None, None, "fsdp"), "embed": (None, "fsdp"),
            "final_norm/scale": ("fsdp",), "unembed": ("fsdp",),
        },
        "tokens": (("data", "fsdp", "expert"),),
        "residual": (("data", "fsdp", "expert"),),
    },
    "fsdp_tp_rs": {
        "mesh": {"fsdp": 4, "tensor": 2},
        "params": {
            "blocks/attn/q": (None, "fsdp", "tensor"), "blocks/attn/k": (None, "fsdp", "tensor"),
            "blocks/attn/v": (None, "fsdp", "tensor"),
            "blocks/attn/o": (None, "tensor", None, "fsdp"),
            "blocks/attn_norm/scale": (None, "fsdp"), "blocks/mlp_norm/scale": (None, "fsdp"),
            "blocks/mlp/gate": (None, "fsdp", "tensor"), "blocks/mlp/up": (None, "fsdp", "tensor"),
            "blocks/mlp/down": (None, "tensor", "fsdp"), "embed": ("tensor", "fsdp"),
            "final_norm/scale": ("fsdp",), "unembed": ("fsdp", "tensor"),
        },
        "tokens": (("data", "fsdp"),),
        "residual": (("data", "fsdp"), None, "tensor"),  # d_model split: params' embed is fsdp
    },
}
# hsdp runs FSDP inside each slice and data parallelism across 2 slices; on CPU the "slices" are
# contiguous blocks of the 8 simulated devices.
OVERRIDES = {"hsdp": {"mesh.dcn.data": 2}}


def tiny(layout, **overrides):
  cfg = default.get_config("tiny")
  cfg.update_from_flattened_dict({"layout": layout, "model.dtype": "float32",
                                  **OVERRIDES.get(layout, {}), **overrides})
  return cfg


def trim(spec):
  entries = [tuple(e) if isinstance(e, list) else e for e in spec]
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_places_params_and_activations_as_designed(preset):
  prog = program.build(tiny(preset))
  golden = GOLDEN[preset]
  assert {a: s for a, s in prog.mesh.shape.items() if s > 1} == golden["mesh"]
  placed = {"/".join(map(str, path)): trim(var.get_value().spec)
            for path, var in nnx.to_flat_state(prog.state_shardings["params"])}
  assert placed == golden["params"]
  assert trim(prog.batch_sharding.spec) == golden["tokens"]
  residual = prog.layout.spec(("batch", "length", "act_embed"))
  assert trim(residual) == golden["residual"]


def test_hsdp_slices_are_contiguous_device_blocks():
  mesh = program.build(tiny("hsdp")).mesh
  blocks = [sorted(d.id for d in mesh.devices[i].flat) for i in range(2)]  # data index = slice
  assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7]]


def fixed_batch(prog):
  """One random batch, the same for every layout: the model memorises it step by step."""
  shape = (prog.global_batch, prog.config.seq_len)
  tokens = jax.random.randint(jax.random.key(42), (shape[0], shape[1] + 1), 0,
                              prog.model_cfg.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones(shape, jnp.int32), "loss_mask": jnp.ones(shape, jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(shape[1]), shape)}
  return {k: jax.device_put(v.astype(jnp.int32), prog.batch_sharding) for k, v in batch.items()}


def losses(layout, steps=20):
  prog = program.build(tiny(layout))
  with prog.activate():
    state, step_fn = prog.jit_init()(), prog.jit_train_step()
    batch, out = fixed_batch(prog), []
    for _ in range(steps):
      state, metrics = step_fn(state, batch)
      out.append(float(metrics["loss"]))
  return np.array(out)


@pytest.fixture(scope="module")
def dp_losses():
  return losses("dp")


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_trains_exactly_like_dp(dp_losses, preset):
  np.testing.assert_allclose(losses(preset), dp_losses, rtol=1e-5)
  assert dp_losses[-1] < dp_losses[0] - 0.5  # and the steps really learn
