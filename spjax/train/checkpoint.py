"""Checkpoints in `workdir/checkpoints/<step>/`: train state (Orbax) and data iterator (Grain).

Each step directory holds two items: `state`, any pytree of jax arrays (params, optimizer state,
step) written by every process for its own shards, and `data_iter`, one JSON file of Grain iterator
state per process; optionally a third, `info`, a small JSON dict (a LoRA run: where its base
weights come from). Restoring reads arrays straight into the shardings the caller asks for, so a
run can resume on a different mesh or layout.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `save_every_steps` steps, asynchronously and atomically.

  Keeps the newest `max_to_keep` checkpoints plus, when `keep_every_steps` > 0, every step that is a
  multiple of it. A save is written to a temporary directory and renamed when complete, so a crash
  mid-save leaves the previous checkpoints as they were; leftovers are removed at the next start.
  """

  def __init__(self, workdir: str, *, max_to_keep: int, save_every_steps: int,
               keep_every_steps: int = 0):
    policies = ocp.checkpoint_managers
    keep = policies.LatestN(max_to_keep)
    if keep_every_steps:
      keep = policies.AnyPreservationPolicy([keep, policies.EveryNSteps(keep_every_steps)])
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(save_every_steps),
            preservation_policy=keep, cleanup_tmp_directories=True),
        # Registered up front so a fresh process (a resumed run) can read the metadata of old steps.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(),
                       "info": ocp.JsonCheckpointHandler()})

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any process got a preemption notice.

    Needs `jax.distributed` (JAX's preemption sync service); single-process runs watch SIGTERM.
    """
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, data_iter=None, *, force: bool = False,
           info: dict | None = None) -> bool:
    """Starts saving `state` (and `data_iter`'s position) if `step` is due or `force`; True if so.

    Returns once the arrays are copied off the devices, so the caller may donate or overwrite them
    while the files are written in the background. The iterator state is captured before returning.
    """
    self._manager.check_for_errors()  # a failed background save raises here, in the train loop
    if force and step in self._manager.all_steps():
      return False  # already saved on the interval; Orbax refuses to write a step twice
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if info is not None:
      items["info"] = ocp.args.JsonSave(info)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint (temporary, half-written ones are not listed)."""
    return list(self._manager.all_steps())

  def metadata(self, step: int):
    """The saved state's tree of array metadata (shape, dtype, sharding), read without the data."""
    return self._manager.item_metadata(step)["state"]

  def info(self, step: int) -> dict | None:
    """The `info` dict saved with `step`, or None if it has none."""
    self.wait()
    if not os.path.isdir(os.path.join(self._manager.directory, str(step), "info")):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]

  def restore(self, step: int, abstract_state, data_iter=None):
    """Returns the state saved at `step`, laid out as `abstract_state` asks.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` with the
    structure that was saved; each array is read directly into its sharding. `data_iter`, when
    given, is moved in place to where it was at the save. Raises ValueError naming the first array
    whose path or shape differs from the checkpoint's, before reading any data.
    """
    self.wait()  # a step still being written has no metadata yet
    self._check_matches(step, abstract_state)
    if data_iter is not None:
      self._check_data_positions(step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def _check_matches(self, step, abstract_state):
    saved = _shapes(self.metadata(step))
    wanted = _shapes(abstract_state)
    problems = [p for p in wanted.keys() | saved.keys() if wanted.get(p) != saved.get(p)]
    if not problems:
      return
    # Shallowest first: a mismatched parameter also mismatches its optimizer moments, deeper down.
    first = min(problems, key=lambda p: (p.count("/"), p))
    more = f" ({len(problems) - 1} more mismatched arrays)" if len(problems) > 1 else ""
    raise ValueError(f"checkpoint step {step} does not match the model at {first}: "
                     f"checkpoint shape {saved.get(first, 'absent')}, "
                     f"model shape {wanted.get(first, 'absent')}{more}")

  def _check_data_positions(self, step):
    """Grain keeps one position per process: another process count has none to resume from."""
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    folder = os.path.join(self._manager.directory, str(step), "data_iter")
    if os.path.isdir(folder) and mine not in os.listdir(folder):
      saved = sorted(f for f in os.listdir(folder) if f.startswith("process_"))
      raise ValueError(
          f"checkpoint step {step} holds the data positions of {len(saved)} process(es) "
          f"({', '.join(saved)}), not of this run's {jax.process_count()}; the data iterator cannot "
          f"resume exactly with another process count. Resume with {len(saved)} process(es); "
          "the arrays themselves restore onto any mesh.")

  def wait(self) -> None:
    """Blocks until background saves are on disk; raises if one failed."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()

  def close(self) -> None:
    self._manager.close()


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """`{"params/layers/mlp/kernel/value": shape}` for every array leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
          for path, leaf in leaves}
