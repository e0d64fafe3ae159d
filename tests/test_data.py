"""The embedded corpus, the tokenizer and the Grain pipeline's batch contract."""

import itertools

import numpy as np
import pytest

from spjax.data import embedded
from spjax.data import pipeline
from spjax.data import tokenizer as tokenizer_lib

from data_config import assert_resumes_exactly, data_config

SEQ_LEN = 128


def _config(**data):
  return data_config(SEQ_LEN, **data)


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load()


def _segments(batch):
  """Yields (row, segment id, slice) for every piece in a batch."""
  for r, seg in enumerate(batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      (idx,) = np.nonzero(seg == s)
      yield r, s, slice(idx[0], idx[-1] + 1)


# --- corpus ---

def test_splits_disjoint_nonempty_deterministic():
  train, val = embedded.documents("train"), embedded.documents("validation")
  assert train and val
  assert not set(train) & set(val)
  assert 0.02 < len(val) / (len(train) + len(val)) < 0.1  # about 5% held out
  assert sum(map(len, train + val)) > 1_000_000  # about a megabyte of text
  embedded._corpus.cache_clear()  # rebuild from the interpreter: same texts, same order
  assert embedded.documents("train") == train


def test_bad_split():
  with pytest.raises(ValueError, match="validation"):
    embedded.documents("test")
  with pytest.raises(ValueError, match="split"):
    pipeline.make_dataset(_config(), "dev", tokenizer_lib.load(), batch_size=2)


# --- tokenizer ---

def test_tokenizer_round_trips(tok):
  assert tok.vocab_size == 1024 and len({tok.bos_id, tok.eos_id}) == 2
  text = "def f(x):\n    return x  # two spaces, a tab\there\n\n  and leading ones"
  assert tok.decode(tok.encode(text)) == text
  prose = "The return statement leaves the current function call with the expression list."
  assert len(tok.encode(prose)) < len(prose) / 3  # merges learned, not bytes
  # Characters the corpus never saw come back through byte fallback, not as <unk>.
  text = "naïve café — 日本語, ελληνικά, emoji 🙂"
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_tokenizer(tmp_path, model_type):
  path = tokenizer_lib.train(embedded.documents("validation"), str(tmp_path / "t"), vocab_size=400,
                             model_type=model_type)
  tok = tokenizer_lib.load(path)
  assert tok.vocab_size == 400
  assert tok.decode(tok.encode("Hello, wörld!\n  x")) == "Hello, wörld!\n  x"
  with pytest.raises(ValueError, match="bpe"):
    tokenizer_lib.train(["text"], str(tmp_path / "w"), vocab_size=400, model_type="wordpiece")


def test_bad_tokenizer_path(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer.*nope"):
    tokenizer_lib.load(str(tmp_path / "nope.model"))
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="junk.model"):
    tokenizer_lib.load(str(tmp_path / "junk.model"))


# --- pipeline ---

def test_bad_source(tok):
  with pytest.raises(ValueError, match="data.source.*embedded"):
    pipeline.make_dataset(_config(source="slimpajama_typo"), "train", tok, batch_size=2)


def test_batch_contract(tok):
  batches = list(itertools.islice(pipeline.make_dataset(_config(), "train", tok, batch_size=16), 8))
  loss_fraction = []
  for b in batches:
    assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    np.testing.assert_array_equal(b["loss_mask"], b["segment_ids"] > 0)  # pretraining: all trained
    for v in b.values():
      assert v.shape == (16, SEQ_LEN) and v.dtype == np.int32
    for r, s, sl in _segments(b):
      # Targets are the inputs shifted by one, inside the piece; positions count from 0.
      np.testing.assert_array_equal(b["targets"][r, sl][:-1], b["inputs"][r, sl][1:])
      np.testing.assert_array_equal(b["positions"][r, sl], np.arange(sl.stop - sl.start))
    # Each row holds pieces 1, 2, ..., n in order, then padding (0) to the end.
    for seg in b["segment_ids"]:
      n = seg.max()
      assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, n + 1))
      assert np.all(np.diff(np.where(seg == 0, n + 1, seg)) >= 0)
    loss_fraction.append(np.mean(b["segment_ids"] > 0))
  assert np.mean(loss_fraction) > 0.8  # packing fills rows


def test_every_validation_token_once(tok):
  # One pass, one row per batch (nothing dropped): the pieces put back together are the documents.
  ds = pipeline.make_dataset(_config(), "validation", tok, batch_size=1, num_epochs=1)
  starts, targets = 0, 0
  for b in ds:
    for r, _, sl in _segments(b):
      starts += b["inputs"][r, sl.start] == tok.bos_id and b["positions"][r, sl.start] == 0
      targets += sl.stop - sl.start
  docs = embedded.documents("validation")
  assert starts == len(docs)
  assert targets == sum(len(tok.encode(d)) + 1 for d in docs)  # + eos as the last target


def test_process_shards_disjoint_and_cover():
  config = _config()
  shards = [list(pipeline.source(config, "train", process_index=i, process_count=2, num_epochs=1))
            for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(embedded.documents("train"))
  with pytest.raises(ValueError, match="too few"):
    pipeline.source(config, "validation", process_index=9, process_count=10)


def test_train_order_changes_every_epoch_validation_order_fixed():
  train = pipeline.source(_config(), "train", num_epochs=2)
  n = len(train) // 2
  first, second = list(train[:n]), list(train[n:])
  assert first != second and sorted(first) == sorted(second)
  assert list(pipeline.source(_config(), "validation", num_epochs=1)) == (
      embedded.documents("validation"))


def test_validation_repeats_and_is_deterministic(tok):
  # ~32K validation tokens; 12 batches of 64x128 need more than two passes.
  ds = pipeline.make_dataset(_config(), "validation", tok, batch_size=64)
  a = list(itertools.islice(ds, 12))
  b = next(iter(ds))  # a second pass over the same dataset starts over
  assert len(a) == 12
  for k in b:
    np.testing.assert_array_equal(a[0][k], b[k])


def test_iterator_state_resumes_exact_next_batch(tok):
  # 60 batches: past the end of the first epoch (~430K tokens / 8K per batch)
  assert_resumes_exactly(_config(), tok, batch_size=64, skip=60)


def test_fixed_shards_give_the_same_global_batches_for_any_process_count(tok):
  config = _config(shards=4)
  def global_batches(process_count, steps=3):
    rows = 16 // process_count
    its = [iter(pipeline.make_dataset(config, "train", tok, batch_size=rows, process_index=p,
                                      process_count=process_count)) for p in range(process_count)]
    return [np.concatenate([next(it)["inputs"] for it in its]) for _ in range(steps)]
  one, two, four = global_batches(1), global_batches(2), global_batches(4)
  for a, b, c in zip(one, two, four):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  with pytest.raises(ValueError, match=r"data.shards \(4\) must be a multiple of the process count "
                                       r"\(3\)"):
    pipeline.make_dataset(config, "train", tok, batch_size=4, process_index=0, process_count=3)
