"""Grain input pipeline: documents -> tokens -> pieces of <= seq_len -> packed rows -> batches.

One batch (numpy, per process, B = batch_size rows, T = config.seq_len):
  inputs       int32 [B, T]  token ids; a document is [bos] + ids + [eos], inputs = that[:-1]
  targets      int32 [B, T]  the next token of each input: that[1:], so never across documents
  segment_ids  int32 [B, T]  1, 2, ... = which document piece of the row; 0 = padding (no loss)
  positions    int32 [B, T]  0-based position within the piece (restarts at 0 for each piece)

Documents longer than T are cut into pieces of at most T (inputs, targets) pairs, so every token of
a document is a target exactly once; a piece only attends within itself. Pieces are packed into rows
by Grain's first-fit packing. The training split is sharded by document across processes, shuffled
with `config.seed` (a new order every epoch) and repeated; the validation split keeps its order.
Iterators are checkpointable: `get_state()` / `set_state()` resume on the exact next batch.
"""

import grain
import numpy as np

from spjax.data import embedded
from spjax.data import tokenizer as tokenizer_lib

SOURCES = ("embedded",)
# Pieces packed together before rows are emitted; more bins waste less padding (a piece that fits
# no open bin flushes them all), at the cost of mixing documents from further apart.
NUM_PACKING_BINS = 64


def source(config, split: str, *, process_index: int = 0, process_count: int = 1,
           num_epochs: int | None = None) -> grain.MapDataset:
  """This process's documents (texts) in reading order, `num_epochs` times (None = forever).

  Processes get disjoint shares of the split (every `process_count`-th document). The training split
  is shuffled with `config.seed`, in a new order every epoch; validation keeps the corpus order.
  """
  if config.data.source not in SOURCES:
    raise ValueError(f"unknown data.source {config.data.source!r}; valid values: "
                     f"{', '.join(SOURCES)}")
  docs = embedded.documents(split)
  shard = grain.MapDataset.source(docs)[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(f"data.source {config.data.source!r} split {split!r} has {len(docs)} "
                     f"documents, too few to give process {process_index} of {process_count} any")
  if split == "train":
    shard = shard.shuffle(seed=config.seed)
  # Repeating the shuffled dataset (not the reverse) reseeds the shuffle every epoch.
  return shard.repeat(num_epochs)


class _Tokenize(grain.transforms.Map):
  """text -> {"inputs", "targets"}: int32 [n] each, the document's tokens shifted by one."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer):
    self._tok = tokenizer

  def map(self, text: str) -> dict[str, np.ndarray]:
    toks = np.array([self._tok.bos_id, *self._tok.encode(text), self._tok.eos_id], np.int32)
    return {"inputs": toks[:-1], "targets": toks[1:]}


class _Pieces(grain.experimental.FlatMapTransform):
  """Cuts a tokenized document into consecutive pieces of at most `seq_len` tokens.

  Used on an IterDataset, which needs no `max_fan_out` (that bound is for MapDataset flat maps).
  """

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{k: v[i:i + self._seq_len] for k, v in doc.items()}
            for i in range(0, len(doc["inputs"]), self._seq_len)]


def _to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Packing numbers segments and positions per feature; inputs and targets share both.
  return {"inputs": packed["inputs"], "targets": packed["targets"],
          "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"]}


def make_dataset(config, split: str, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of `batch_size` packed rows for this process; endless unless `num_epochs` is given.

  `iter()` of it is checkpointable. Each `iter()` of the validation split starts over, so the first
  `config.eval_batches` batches are the same rows at every evaluation (repeating a short split).
  """
  docs = source(config, split, process_index=process_index, process_count=process_count,
                num_epochs=num_epochs).map(_Tokenize(tokenizer))
  # A couple of threads tokenize ahead in order: enough to stay ahead of a step, and deterministic.
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  ds = grain.experimental.FlatMapIterDataset(ds, _Pieces(config.seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={"inputs": config.seq_len, "targets": config.seq_len},
      num_packing_bins=NUM_PACKING_BINS, seed=config.seed, shuffle_bins=split == "train")
  return ds.batch(batch_size, drop_remainder=True).map(_to_batch)

