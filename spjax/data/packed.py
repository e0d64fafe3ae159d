"""Rows packed when the data is prepared (`data.packed`): a read is one full row, no per-document
Python while training.

For `slimpajama:DIR` prepared with token ids, `pack_prepared` packs each (split, domain) of the
prepared copy once, for one `seq_len`, into
  <prepared copy>/packed-<seq_len>/<split>_<domain>.npy   uint16|uint32 [rows, 4, seq_len]
  <prepared copy>/packed-<seq_len>/packed.json            {"seq_len", "splits": {name: {"rows",
                                                           "tokens", "docs"}}} (tokens: real ones)
Row r holds inputs, targets, segment_ids (0 = padding) and positions, [T] each: the batch contract
of pipeline.py but the loss mask, stored rather than computed, as computing positions took more
time than reading the row. Documents become pieces exactly as pipeline.py cuts them ([bos] + ids +
[eos], inputs = that[:-1], targets = that[1:], pieces of at most T pairs), and pieces are packed
first-fit into up to NUM_OPEN_ROWS open rows, a block of BLOCK_TOKENS document tokens at a time.

Reading (`domains`, `batches`): each (split, domain) is a memory-mapped random-access source of
rows, so pipeline.py shards (every n-th row), shuffles, repeats and mixes rows with Grain's
MapDataset ops as it does documents, and Grain's iterator over the batches checkpoints as one
index. A domain's mixture rate is its token share over its mean real tokens per row.

What differs from packing while reading, by design: the documents sharing a row are fixed at
preparation (in file order), where the on-the-fly path packs a new shuffle of documents every
epoch; an epoch holds the same pieces either way, only their grouping into rows and their order
differ. Augmentation (data.augment) changes documents, so it cannot be applied to packed rows.
"""

from collections.abc import Callable, Iterator, Sequence
import functools
import json
import os
import shutil
import sys

import grain
import numpy as np

FIELDS = ("inputs", "targets", "segment_ids", "positions")  # the rows' second axis
NUM_OPEN_ROWS = 64        # rows a piece may go into; more waste less padding
BLOCK_TOKENS = 1 << 24    # document tokens packed together (bounds the packer's memory: ~0.5 GB)
# Below this many rows a shard is shuffled from a numpy permutation (`shuffle`; <= 4 MB each, a
# few cached), above by Grain.
PERMUTE_BELOW = 1 << 20
_META = "packed.json"


def enabled(config) -> bool:
  """`data.packed`; False for configs saved by runs from before the field (spjax-eval's)."""
  return bool(config.data.get("packed", False))


def directory(data_dir: str, seq_len: int) -> str:
  return os.path.join(data_dir, f"packed-{seq_len}")


def is_packed(data_dir: str, seq_len: int) -> bool:
  return os.path.exists(os.path.join(directory(data_dir, seq_len), _META))


# --- packing ---

def _first_fit(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """Pieces of `lengths` -> (row, offset, segment id) each, and the number of rows.

  A piece goes into the first open row with room; when none has room and NUM_OPEN_ROWS are open,
  the fullest is closed. A full-length piece is a row of its own.
  """
  row, offset, segment = (np.empty(len(lengths), np.int64) for _ in range(3))
  free, ids, counts = [], [], []  # per open row: room left, row number, pieces so far
  rows = 0
  for i, n in enumerate(lengths.tolist()):
    if n == seq_len:
      row[i], offset[i], segment[i], rows = rows, 0, 1, rows + 1
      continue
    j = next((j for j, f in enumerate(free) if f >= n), -1)
    if j < 0:
      if len(free) == NUM_OPEN_ROWS:
        j = free.index(min(free))  # close the fullest; its slot opens a new row
        free[j], ids[j], counts[j] = seq_len, rows, 0
      else:
        j = len(free)
        free.append(seq_len), ids.append(rows), counts.append(0)
      rows += 1
    row[i], offset[i], segment[i] = ids[j], seq_len - free[j], counts[j] + 1
    free[j] -= n
    counts[j] += 1
  return row, offset, segment, rows


def pack(docs: Sequence[np.ndarray], seq_len: int, bos: int, eos: int,
         dtype=np.uint32) -> np.ndarray:
  """Token-id documents (without bos/eos) -> packed rows [rows, 4, seq_len] (FIELDS order)."""
  if not docs:
    return np.zeros((0, len(FIELDS), seq_len), dtype)
  pairs = np.array([len(d) + 1 for d in docs], np.int64)  # (input, target) pairs per document
  doc_start = np.cumsum(pairs) - pairs  # [D] where each document starts in the streams
  total = int(pairs.sum())
  # The streams of all documents one after another: inputs = [bos, ids], targets = [ids, eos].
  ids = np.concatenate(docs).astype(dtype)
  inputs, targets = np.empty(total, dtype), np.empty(total, dtype)
  first, last = np.zeros(total, bool), np.zeros(total, bool)
  first[doc_start], last[doc_start + pairs - 1] = True, True
  inputs[first], inputs[~first] = bos, ids
  targets[last], targets[~last] = eos, ids
  # Pieces: each document cut every seq_len pairs; they tile the streams in order.
  num_pieces = -(-pairs // seq_len)  # [D]
  piece_doc = np.repeat(np.arange(len(docs)), num_pieces)
  k = np.arange(len(piece_doc)) - np.repeat(np.cumsum(num_pieces) - num_pieces, num_pieces)
  lengths = np.minimum(seq_len, pairs[piece_doc] - k * seq_len)  # [P]
  row, offset, segment, rows = _first_fit(lengths, seq_len)
  out = np.zeros((rows, len(FIELDS), seq_len), dtype)
  start, positions = 0, np.arange(seq_len, dtype=dtype)
  for r, o, s, n in zip(row.tolist(), offset.tolist(), segment.tolist(), lengths.tolist()):
    out[r, 0, o:o + n], out[r, 1, o:o + n] = inputs[start:start + n], targets[start:start + n]
    out[r, 2, o:o + n], out[r, 3, o:o + n] = s, positions[:n]
    start += n
  return out


def _blocks(docs: Iterator[np.ndarray], block_tokens: int) -> Iterator[list[np.ndarray]]:
  block, tokens = [], 0
  for d in docs:
    block.append(d)
    tokens += len(d)
    if tokens >= block_tokens:
      yield block
      block, tokens = [], 0
  if block:
    yield block


def write(path: str, docs: Iterator[np.ndarray], seq_len: int, bos: int, eos: int, dtype,
          block_tokens: int = BLOCK_TOKENS) -> dict[str, int]:
  """Packs `docs` into the .npy file `path`; returns {"rows", "tokens", "docs"}."""
  stats = {"rows": 0, "tokens": 0, "docs": 0}
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
  with open(path, "wb") as f:
    # numpy leaves room in a header to grow the first axis in place: written now with 0 rows,
    # rewritten with the count at the end.
    np.lib.format.write_array_header_1_0(f, {**header, "shape": (0, len(FIELDS), seq_len)})
    header_end = f.tell()
    for block in _blocks(docs, block_tokens):
      rows = pack(block, seq_len, bos, eos, dtype)
      f.write(rows.tobytes())
      stats["rows"] += len(rows)
      stats["tokens"] += int(np.count_nonzero(rows[:, 2]))
      stats["docs"] += len(block)
    f.seek(0)
    np.lib.format.write_array_header_1_0(f, {**header,
                                             "shape": (stats["rows"], len(FIELDS), seq_len)})
    if f.tell() != header_end:
      raise RuntimeError(f"{path}: the .npy header of {stats['rows']} rows did not fit in place")
  return stats


def pack_prepared(b, seq_len: int, tokenizer, *, block_tokens: int = BLOCK_TOKENS,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
                  ) -> str:
  """Packs every split of a prepared, tokenized SlimPajama builder `b` (once); returns the
  directory. Written under a temporary name and renamed when complete."""
  out = directory(b.data_dir, seq_len)
  if is_packed(b.data_dir, seq_len):
    return out
  if "tokens" not in b.info.features:
    raise ValueError(f"data.packed needs token ids; {b.data_dir} holds text: set "
                     f"data.pretokenize=True")
  tmp = out + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  dtype = np.uint16 if max(tokenizer.vocab_size, seq_len + 1) <= 1 << 16 else np.uint32
  meta = {"seq_len": seq_len, "splits": {}}
  for name in b.info.metadata["splits"]:
    source = b.as_data_source(name)
    docs = (ex["tokens"] for i in range(0, len(source), 4096)  # batched reads: fewer calls
            for ex in source.__getitems__(range(i, min(i + 4096, len(source)))))
    meta["splits"][name] = write(os.path.join(tmp, name + ".npy"), docs, seq_len,
                                 tokenizer.bos_id, tokenizer.eos_id, dtype, block_tokens)
    s = meta["splits"][name]
    log(f"spjax: packed {name}: {s['docs']:,} documents into {s['rows']:,} rows of {seq_len} "
        f"({s['tokens'] / max(s['rows'] * seq_len, 1):.1%} filled)")
  with open(os.path.join(tmp, _META), "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, out)
  return out


# --- reading ---

def _rows(path: str, seq_len: int, rows: int) -> np.ndarray:
  if not os.path.exists(path):
    raise ValueError(f"packed rows {path} are missing; delete {os.path.dirname(path)} and prepare "
                     f"again (tools/prepare_data.py with data.packed=True)")
  array = np.load(path, mmap_mode="r")
  if array.shape != (rows, len(FIELDS), seq_len):
    raise ValueError(f"packed rows {path} have shape {array.shape}, not ({rows}, {len(FIELDS)}, "
                     f"{seq_len}) for seq_len {seq_len}: a file of another seq_len or a broken "
                     f"one; delete {os.path.dirname(path)} and prepare again")
  return array


class _Rows(grain.MapDataset):
  """A memory-mapped [rows, 4, T] array as a MapDataset: a read is a view of one row.

  Not MapDataset.source: its per-read bookkeeping (byte counts and latency metrics) took a third
  of the time per row.
  """

  def __init__(self, rows: np.ndarray):
    super().__init__()
    self._rows = rows

  def __len__(self) -> int:
    return len(self._rows)

  def __str__(self) -> str:
    return f"_Rows({self._rows.shape})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._rows[index % len(self._rows)]


def domains(data_dir: str, seq_len: int, split: str) -> dict[str, tuple[grain.MapDataset, float]]:
  """{domain: (rows [4, T] each, mean real tokens per row)} of `split`, packed for `seq_len`."""
  folder = directory(data_dir, seq_len)
  with open(os.path.join(folder, _META)) as f:
    meta = json.load(f)
  if meta["seq_len"] != seq_len:
    raise ValueError(f"{folder} holds rows of seq_len {meta['seq_len']}, not {seq_len}")
  found = {}
  for name, s in meta["splits"].items():
    if name.startswith(split + "_") and s["rows"]:
      rows = _rows(os.path.join(folder, name + ".npy"), seq_len, s["rows"])
      found[name.removeprefix(split + "_")] = (_Rows(rows),
                                               s["tokens"] / s["rows"])
  return found


@functools.lru_cache(maxsize=32)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


class _Permuted(grain.MapDataset):
  """`parent` in a new random order every epoch (an epoch = len(parent) consecutive indices)."""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = seed

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"_Permuted(seed={self._seed})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, len(self._parent))
    return self._parent[int(_permutation(self._seed, epoch, len(self._parent))[i])]


def shuffle(rows: grain.MapDataset, seed: int) -> grain.MapDataset:
  """Rows reshuffled every epoch, as MapDataset.shuffle does. Grain finds each shuffled index on
  its own with index_shuffle, whose cost grows as the dataset shrinks (~40 us an element at 1,000
  elements, ~1 ms at 50, ~5 us from 10^6 on, on this loaded machine): a small domain's rows would
  cost more to shuffle than to read, so small shards use a cached numpy permutation per epoch."""
  return _Permuted(rows, seed) if len(rows) < PERMUTE_BELOW else rows.shuffle(seed=seed)


def _to_batch(rows: np.ndarray) -> dict[str, np.ndarray]:
  """[B, 4, T] rows -> the batch contract of pipeline.py (int32 [B, T] each)."""
  inputs, targets, segment_ids, positions = np.asarray(rows, np.int32).transpose(1, 0, 2).copy()
  return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
          "positions": positions, "loss_mask": (segment_ids > 0).astype(np.int32)}


def batches(rows: grain.MapDataset, batch_size: int) -> grain.IterDataset:
  """Rows in reading order -> batches of `batch_size`; `iter()` of it is checkpointable."""
  # One thread reads batches ahead, in order: the work is Python under the GIL, so a second one
  # only adds contention (-25% tokens/s in the benchmark), but one keeps the batches coming while
  # the training loop does something else.
  return rows.batch(batch_size, drop_remainder=True).map(_to_batch).to_iter_dataset(
      grain.ReadOptions(num_threads=1, prefetch_buffer_size=16))
