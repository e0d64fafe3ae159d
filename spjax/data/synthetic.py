"""A small SlimPajama-shaped corpus, written in the published layout, for tests and benchmarks.

Documents are lines of real English (from the embedded corpus), each line headed by its domain's
name, so any piece of a document longer than a line or two tells which domain it came from. Each
domain has its own mean document length (books long, C4 short), drawn log-normally, so token
shares and document shares of a mixture differ as they do in the real corpus.
"""

import json
import os

import numpy as np
import zstandard

from spjax.data import embedded
from spjax.data import mixtures

# Mean characters per document, in the proportions of the real corpus (books far the longest).
MEAN_CHARS = {"CommonCrawl": 3000, "C4": 1500, "GitHub": 3500, "Book": 12000, "ArXiv": 8000,
              "Wikipedia": 2500, "StackExchange": 1500}
FILE_NAMES = {"train": "example_train_{}.jsonl.zst", "validation": "example_holdout_{}.jsonl.zst",
              "test": "example_holdout_{}.jsonl.zst"}


def _lines() -> list[str]:
  return [l.strip() for d in embedded.documents("train") for l in d.splitlines() if len(l) > 20]


def documents(n: int, *, scale: float = 1.0, seed: int = 0,
              domains=tuple(mixtures.DOMAINS)) -> list[tuple[str, str]]:
  """`n` (domain, text) pairs, domains in equal numbers, in a random order."""
  rng = np.random.default_rng(seed)
  lines = _lines()
  out = []
  for i in range(n):
    domain = domains[i % len(domains)]
    chars = max(40, int(rng.lognormal(np.log(MEAN_CHARS[domain] * scale), 0.6)))
    text, size, start = [], 0, int(rng.integers(len(lines)))
    while size < chars:
      text.append(f"{domain}: {lines[(start + len(text)) % len(lines)]}\n")
      size += len(text[-1])
    out.append((domain, "".join(text)))
  return [out[i] for i in rng.permutation(n)]


def write(root: str, docs_per_split: dict[str, int], *, files_per_split: int = 2,
          scale: float = 1.0, seed: int = 0, domains=tuple(mixtures.DOMAINS)) -> dict[str, list]:
  """Writes root/<split>/chunk1/example_*.jsonl.zst; returns {split: [(domain, text), ...]}."""
  written = {}
  for k, (split, n) in enumerate(docs_per_split.items()):
    docs = documents(n, scale=scale, seed=seed + k, domains=domains)
    os.makedirs(os.path.join(root, split, "chunk1"), exist_ok=True)
    for f in range(files_per_split):
      lines = [json.dumps({"text": t, "meta": {"redpajama_set_name": mixtures.DOMAINS[d]}})
               for d, t in docs[f::files_per_split]]
      path = os.path.join(root, split, "chunk1", FILE_NAMES[split].format(f))
      with open(path, "wb") as out:
        out.write(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    written[split] = docs
  return written
