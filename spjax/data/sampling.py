"""A text sample of a source's training split, drawn by the mixture: what a tokenizer is trained on.

SlimPajama is read straight from its jsonl.zst files (a tokenizer comes before any preparation
that stores token ids), in a seeded random order of files; each domain contributes documents until
it has its share of the sample's characters, and reading stops when every share is full or the
files run out. Other sources give their documents in a seeded random order until the sample is full.
"""

from collections.abc import Iterator
import random

import numpy as np

from spjax.data import files
from spjax.data import mixtures
from spjax.data import sources
from spjax.data import tokenizer as tokenizer_lib


def texts(config, num_chars: int, *, seed: int = 0) -> Iterator[str]:
  """Training documents of about `num_chars` characters in all, in the mixture's shares."""
  name, arg = sources.kind(config)
  if name == "slimpajama":
    yield from _slimpajama(arg, mixtures.parse(config.data.mixture), num_chars, seed,
                           config.data.bad_records)
    return
  if config.data.mixture:
    raise ValueError(f"data.mixture is for sources with domains (slimpajama:DIR), not "
                     f"{config.data.source!r}")
  # Text sources ignore the tokenizer; the embedded one stands in for the one being made.
  (domain,) = sources.load(config, "train", tokenizer_lib.load()).values()
  total = 0
  for i in np.random.default_rng(seed).permutation(len(domain.docs)):
    if total >= num_chars:
      return
    text = domain.docs[int(i)]
    total += len(text)
    yield text


def _slimpajama(source_dir: str, weights: dict[str, float], num_chars: int, seed: int,
                bad_records: str) -> Iterator[str]:
  from spjax.data import slimpajama  # TFDS is slow to import
  paths = slimpajama.input_files(source_dir)["train"]
  random.Random(seed).shuffle(paths)
  room = {d: w * num_chars for d, w in weights.items()}
  for path in paths:
    for _, text, domain in files.records(path, bad_records=bad_records,
                                         domains=mixtures.DOMAIN_OF_SET_NAME):
      if room.get(domain, 0) > 0:
        room[domain] -= len(text)
        yield text
      if all(r <= 0 for r in room.values()):
        return
