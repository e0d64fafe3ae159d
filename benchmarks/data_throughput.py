"""Input pipeline throughput: tokens/s of packed batches, on the fly, pre-tokenized, pre-packed.

  python benchmarks/data_throughput.py [--docs=3000 --seq_len=2048 --batch_size=16]

Writes a SlimPajama-shaped corpus (spjax/data/synthetic.py: English text, seven domains, real
document-length spread, 2 files a split) to a temporary directory, then times
  (a) on the fly: data.source=files:<the train .jsonl.zst files>, text tokenized and packed as
      batches are read; the clock starts before the files are read and decompressed;
  (b) pre-tokenized: data.source=slimpajama:DIR prepared with token ids (preparation not timed),
      array_record read + decode + pack, mixture as published;
  (c) pre-packed: the same with data.packed, rows packed for seq_len when preparing (packing timed
      on its own, not in the rate), memory-mapped rows read + mixed + batched; drained for 10x (b)'s
      batches (several epochs of rows), as one batch takes far less time;
with (c) / (b) from the same run; and, to show where the time goes, each stage alone: zstd + JSON reading, SentencePiece encoding,
array_record reading + TFDS decoding, and Grain's first-fit packing of in-memory token arrays.
Tokens are real tokens (padding excluded). "per CPU-s" divides by the process's CPU time, which
holds still when other programs share the machine; wall-clock rates do not. --profile adds a
profile of (b)'s main thread (packing and batching run there; reading and decoding in threads).
"""

import argparse
import cProfile
import glob
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from spjax.data import files  # noqa: E402
from spjax.data import pipeline  # noqa: E402
from spjax.data import synthetic  # noqa: E402
from spjax.data import tokenizer as tokenizer_lib  # noqa: E402


class Clock:
  """Wall and CPU seconds of a block."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _report(name: str, count: float, clock: Clock, unit: str = "tokens") -> None:
  print(f"  {name:44s} {count / clock.wall / 1e6:7.2f} M {unit}/s   "
        f"{count / clock.cpu / 1e6:7.2f} M {unit}/CPU-s   "
        f"({count / 1e6:.2f} M in {clock.wall:.1f} s)", flush=True)


def _config(source: str, cache_dir: str, seq_len: int, packed: bool = False):
  config = default.get_config("tiny")  # the training run's data fields, at their defaults
  config.seq_len = seq_len
  config.data.update({"source": source, "cache_dir": cache_dir, "packed": packed})
  return config


def _drain(ds, batches: int) -> int:
  """Real tokens in the first `batches` batches of `ds`."""
  it, tokens = iter(ds), 0
  for _ in range(batches):
    tokens += int(np.count_nonzero(next(it)["segment_ids"]))
  return tokens


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, default=3000, help="training documents to write")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--profile", action="store_true",
                      help="also profile (b)'s main thread: the functions taking the most time")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="spjax_data_throughput_") as root:
    _run(args, root)


def _run(args, root: str) -> None:
  tok = tokenizer_lib.load()
  source_dir = os.path.join(root, "DIR")
  docs = synthetic.write(source_dir, {"train": args.docs, "validation": 70})["train"]
  texts = [t for _, t in docs]
  train_files = sorted(glob.glob(os.path.join(source_dir, "train", "*", "*.jsonl.zst")))
  print(f"{args.docs} documents, {sum(map(len, texts)) / 1e6:.1f} M characters; seq_len "
        f"{args.seq_len}, batch {args.batch_size}; {len(os.sched_getaffinity(0))} CPUs, load "
        f"average {os.getloadavg()[0]:.1f}", flush=True)

  print("stages alone:")
  with Clock() as c:
    n = sum(len(t) for f in train_files for _, t, _ in files.records(f))
  _report("zstd + JSON read", n, c, "chars")
  with Clock() as c:
    ids = [np.asarray(tok.encode(t), np.int32) for t in texts]
  total_tokens = sum(map(len, ids))
  _report("SentencePiece encode (one thread)", total_tokens, c)
  with Clock() as c:
    ds = pipeline.batches(grain.MapDataset.source(ids), _config("embedded", "", args.seq_len), tok,
                          args.batch_size, shuffle_bins=True)
    packed = sum(int(np.count_nonzero(b["segment_ids"])) for b in ds)
  _report("pieces + Grain first-fit packing of ids", packed, c)

  from spjax.data import slimpajama  # pylint: disable=g-import-not-at-top
  with Clock() as prep:
    b = slimpajama.prepare(source_dir, os.path.join(root, "tfds"), tok.model_proto)
  print(f"  (preparing with token ids took {prep.wall:.1f} s)")
  with Clock() as c:
    n = 0
    for split in b.info.metadata["splits"]:
      if split.startswith("train_"):
        for ex in b.as_data_source(split):
          n += len(ex["tokens"])
  _report("array_record read + TFDS decode", n, c)

  batches = max(1, int(0.9 * total_tokens / (args.batch_size * args.seq_len)))
  print(f"end to end ({batches} batches):")
  pattern = os.path.join(source_dir, "train", "**", "*.jsonl.zst")
  with Clock() as c:
    n = _drain(pipeline.make_dataset(_config(f"files:{pattern}", "", args.seq_len), "train", tok,
                                     batch_size=args.batch_size), batches)
  _report("(a) jsonl.zst -> tokenize -> pack -> batch", n, c)
  with Clock() as c:
    n = _drain(pipeline.make_dataset(
        _config(f"slimpajama:{source_dir}", os.path.join(root, "tfds"), args.seq_len), "train",
        tok, batch_size=args.batch_size), batches)
  _report("(b) array_record ids -> pack -> batch", n, c)
  b_rate, b_cpu_rate = n / c.wall, n / c.cpu

  from spjax.data import packed  # pylint: disable=g-import-not-at-top
  with Clock() as prep:
    packed.pack_prepared(b, args.seq_len, tok, log=lambda m: None)
  print(f"  (packing rows of {args.seq_len} when preparing took {prep.wall:.1f} s: "
        f"{total_tokens / prep.wall / 1e6:.1f} M tokens/s)")
  packed_config = _config(f"slimpajama:{source_dir}", os.path.join(root, "tfds"), args.seq_len,
                          packed=True)
  with Clock() as c:
    n = _drain(pipeline.make_dataset(packed_config, "train", tok, batch_size=args.batch_size),
               10 * batches)
  _report("(c) packed rows -> batch (data.packed)", n, c)
  print(f"  (c) / (b): {n / c.wall / b_rate:.1f}x wall, {n / c.cpu / b_cpu_rate:.1f}x per CPU-s")
  if args.profile:
    ds = pipeline.make_dataset(
        _config(f"slimpajama:{source_dir}", os.path.join(root, "tfds"), args.seq_len), "train",
        tok, batch_size=args.batch_size)
    profile = cProfile.Profile()
    profile.runcall(_drain, ds, batches)
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
  main()
