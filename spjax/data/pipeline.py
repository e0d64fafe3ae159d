"""Grain input pipeline: documents -> tokens -> pieces of <= seq_len -> packed rows -> batches.

One batch (numpy, per process, B = batch_size rows, T = config.seq_len):
  inputs       int32 [B, T]  token ids; a document is [bos] + ids + [eos], inputs = that[:-1]
  targets      int32 [B, T]  the next token of each input: that[1:], so never across documents
  segment_ids  int32 [B, T]  1, 2, ... = which document piece of the row; 0 = padding (no loss)
  positions    int32 [B, T]  0-based position within the piece (restarts at 0 for each piece)
  loss_mask    int32 [B, T]  1 = the target is trained; pretraining: segment_ids > 0, instruction
                             data (instruct.py): the completion tokens (or all, data.train_on_prompt)

Documents longer than T are cut into pieces of at most T (inputs, targets) pairs, so every token of
a document is a target exactly once; a piece only attends within itself. Pieces are packed into rows
by Grain's first-fit packing. Iterators are checkpointable: `get_state()` / `set_state()` resume on
the exact next batch. With `data.packed` (SlimPajama) the rows were packed when the data was
prepared (packed.py): a read is a row, and sharding, shuffling and mixing below act on rows.

Documents come from `data.source` (sources.py), one dataset per domain. Each domain is sharded by
document across processes, and for training shuffled with `config.seed` (a new order every epoch)
and repeated on its own, so a small domain comes round again while a big one is still in its first
epoch; validation keeps each domain's order. Several domains are interleaved by Grain's
MapDataset.mix at `data.mixture`'s token shares (mixtures.py), turned into document rates with each
domain's mean document length. Evaluation per domain: `eval_datasets` gives one dataset per domain
of the validation split, `eval_weights` the shares that combine their losses into one.
"""

import grain
import numpy as np

from spjax.data import augment
from spjax.data import instruct
from spjax.data import mixtures
from spjax.data import packed
from spjax.data import sources
from spjax.data import tokenizer as tokenizer_lib

# Pieces packed together before rows are emitted; more bins waste less padding (a piece that fits
# no open bin flushes them all), at the cost of mixing documents from further apart.
NUM_PACKING_BINS = 64


def _weights(config, domains: dict[str, sources.Domain], split: str) -> dict[str, float]:
  """Token shares of the domains to read, summing to 1 (one domain: {it: 1.0})."""
  if sources.kind(config)[0] != "slimpajama":
    if config.data.mixture:
      raise ValueError(f"data.mixture {config.data.mixture!r} is for sources with domains "
                       f"(slimpajama:DIR); data.source {config.data.source!r} has one: leave it "
                       f"empty")
    return {d: 1.0 for d in domains}
  weights = mixtures.parse(config.data.mixture)
  missing = [d for d in weights if d not in domains]
  if missing:
    raise ValueError(f"data.mixture {config.data.mixture or 'slimpajama'!r} weighs "
                     f"{', '.join(missing)}, but {config.data.source} has no {split} documents of "
                     f"{'it' if len(missing) == 1 else 'them'}; it has {', '.join(domains)}")
  return weights


def _shard(docs: grain.MapDataset, split: str, seed: int, process_index: int,
           process_count: int, num_epochs: int | None, what: str,
           rows: bool = False) -> grain.MapDataset:
  shard = docs[process_index::process_count]
  if len(shard) == 0:
    raise ValueError(f"{what} split {split!r} has {len(docs)} documents, too few to give process "
                     f"{process_index} of {process_count} any")
  if split == "train":  # rows packed at preparation have a shuffle for small shards (packed.py)
    shard = packed.shuffle(shard, seed) if rows else shard.shuffle(seed=seed)
  # Repeating the shuffled dataset (not the reverse) reseeds the shuffle every epoch.
  return shard.repeat(num_epochs)


def source(config, split: str, *, tokenizer: tokenizer_lib.Tokenizer | None = None,
           process_index: int = 0, process_count: int = 1,
           num_epochs: int | None = None) -> grain.MapDataset:
  """This process's documents in reading order, `num_epochs` times (None = forever).

  Processes get disjoint shares of each domain (every `process_count`-th document). With several
  domains and `num_epochs`, the mixture ends when its first domain runs out. `tokenizer` (default:
  `data.tokenizer`) matters only to sources prepared with token ids.
  """
  tokenizer = tokenizer or tokenizer_lib.load(config.data.tokenizer)
  domains = sources.load(config, split, tokenizer, process_count=process_count)
  weights = _weights(config, domains, split)
  shards = [_shard(domains[d].docs, split, config.seed, process_index, process_count, num_epochs,
                   f"data.source {config.data.source!r} domain {d!r}", packed.enabled(config))
            for d in weights]
  if len(shards) == 1:
    return shards[0]
  return grain.MapDataset.mix(shards, [w / domains[d].mean_length for d, w in weights.items()])


class _Tokenize(grain.transforms.Map):
  """text or ids -> {"inputs", "targets"}: int32 [n] each, the document's tokens shifted by one."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer):
    self._tok = tokenizer

  def map(self, doc: str | np.ndarray) -> dict[str, np.ndarray]:
    ids = self._tok.encode(doc) if isinstance(doc, str) else doc
    toks = np.concatenate([[self._tok.bos_id], ids, [self._tok.eos_id]]).astype(np.int32)
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
  # Packing numbers segments and positions per feature; inputs and targets share both. Documents
  # without a loss_mask train every target; packing pads a loss_mask it carries with 0.
  segment_ids = packed["inputs_segment_ids"]
  loss_mask = packed.get("loss_mask", (segment_ids > 0).astype(np.int32))
  return {"inputs": packed["inputs"], "targets": packed["targets"], "segment_ids": segment_ids,
          "positions": packed["inputs_positions"], "loss_mask": loss_mask}


def batches(docs: grain.MapDataset, config, tokenizer: tokenizer_lib.Tokenizer, batch_size: int,
            shuffle_bins: bool, train: bool = False) -> grain.IterDataset:
  """Documents (texts or token ids) -> packed batches of the contract above; `train` applies
  data.augment (augment.py) before and after tokenization."""
  if packed.enabled(config):  # rows packed at preparation (packed.py): nothing left to pack
    if train and (augment.token_noise_on(config) or
                  any(config.data.augment[f] > 0 for f in augment.TEXT_FIELDS)):
      raise ValueError("data.augment changes documents, but data.packed rows were packed when "
                       "the data was prepared: set the data.augment rates to 0 or data.packed=False")
    return packed.batches(docs, batch_size)
  # Two threads read and tokenize ahead, in order (deterministic). SentencePiece lets go of the GIL,
  # so on two cores they nearly double on-the-fly throughput; a short buffer keeps Grain's
  # per-element polling of it cheap (BENCHMARKS.md, "Data throughput").
  # Instruction examples (instruct.py) come cut to seq_len, with their loss mask, which packing
  # carries along (padding it with 0).
  sft = sources.kind(config)[0] == "sft"
  features = ("inputs", "targets", "loss_mask") if sft else ("inputs", "targets")
  noise = train and augment.token_noise_on(config)
  tokenize = (instruct.Tokenize(tokenizer, config.seq_len, config.data.train_on_prompt,
                                text_flags=noise) if sft else _Tokenize(tokenizer))
  if train:
    docs = augment.text(docs, config)
  ds = docs.map(tokenize)
  if noise:
    ds = augment.tokens(ds, config, tokenizer)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  ds = grain.experimental.FlatMapIterDataset(ds, _Pieces(config.seq_len))
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: config.seq_len for k in features},
      num_packing_bins=NUM_PACKING_BINS, seed=config.seed, shuffle_bins=shuffle_bins)
  return ds.batch(batch_size, drop_remainder=True).map(_to_batch)


def make_dataset(config, split: str, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of `batch_size` packed rows for this process; endless unless `num_epochs` is given.

  The documents are split into `data.shards` shards (0 = one per process), each packed into rows on
  its own; a process reads its consecutive block of shards and each batch takes the same number of
  rows from every one of them. So with a fixed `data.shards` the global batch (all processes' rows
  in process order) is the same for any process count that divides it.

  `iter()` of it is checkpointable. Each `iter()` of the validation split starts over, so the first
  `config.eval_batches` batches are the same rows at every evaluation (repeating a short split).
  """
  shards = config.data.shards or process_count
  if shards % process_count or batch_size % (shards // process_count):
    raise ValueError(f"data.shards ({shards}) must be a multiple of the process count "
                     f"({process_count}), and the {batch_size} rows each process reads a multiple of "
                     f"its {shards // process_count} shard(s)")
  mine = range(process_index * shards // process_count, (process_index + 1) * shards // process_count)
  rows = batch_size // len(mine)
  streams = [batches(source(config, split, tokenizer=tokenizer, process_index=shard,
                            process_count=shards, num_epochs=num_epochs),
                     config, tokenizer, rows, shuffle_bins=split == "train",
                     train=split == "train") for shard in mine]
  if len(streams) == 1:
    return streams[0]
  # One batch = each shard's next rows, stacked in shard order.
  return grain.experimental.ZipIterDataset(streams).map(
      lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def eval_datasets(config, tokenizer: tokenizer_lib.Tokenizer, *, batch_size: int,
                  process_index: int = 0, process_count: int = 1) -> dict[str, grain.IterDataset]:
  """{domain: endless batches of its validation split} for every domain the source has.

  Domains the mixture leaves out are evaluated too (how a CommonCrawl-only model does on GitHub is
  worth seeing); they weigh nothing in `eval_weights`. Like make_dataset's validation split, each
  `iter()` starts over.
  """
  domains = sources.load(config, "validation", tokenizer, process_count=process_count)
  return {d: batches(_shard(dom.docs, "validation", config.seed, process_index, process_count,
                             None, f"data.source {config.data.source!r} domain {d!r}"),
                      config, tokenizer, batch_size, shuffle_bins=False)
          for d, dom in domains.items()}


def eval_weights(config, tokenizer: tokenizer_lib.Tokenizer) -> dict[str, float]:
  """{domain: share} of the training mixture, summing to 1: the weights of the total eval loss."""
  return _weights(config, sources.load(config, "validation", tokenizer), "validation")
