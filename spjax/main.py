"""spjax-train: flags -> config -> train_and_evaluate(config, workdir).

  spjax-train --config=configs/default.py:tiny --workdir=/tmp/run [--config.layout=tp ...]

Bad configuration or input exits with status 2 and one paragraph naming the problem.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every step at INFO
  from spjax import train  # after flag parsing: jax reads XLA_FLAGS on import
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:
    logging.flush()
    print(f"spjax-train: {e}", file=sys.stderr)
    sys.exit(2)


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
    print(f"spjax-train: {message}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)


def run():
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
