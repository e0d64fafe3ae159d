"""What the compression commands share: the layout they run under, their inputs, the workdir they write.

A written workdir has config.json (the source run's, plus a record of what was done to it) and
checkpoints/STEP/state holding `params` only, so spjax-eval, spjax-generate, spjax-convert-hf,
tools/quantize.py and tools/merge.py all read it as they read a training run.
"""

import contextlib
import json
import os
import shutil

import jax
import ml_collections
from flax import nnx

from spjax.convert import workdir as workdir_lib
from spjax.parallel import layouts, sharding
from spjax.train import checkpoint as checkpoint_lib


@contextlib.contextmanager
def layout_scope(layout_source: str):
  """The mesh (the layout's own sizes over the local devices) and rules of `layout_source`."""
  layout = layouts.parse(layout_source)
  zeros = {axis: 0 for axis in sharding.MESH_AXES}
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"ici": zeros, "dcn": dict(zeros)}), layout)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(layout.flax_rules()):
    yield mesh, layout


def parse_input(spec: str) -> tuple[str, int | None]:
  """"WORKDIR" or "WORKDIR@STEP" -> (workdir, step or None = the newest); ValueError if malformed."""
  workdir, at, step = spec.rpartition("@") if "@" in spec else (spec, "", "")
  if at and not step.isdigit():
    raise ValueError(f"input {spec!r}: the part after @ must be a checkpoint step (an integer)")
  workdir_lib.read_config(workdir)  # ValueError if it is not a workdir
  return workdir, int(step) if at else None


def write(out: str, config: dict, params, step: int, *, force: bool = False) -> str:
  """Writes OUT/config.json and OUT/checkpoints/STEP/state = {"params": params}; returns the
  checkpoint directory. Refuses an OUT that already holds checkpoints unless `force`."""
  checkpoints = os.path.join(out, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    if not force:
      raise ValueError(f"--out {out} already holds checkpoints; pick a new directory")
    shutil.rmtree(checkpoints)
  os.makedirs(out, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
      f.write("\n")
  ckpt = checkpoint_lib.Checkpointer(out, max_to_keep=1, save_every_steps=1)
  ckpt.save(step, {"params": params}, force=True)
  ckpt.wait()
  ckpt.close()
  return os.path.join(checkpoints, str(step))


def disk_bytes(directory: str) -> int:
  """Bytes of every file under `directory`."""
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(directory) for f in files)
