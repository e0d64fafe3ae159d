"""`data.source` -> the documents of one split, as one Grain MapDataset per domain.

  embedded          Python's own documentation, shipped with every install (embedded.py)
  slimpajama:DIR    SlimPajama in its published layout (DIR/train/chunk1/example_train_0.jsonl.zst,
                    DIR/validation/..., DIR/test/...), seven domains. Prepared once into
                    array_record under `data.cache_dir` (slimpajama.py) by the first run that needs
                    it; a run of several processes needs it prepared first (tools/prepare_data.py).
  tfds:NAME         a TFDS dataset already prepared in array_record format under `data.cache_dir`
                    (e.g. `tfds build lm1b --file_format=array_record`), read from its "text"
                    feature; NAME may carry a config and version, as in tfds.builder
                    ("lm1b", "wiki40b/en:1.3.0"). No validation split: its test split is used.
  files:GLOB        local files matching GLOB (`**` recurses): .jsonl or .jsonl.zst with one
                    {"text": ...} per line, or any other file as one UTF-8 document. Read into
                    memory at start; a document is held out for validation when the crc32 of
                    "<path relative to the glob's directory>:<line>" is divisible by 20 (~5%).
  sft:GLOB          instruction data (instruct.py): rows of prompts and completions or chat
                    messages in .jsonl, .jsonl.zst or .json files; "sft:embedded" is the embedded
                    instruction set. Documents are instruct.Example, trained on their completions.

Sources other than slimpajama have one domain, named "embedded", the TFDS name, "files" or "sft".
A document is a str (tokenized on the fly) or, for SlimPajama prepared with `data.pretokenize`,
the token ids without bos/eos (int array); with `data.packed` too, a "document" is a row packed at
preparation, [4, seq_len] (packed.py), and Domain.mean_length its mean real tokens.
"""

import dataclasses
import functools
import glob
import os
import sys
import zlib

import grain
import numpy as np

from spjax.data import embedded
from spjax.data import files
from spjax.data import instruct
from spjax.data import packed
from spjax.data import tokenizer as tokenizer_lib

KINDS = ("embedded", "slimpajama:DIR", "tfds:NAME", "files:GLOB", "sft:GLOB")


@dataclasses.dataclass
class Domain:
  docs: grain.MapDataset  # str or int array [n] per document
  mean_length: float      # per document, in a unit shared by the source's domains (tokens, bytes)


def kind(config) -> tuple[str, str]:
  """`data.source` -> (kind, argument), e.g. ("slimpajama", "/data/sp"); ValueError if unknown."""
  name, sep, arg = config.data.source.partition(":")
  if (name, bool(sep)) in {("embedded", False), ("slimpajama", True), ("tfds", True),
                           ("files", True), ("sft", True)} and (arg or name == "embedded"):
    return name, arg
  raise ValueError(f"unknown data.source {config.data.source!r}; valid forms: {', '.join(KINDS)}")


def load(config, split: str, tokenizer: tokenizer_lib.Tokenizer, *,
         process_count: int = 1) -> dict[str, Domain]:
  """{domain: Domain} for `split` of `data.source`; ValueError naming what is missing or wrong."""
  name, arg = kind(config)
  if config.data.bad_records not in files.BAD_RECORDS:
    raise ValueError(f"unknown data.bad_records {config.data.bad_records!r}; valid values: "
                     f"{', '.join(files.BAD_RECORDS)}")
  if config.data.eval_source and name != "sft":
    raise ValueError(f"data.eval_source is for sft: sources; data.source {config.data.source!r} "
                     f"holds out its own validation split: leave data.eval_source empty")
  if packed.enabled(config) and not (name == "slimpajama" and config.data.pretokenize):
    raise ValueError(f"data.packed is for slimpajama:DIR sources with data.pretokenize=True; "
                     f"data.source is {config.data.source!r}"
                     f"{'' if config.data.pretokenize else ', data.pretokenize False'}")
  if name == "embedded":
    docs = embedded.documents(split)
    return {"embedded": Domain(grain.MapDataset.source(docs), np.mean([len(d) for d in docs]))}
  if name == "slimpajama":
    return _slimpajama(config, arg, split, tokenizer, process_count)
  if name == "tfds":
    return _tfds(config, arg, split)
  if name == "sft":
    exs = instruct.examples(config, split, tokenizer)
    text_bytes = [sum(len(p) for p, _ in e.parts if isinstance(p, str)) for e in exs]
    return {"sft": Domain(grain.MapDataset.source(exs), float(np.mean(text_bytes)))}
  return _files(config, arg, split)


def _check_split(split: str, valid) -> None:
  if split not in valid:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(valid)}")


def _slimpajama(config, source_dir, split, tokenizer, process_count) -> dict[str, Domain]:
  from spjax.data import slimpajama  # TFDS takes seconds to import; only SlimPajama needs it
  model = tokenizer.model_proto if config.data.pretokenize else b""
  b = slimpajama.builder(source_dir, config.data.cache_dir, model)
  if not b.is_prepared():
    if process_count > 1:
      raise ValueError(f"{source_dir} is not prepared under {b.data_dir}; a run of several "
                       f"processes needs it prepared first: python tools/prepare_data.py "
                       f"--config=... with the same data.* flags")
    b = slimpajama.prepare(source_dir, config.data.cache_dir, model,
                           bad_records=config.data.bad_records)
  stats = b.info.metadata["splits"]
  valid = sorted({s.split("_")[0] for s in stats})
  _check_split(split, valid)
  if packed.enabled(config):
    return _packed(config, b, split, tokenizer, process_count)
  decode = (lambda ex: ex["tokens"]) if model else (lambda ex: ex["text"].decode("utf-8"))
  domains = {}
  for name, s in stats.items():
    if name.startswith(split + "_"):
      docs = grain.MapDataset.source(b.as_data_source(name)).map(decode)
      mean = s.get("tokens", s["bytes"]) / s["docs"]
      domains[name.removeprefix(split + "_")] = Domain(docs, mean)
  return domains


def _packed(config, b, split, tokenizer, process_count) -> dict[str, Domain]:
  """The prepared copy's rows packed for `seq_len` (packed.py), packing them first if need be."""
  if not packed.is_packed(b.data_dir, config.seq_len):
    if process_count > 1:
      raise ValueError(f"{b.data_dir} has no rows packed for seq_len {config.seq_len}; a run of "
                       f"several processes needs them packed first: python tools/prepare_data.py "
                       f"--config=... with the same seq_len and data.* flags")
    packed.pack_prepared(b, config.seq_len, tokenizer)
  return {d: Domain(rows, mean)
          for d, (rows, mean) in packed.domains(b.data_dir, config.seq_len, split).items()}


def _tfds(config, name, split) -> dict[str, Domain]:
  import tensorflow_datasets as tfds  # slow to import; only TFDS sources need it
  b = tfds.builder(name, data_dir=config.data.cache_dir or None)
  if not b.is_prepared():
    raise ValueError(f"TFDS dataset {name!r} is not prepared under {b.data_dir_root}; prepare it "
                     f"there in array_record format (tfds build {name.split(':')[0]} "
                     f"--file_format=array_record), or point data.cache_dir at it")
  if "text" not in b.info.features:
    raise ValueError(f"TFDS dataset {name!r} has no 'text' feature; it has "
                     f"{', '.join(b.info.features)}")
  splits = {"train": "train", "validation": "validation" if "validation" in b.info.splits
            else "test"}
  _check_split(split, splits)
  try:
    source = b.as_data_source(splits[split])
  except (NotImplementedError, ValueError) as e:  # prepared in another format
    raise ValueError(f"TFDS dataset {name!r} cannot be read by random access ({e}); prepare it "
                     f"with --file_format=array_record") from e
  s = b.info.splits[splits[split]]
  mean = s.num_bytes / max(s.num_examples, 1)
  return {name.split("/")[0].split(":")[0]:
          Domain(grain.MapDataset.source(source).map(lambda ex: ex["text"].decode("utf-8")), mean)}


@functools.lru_cache(maxsize=2)  # train and validation of one run read the files once
def _read_files(pattern: str, bad_records: str) -> dict[str, tuple[str, ...]]:
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ValueError(f"data.source files:{pattern} matches no files")
  root = os.path.dirname(pattern.split("*")[0].split("?")[0].split("[")[0])
  splits, skipped = {"train": [], "validation": []}, files.Skipped()
  for path in paths:
    for line, text, _ in files.records(path, bad_records=bad_records, skipped=skipped):
      key = f"{os.path.relpath(path, root)}:{line}"
      splits["validation" if zlib.crc32(key.encode()) % 20 == 0 else "train"].append(text)
  if skipped:
    print(f"spjax: files:{pattern}: {skipped}", file=sys.stderr, flush=True)
  return {k: tuple(v) for k, v in splits.items()}


def _files(config, pattern, split) -> dict[str, Domain]:
  corpus = _read_files(pattern, config.data.bad_records)
  _check_split(split, corpus)
  docs = corpus[split]
  if not docs:
    raise ValueError(f"data.source files:{pattern} has no {split} documents "
                     f"({sum(map(len, corpus.values()))} in all)")
  return {"files": Domain(grain.MapDataset.source(docs), float(np.mean(list(map(len, docs)))))}
