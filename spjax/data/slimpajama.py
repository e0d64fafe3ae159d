"""SlimPajama as a TFDS dataset: the published jsonl.zst layout -> array_record, split by domain.

Input, as published (cerebras/SlimPajama-627B), under a directory DIR:
  DIR/train/chunk1/example_train_0.jsonl.zst, ...  DIR/validation/chunk1/example_holdout_0.jsonl.zst
  DIR/test/...                                      (test is optional; plain .jsonl is read too)
Output, under a TFDS data_dir (`data.cache_dir`; "" = ~/tensorflow_datasets or $TFDS_DATA_DIR):
  slim_pajama/<name>-<hash of DIR>-<text | sp-<hash of the tokenizer>>/1.0.0/
    slim_pajama-<split>_<domain>.array_record-*    e.g. train_CommonCrawl, validation_GitHub
so one directory can be prepared as text and with several tokenizers side by side, and a prepared
copy is found again by the same DIR and tokenizer. Only (split, domain) pairs with documents get
a split. Each example is {"tokens": uint16/uint32 [n]} (ids without bos/eos) or {"text": str};
`info.metadata["splits"][split] = {"docs", "tokens", "bytes"}` (tokens only when tokenized).

Preparing runs in two steps. First every input file is read, checked and (optionally) tokenized
into one .npz in a work directory, by a pool of processes; a finished file is never redone, so an
interrupted preparation resumes where it stopped. Then the TFDS builder writes the array_record
splits from those files (I/O only) and the work directory is deleted. `bad_records` applies while
preparing: a prepared copy is used as it is, whatever a later run's setting.
"""

from collections.abc import Callable
import concurrent.futures
import dataclasses
import glob
import hashlib
import multiprocessing
import os
import re
import shutil
import sys

import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds
import tqdm

from spjax.data import files
from spjax.data import mixtures

SPLITS = ("train", "validation", "test")
_LAYOUT = "DIR/train/chunk*/*.jsonl.zst and DIR/validation/chunk*/*.jsonl.zst"


def input_files(source_dir: str) -> dict[str, list[str]]:
  """{split: sorted input files} for the splits present; train and validation are required."""
  found = {s: sorted(glob.glob(os.path.join(source_dir, s, "**", "*.jsonl*"), recursive=True))
           for s in SPLITS}
  found = {s: [f for f in fs if f.endswith((".jsonl", ".jsonl.zst"))] for s, fs in found.items()}
  missing = [s for s in ("train", "validation") if not found[s]]
  if missing:
    raise ValueError(f"no SlimPajama files for split {', '.join(missing)} in {source_dir!r}; "
                     f"expected the published layout {_LAYOUT}")
  return {s: fs for s, fs in found.items() if fs}


def _hash(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:8]


@dataclasses.dataclass(eq=False)
class Config(tfds.core.BuilderConfig):
  source_dir: str = ""
  # The serialized SentencePiece model; b"" = keep text. Not in the repr TFDS logs.
  tokenizer_model: bytes = dataclasses.field(default=b"", repr=False)


class SlimPajama(tfds.core.GeneratorBasedBuilder):
  """Writes the work directory's per-file .npz into one array_record split per (split, domain)."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS looks beside a builder's code for checksum files; there are none, and locating the code
  # of a builder inside a package needs the importlib_resources backport, even on Python 3.11.
  code_path = None

  @property
  def work_dir(self) -> str:
    return os.path.join(self.data_dir_root, "downloads", "slim_pajama", self.builder_config.name)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.builder_config.tokenizer_model:
      # BYTES encoding: decoding is one np.frombuffer, not a proto list of ints.
      feature = {"tokens": tfds.features.Tensor(shape=(None,), dtype=self._token_dtype(),
                                                encoding=tfds.features.Encoding.BYTES)}
    else:
      feature = {"text": tfds.features.Text()}
    return tfds.core.DatasetInfo(
        builder=self, description=f"SlimPajama from {self.builder_config.source_dir}",
        features=tfds.features.FeaturesDict(feature), metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)  # the input is shuffled already; the pipeline shuffles again

  def _token_dtype(self):
    sp = spm.SentencePieceProcessor(model_proto=self.builder_config.tokenizer_model)
    return np.uint16 if sp.vocab_size() <= 1 << 16 else np.uint32

  def _split_generators(self, dl_manager):
    del dl_manager  # the input is local
    tokenized = bool(self.builder_config.tokenizer_model)
    stats, generators, skipped = {}, {}, files.Skipped()
    for split, inputs in input_files(self.builder_config.source_dir).items():
      paths = [_work_file(self.work_dir, self.builder_config.source_dir, f) for f in inputs]
      counts = {d: np.zeros(3, np.int64) for d in mixtures.DOMAINS}  # docs, units, bytes
      for path in paths:
        with np.load(path) as part:
          for d, c in counts.items():
            lengths = part[f"{d}.lengths"]
            c += len(lengths), lengths.sum(), part[f"{d}.bytes"].sum() if tokenized else 0
          lines, rest_of_files = part["skipped"]
          skipped.merge(files.Skipped(int(lines), int(rest_of_files),
                                      str(part["first_skipped"])))
      for domain, (docs, units, nbytes) in counts.items():
        if docs:
          name = f"{split}_{domain}"
          stats[name] = ({"docs": int(docs), "tokens": int(units), "bytes": int(nbytes)}
                         if tokenized else {"docs": int(docs), "bytes": int(units)})
          generators[name] = self._generate_examples(paths, domain)
    self.info.metadata["splits"] = stats
    self.info.metadata["skipped"] = dataclasses.asdict(skipped)
    return generators

  def _generate_examples(self, paths: list[str], domain: str):
    key = "tokens" if self.builder_config.tokenizer_model else "text"
    for i, path in enumerate(paths):
      with np.load(path) as part:
        data, lengths = part[f"{domain}.data"], part[f"{domain}.lengths"]
      ends = np.cumsum(lengths)
      for j, (start, end) in enumerate(zip(ends - lengths, ends)):
        value = data[start:end]
        yield f"{i}-{j}", {key: value if key == "tokens" else value.tobytes().decode("utf-8")}


def _work_file(work_dir: str, source_dir: str, path: str) -> str:
  return os.path.join(work_dir, os.path.relpath(path, source_dir) + ".npz")


def config_for(source_dir: str, tokenizer_model: bytes = b"") -> Config:
  source_dir = os.path.abspath(source_dir)
  base = re.sub(r"\W", "_", os.path.basename(source_dir.rstrip("/"))) or "root"
  kind = f"sp-{_hash(tokenizer_model)}" if tokenizer_model else "text"
  return Config(name=f"{base}-{_hash(source_dir.encode())}-{kind}", source_dir=source_dir,
                tokenizer_model=tokenizer_model,
                description=f"SlimPajama from {source_dir}, {kind}")


def builder(source_dir: str, data_dir: str = "", tokenizer_model: bytes = b"") -> SlimPajama:
  """The builder of `source_dir`'s prepared copy (prepared or not) under `data_dir`."""
  return SlimPajama(config=config_for(source_dir, tokenizer_model),
                    data_dir=data_dir or None, file_format="array_record")


# --- step 1: one input file -> one .npz of per-domain documents (runs in worker processes) ---

_worker_sp: spm.SentencePieceProcessor | None = None


def _init_worker(tokenizer_model: bytes) -> None:
  global _worker_sp
  _worker_sp = spm.SentencePieceProcessor(model_proto=tokenizer_model) if tokenizer_model else None


def _convert(path: str, out: str, bad_records: str) -> None:
  """Reads one input file and writes `out`: for each domain, `.data` (token ids or UTF-8 bytes,
  all documents concatenated) and `.lengths` (per document); `.bytes` too when tokenized."""
  skipped = files.Skipped()
  texts = {d: [] for d in mixtures.DOMAINS}
  for _, text, domain in files.records(path, bad_records=bad_records, skipped=skipped,
                                       domains=mixtures.DOMAIN_OF_SET_NAME):
    texts[domain].append(text)
  arrays = {"skipped": np.array([skipped.lines, skipped.files]),
            "first_skipped": np.array(skipped.first)}
  for domain, docs in texts.items():
    raw = [t.encode("utf-8") for t in docs]
    if _worker_sp is None:
      pieces = [np.frombuffer(r, np.uint8) for r in raw]
    else:
      dtype = np.uint16 if _worker_sp.vocab_size() <= 1 << 16 else np.uint32
      pieces = [np.asarray(ids, dtype) for ids in _worker_sp.encode(docs)]
      arrays[f"{domain}.bytes"] = np.array([len(r) for r in raw], np.int64)
    arrays[f"{domain}.lengths"] = np.array([len(p) for p in pieces], np.int64)
    arrays[f"{domain}.data"] = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "wb") as f:
    np.savez(f, **arrays)
  os.replace(out + ".tmp", out)  # atomic: a file in the work directory is always complete


def prepare(source_dir: str, data_dir: str = "", tokenizer_model: bytes = b"", *,
            bad_records: str = "raise", workers: int = 0,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)
            ) -> SlimPajama:
  """Prepares `source_dir` (once: a prepared copy is returned as is); returns its builder.

  `workers` processes read and tokenize the input files (0 = one per CPU we may use). With
  `bad_records="skip"` the skipped lines are counted and reported through `log`.
  """
  b = builder(source_dir, data_dir, tokenizer_model)
  if b.is_prepared():
    return b
  todo = [(f, _work_file(b.work_dir, b.builder_config.source_dir, f))
          for fs in input_files(b.builder_config.source_dir).values() for f in fs]
  pending = [(f, out) for f, out in todo if not os.path.exists(out)]
  log(f"spjax: preparing {source_dir} into {b.data_dir}: {len(todo)} files, "
      f"{len(todo) - len(pending)} already done")
  desc = "read+tokenize" if tokenizer_model else "read"
  workers = workers or len(os.sched_getaffinity(0))
  if workers == 1 or len(pending) <= 1:
    _init_worker(tokenizer_model)  # no pool to start for one worker or one file
    for f, out in tqdm.tqdm(pending, desc=desc, unit="file"):
      _convert(f, out, bad_records)
  else:
    # spawn, not fork: the caller may be a training process with JAX's threads running.
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(tokenizer_model,)) as pool:
      futures = [pool.submit(_convert, f, out, bad_records) for f, out in pending]
      for future in tqdm.tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                              desc=desc, unit="file"):
        future.result()  # re-raises a worker's DataError here
  b.download_and_prepare()
  shutil.rmtree(b.work_dir)
  skipped = files.Skipped(**b.info.metadata["skipped"])
  if skipped:
    log(f"spjax: {source_dir}: {skipped}")
  return b
