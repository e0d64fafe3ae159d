"""Knowing when to stop: SIGTERM (a preemption notice) becomes "save at this step, then exit".

Several processes must stop at the same step or their checkpoints would disagree; JAX's preemption
sync service (started by `jax.distributed.initialize`, which also catches SIGTERM) picks that step.
One process has no one to agree with, so a plain signal handler does.
"""

import signal

import jax


class Watcher:

  def __init__(self, checkpointer):
    self._checkpointer = checkpointer
    self._signalled = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True  # acted on between steps: a handler must not touch JAX state

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    return self._checkpointer.reached_preemption(step)

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
