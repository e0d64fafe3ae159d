"""Trains a SentencePiece tokenizer on a sample of a data source, drawn by its mixture.

  python tools/train_tokenizer.py --config=configs/default.py:tiny \
      --config.data.source=slimpajama:/data/SlimPajama --config.data.mixture=DC-1 \
      --output=/data/sp1024 [--vocab_size=1024 --model_type=bpe --sample_chars=50000000]

writes /data/sp1024.model; train with --config.data.tokenizer=/data/sp1024.model. The vocabulary
size defaults to the model's (config.model.vocab_size), so the two fit.
"""

import sys

from absl import app, flags
from ml_collections import config_flags
import tqdm

from spjax.data import sampling
from spjax.data import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path[:size].",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Model path prefix; writes <output>.model.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Pieces in the vocabulary; 0 = model.vocab_size.")
_TYPE = flags.DEFINE_enum("model_type", "bpe", tokenizer_lib.MODEL_TYPES, "SentencePiece model.")
_BYTES = flags.DEFINE_bool("byte_fallback", True, "Encode unseen characters as UTF-8 bytes.")
_CHARS = flags.DEFINE_integer("sample_chars", 50_000_000, "Characters of text to train on.")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  bar = tqdm.tqdm(total=_CHARS.value, desc="sample", unit="char", unit_scale=True)

  def sample():
    for text in sampling.texts(config, _CHARS.value, seed=config.seed):
      bar.update(len(text))
      yield text
    bar.close()

  try:
    path = tokenizer_lib.train(sample(), _OUTPUT.value, _VOCAB.value or config.model.vocab_size,
                               model_type=_TYPE.value, byte_fallback=_BYTES.value)
  except ValueError as e:
    print(f"train_tokenizer: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
