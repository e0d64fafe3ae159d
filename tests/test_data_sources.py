"""The other sources through the same pipeline: a local TFDS dataset by name, and local files."""

import itertools
import json
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
import zstandard

from spjax.data import files
from spjax.data import pipeline
from spjax.data import tokenizer as tokenizer_lib

from data_config import data_config

SEQ_LEN = 64  # longer than every document here: each is one piece


def _config(source, cache_dir="", **data):
  return data_config(SEQ_LEN, source=source, cache_dir=cache_dir, **data)


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load()


def _texts(batches, tok) -> set[str]:
  """The text of every piece that starts a document (position 0 after bos)."""
  out = set()
  for b in batches:
    for r, seg in enumerate(b["segment_ids"]):
      for s in np.unique(seg[seg > 0]):
        inputs = b["inputs"][r][seg == s]
        if inputs[0] == tok.bos_id:
          out.add(tok.decode(inputs[1:]))
  return out


class SpjaxTinyText(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset with a text feature and, like lm1b, train and test splits only."""

  VERSION = tfds.core.Version("1.0.0")
  code_path = None  # no checksum files beside this test

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "id": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 200), "test": self._generate_examples(200, 220)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {"text": f"Sentence number {i} of the tiny text set.", "id": i}


def test_tfds_source(tmp_path, tok):
  with pytest.raises(ValueError, match="'spjax_tiny_text' is not prepared under .*array_record"):
    pipeline.make_dataset(_config("tfds:spjax_tiny_text", tmp_path), "train", tok, batch_size=2)
  SpjaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config("tfds:spjax_tiny_text", tmp_path)
  val = _texts(pipeline.make_dataset(config, "validation", tok, batch_size=1, num_epochs=1), tok)
  assert val == {f"Sentence number {i} of the tiny text set." for i in range(200, 220)}
  shards = [set(pipeline.source(config, "train", process_index=i, process_count=2, num_epochs=1))
            for i in range(2)]
  assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 200
  train = pipeline.make_dataset(config, "train", tok, batch_size=4, process_index=1,
                                process_count=2)
  assert len(_texts(itertools.islice(train, 20), tok) & shards[1]) > 50
  assert list(pipeline.eval_datasets(config, tok, batch_size=2)) == ["spjax_tiny_text"]
  assert pipeline.eval_weights(config, tok) == {"spjax_tiny_text": 1.0}


@pytest.fixture
def corpus(tmp_path):
  root = tmp_path / "corpus"
  (root / "sub").mkdir(parents=True)
  docs = [f"Document {i}: " + "some words here " * (i % 7 + 1) for i in range(300)]
  (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:150]))
  (root / "sub" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
      "".join(json.dumps({"text": d, "meta": {}}) + "\n" for d in docs[150:299]).encode()))
  (root / "sub" / "c.txt").write_text(docs[299])
  return root, docs


def test_files_source_splits_and_batches(corpus, tok):
  root, docs = corpus
  config = _config(f"files:{root}/**/*")
  train = list(pipeline.source(config, "train", num_epochs=1))
  val = list(pipeline.source(config, "validation", num_epochs=1))
  assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
  assert 0.01 < len(val) / len(docs) < 0.12  # about one in twenty
  got = _texts(pipeline.make_dataset(config, "validation", tok, batch_size=1, num_epochs=1), tok)
  assert got == set(val)
  batch = next(iter(pipeline.make_dataset(config, "train", tok, batch_size=4)))
  assert batch["inputs"].shape == (4, SEQ_LEN)


def test_files_source_bad_lines(corpus, tok, capsys):
  root, _ = corpus
  with open(root / "a.jsonl", "a") as f:
    f.write('{"text": 3}\n{"text": "the last one"}\n')
  with pytest.raises(files.DataError, match=re.escape(f"{root}/a.jsonl:151: ") + "no string"):
    pipeline.source(_config(f"files:{root}/*.jsonl"), "train")
  docs = pipeline.source(_config(f"files:{root}/*.jsonl", bad_records="skip"), "train",
                         num_epochs=1)
  assert "the last one" in list(docs) + list(pipeline.source(
      _config(f"files:{root}/*.jsonl", bad_records="skip"), "validation", num_epochs=1))
  assert "skipped 1 bad lines" in capsys.readouterr().err
  with pytest.raises(ValueError, match="matches no files"):
    pipeline.source(_config(f"files:{root}/*.parquet"), "train")
  with pytest.raises(ValueError, match="data.bad_records 'ignore'"):
    pipeline.source(_config(f"files:{root}/*.jsonl", bad_records="ignore"), "train")
