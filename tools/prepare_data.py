"""Prepares a run's data ahead of training: SlimPajama -> array_record under data.cache_dir.

  python tools/prepare_data.py --config=configs/default.py:tiny \
      --config.data.source=slimpajama:/data/SlimPajama --config.data.tokenizer=/data/sp1024.model

With --config.data.packed=True it then packs the token ids into rows of --config.seq_len
(spjax/data/packed.py), which a run with the same flags reads without packing on the fly.

Takes the same data.* flags as the training run, so it prepares exactly the copy that run looks
for (spjax-train would prepare it on first use too, but only in a single-process run). Resumable:
an interrupted preparation, run again, skips the input files it already read. Shows a progress
bar, and at the end the documents (and tokens) of every split.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from spjax.data import sources
from spjax.data import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                          lock_config=True)
_WORKERS = flags.DEFINE_integer("workers", 0, "Processes reading the input; 0 = one per CPU.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  try:
    kind, source_dir = sources.kind(config)
    if kind != "slimpajama":
      raise ValueError(f"only slimpajama:DIR sources are prepared by spjax; data.source is "
                       f"{config.data.source!r}")
    if config.data.packed and not config.data.pretokenize:
      raise ValueError("data.packed needs token ids: set data.pretokenize=True")
    from spjax.data import slimpajama  # TFDS is slow to import
    model = tokenizer_lib.load(config.data.tokenizer).model_proto
    b = slimpajama.prepare(source_dir, config.data.cache_dir,
                           model if config.data.pretokenize else b"",
                           bad_records=config.data.bad_records, workers=_WORKERS.value)
    if config.data.packed:
      from spjax.data import packed
      rows = packed.pack_prepared(b, config.seq_len, tokenizer_lib.load(config.data.tokenizer))
  except ValueError as e:
    print(f"prepare_data: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"prepared {b.data_dir}")
  for split, stats in b.info.metadata["splits"].items():
    print(f"  {split:26s} " + "  ".join(f"{v:>12,} {k}" for k, v in stats.items()))
  if config.data.packed:
    print(f"packed rows of {config.seq_len} tokens in {rows}")


if __name__ == "__main__":
  app.run(main)
