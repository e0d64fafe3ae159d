"""spjax-train: flags -> config -> train_and_evaluate(config, workdir).

  spjax-train --config=configs/default.py:tiny --workdir=/tmp/run [--config.layout=tp ...]

Several processes (one per host, or several on one machine) join through `jax.distributed`: pass
--coordinator_address/--num_processes/--process_id, or set SPJAX_COORDINATOR_ADDRESS,
SPJAX_NUM_PROCESSES and SPJAX_PROCESS_ID. On Cloud TPU, --coordinator_address=auto lets JAX find them.

Exit status: 0 done (or preempted with a checkpoint saved); 2 bad configuration or input, with one
paragraph naming the problem; 3 a non-finite step under config.nan_policy="abort".
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("SPJAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 for jax.distributed; 'auto' on Cloud TPU; unset = one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("SPJAX_NUM_PROCESSES", 1)),
                                      "Processes in the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("SPJAX_PROCESS_ID", 0)),
                                   "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str, status: int):
  logging.flush()
  print(f"spjax-train: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every step at INFO
  import jax  # after flag parsing: jax reads XLA_FLAGS on import
  if _COORDINATOR.value == "auto":
    jax.distributed.initialize()
  elif _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  from spjax.train import loop as train
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:
    fail(str(e), 2)
  except train.BadStepError as e:
    fail(str(e), 3)


def _parse_flags(argv):
  """absl's parser, but a bad flag or config value is one paragraph, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config files raise whatever their get_config raises
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
      chain.append(chain[-1].__cause__ or chain[-1].__context__)
    key_errors = [c for c in chain if isinstance(c, KeyError)]
    if key_errors:  # a locked ConfigDict refusing a key; the outermost has the did-you-mean
      message = "unknown config key " + str(key_errors[0].args[0]).replace("\n", ". ")
    elif "Traceback" in str(e):  # absl pasted the config file's traceback into the message
      message = str(chain[-1])
    else:
      message = str(e)
    fail(f"{message}\nPass --helpfull to see the flags.", 2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
