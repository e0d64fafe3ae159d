"""Rows packed at preparation (data.packed, spjax/data/packed.py) against packing while reading."""

import collections
import itertools
import os
import shutil

import numpy as np
import pytest

from spjax.data import mixtures
from spjax.data import packed
from spjax.data import pipeline
from spjax.data import synthetic
from spjax.data import tokenizer as tokenizer_lib

from data_config import assert_resumes_exactly, data_config

SEQ_LEN = 64
MIXTURE = "CommonCrawl:0.4,C4:0.3,Book:0.2,GitHub:0.1"


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
  """A small SlimPajama-shaped corpus, prepared with token ids and packed for SEQ_LEN."""
  from spjax.data import slimpajama
  root = tmp_path_factory.mktemp("packed")
  synthetic.write(str(root / "DIR"), {"train": 700, "validation": 70}, scale=0.05)
  b = slimpajama.prepare(str(root / "DIR"), str(root / "tfds"), tok.model_proto, workers=1)
  packed.pack_prepared(b, SEQ_LEN, tok, log=lambda m: None)
  return root, b


def _config(corpus, **data):
  root, _ = corpus
  return data_config(SEQ_LEN, **{"source": f"slimpajama:{root / 'DIR'}",
                                 "cache_dir": root / "tfds", "packed": True, **data})


def _pieces(batches):
  """Every segment of the batches as (inputs, targets); checks positions count from 0."""
  found = []
  for b in batches:
    for r, seg in enumerate(b["segment_ids"]):
      for s in np.unique(seg[seg > 0]):
        (idx,) = np.nonzero(seg == s)
        np.testing.assert_array_equal(b["positions"][r, idx], np.arange(len(idx)))
        found.append((tuple(b["inputs"][r, idx]), tuple(b["targets"][r, idx])))
  return found


def _expected_pieces(docs, seq_len, bos, eos):
  want = []
  for d in docs:
    toks = np.concatenate([[bos], d, [eos]])
    for i in range(0, len(toks) - 1, seq_len):
      want.append((tuple(toks[:-1][i:i + seq_len]), tuple(toks[1:][i:i + seq_len])))
  return want


# --- packing ---

@pytest.mark.parametrize("seq_len, block_tokens", [(16, 1 << 20), (64, 500)])
def test_rows_hold_every_piece_once(tmp_path, seq_len, block_tokens):
  rng = np.random.default_rng(seq_len)
  docs = [rng.integers(3, 900, n).astype(np.uint16) for n in rng.integers(0, 5 * seq_len, 300)]
  docs += [np.full(seq_len - 1, 7, np.uint16)]  # exactly one full piece: a row of its own
  stats = packed.write(str(tmp_path / "x.npy"), iter(docs), seq_len, 1, 2, np.uint16,
                       block_tokens=block_tokens)
  rows = np.load(tmp_path / "x.npy")
  assert rows.shape == (stats["rows"], 4, seq_len) and rows.dtype == np.uint16
  assert stats["docs"] == len(docs) and stats["tokens"] == sum(len(d) + 1 for d in docs)
  batch = packed._to_batch(rows)
  assert sorted(_pieces([batch])) == sorted(_expected_pieces(docs, seq_len, 1, 2))
  for seg in batch["segment_ids"]:  # pieces 1..n in order, then padding
    n = seg.max()
    assert np.array_equal(np.unique(seg[seg > 0]), np.arange(1, n + 1))
    assert np.all(np.diff(np.where(seg == 0, n + 1, seg)) >= 0)
  np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
  assert stats["tokens"] / rows[:, 2].size > 0.85  # first-fit fills rows


def test_shuffle_is_a_new_permutation_every_epoch(monkeypatch):
  import grain
  for below in (packed.PERMUTE_BELOW, 0):  # a numpy permutation, and Grain's shuffle
    monkeypatch.setattr(packed, "PERMUTE_BELOW", below)
    ds = packed.shuffle(grain.MapDataset.range(50), seed=3).repeat(3)
    epochs = [list(ds[i * 50:(i + 1) * 50]) for i in range(3)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(50))
    assert list(packed.shuffle(grain.MapDataset.range(50), seed=3).repeat(3)) == sum(epochs, [])


# --- the pipeline on packed rows ---

@pytest.mark.parametrize("split, domain", [("train", "CommonCrawl"), ("validation", "Book")])
def test_an_epoch_has_the_pieces_of_packing_while_reading(corpus, tok, split, domain):
  # Same documents, cut the same way; only the grouping into rows and the order differ (rows are
  # packed once in file order and shuffled per epoch; reading packs a new document order).
  config = _config(corpus, mixture=f"{domain}:1")
  def epoch(cfg):
    return _pieces(pipeline.make_dataset(cfg, split, tok, batch_size=1, num_epochs=1))
  new, old = epoch(config), epoch(_config(corpus, mixture=f"{domain}:1", packed=False))
  assert len(new) > 30 and sorted(new) == sorted(old)


def test_batches_follow_the_contract_and_mixture(corpus, tok):
  _, b = corpus
  folder = packed.directory(b.data_dir, SEQ_LEN)
  domain_of = {}
  for domain in mixtures.DOMAINS:
    for row in np.load(os.path.join(folder, f"train_{domain}.npy")):
      domain_of[row.astype(np.int32).tobytes()] = domain
  tokens = collections.Counter()
  ds = pipeline.make_dataset(_config(corpus, mixture=MIXTURE), "train", tok, batch_size=16)
  for batch in itertools.islice(ds, 150):
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    assert all(v.shape == (16, SEQ_LEN) and v.dtype == np.int32 for v in batch.values())
    rows = np.stack([batch[k] for k in packed.FIELDS], axis=1)
    for row in rows:
      tokens[domain_of[row.tobytes()]] += int(np.count_nonzero(row[2]))
  total = sum(tokens.values())
  assert set(tokens) == set(mixtures.parse(MIXTURE))
  for domain, weight in mixtures.parse(MIXTURE).items():
    assert abs(tokens[domain] / total - weight) < 0.03, (domain, tokens[domain] / total)


def test_iterator_state_resumes_exact_next_batch(corpus, tok):
  # 40 batches of 8: past the end of the smaller domains' first epoch.
  assert_resumes_exactly(_config(corpus, mixture="DC-2"), tok, batch_size=8, skip=40)


def test_process_shards_cover_every_row_once(corpus, tok):
  _, b = corpus
  config = _config(corpus, mixture="Book:1")
  shards = [[r.tobytes() for r in pipeline.source(config, "train", tokenizer=tok, process_index=i,
                                                   process_count=3, num_epochs=1)]
            for i in range(3)]
  every = np.load(os.path.join(packed.directory(b.data_dir, SEQ_LEN), "train_Book.npy"))
  # The same multiset: every row once (the synthetic corpus repeats some rows verbatim).
  assert sorted(sum(shards, [])) == sorted(r.tobytes() for r in every)
  assert min(map(len, shards)) == len(every) // 3
  # A fixed data.shards gives the same global batches for one process and for two.
  config = _config(corpus, mixture=MIXTURE, shards=2)
  def global_batch(process_count):
    return np.concatenate([next(iter(pipeline.make_dataset(
        config, "train", tok, batch_size=8 // process_count, process_index=p,
        process_count=process_count)))["inputs"] for p in range(process_count)])
  np.testing.assert_array_equal(global_batch(1), global_batch(2))


def test_eval_per_domain_starts_over(corpus, tok):
  datasets = pipeline.eval_datasets(_config(corpus), tok, batch_size=4)
  assert list(datasets) == list(mixtures.DOMAINS)
  for ds in datasets.values():
    np.testing.assert_array_equal(next(iter(ds))["inputs"], next(iter(ds))["inputs"])


# --- bad input ---

def test_packed_file_of_another_seq_len_or_missing(corpus, tmp_path):
  _, b = corpus
  copy = packed.directory(str(tmp_path), SEQ_LEN)
  shutil.copytree(packed.directory(b.data_dir, SEQ_LEN), copy)
  other = np.zeros((3, 4, SEQ_LEN * 2), np.uint16)
  np.save(os.path.join(copy, "train_GitHub.npy"), other)
  with pytest.raises(ValueError, match=r"train_GitHub.npy have shape \(3, 4, 128\).*seq_len 64"):
    packed.domains(str(tmp_path), SEQ_LEN, "train")
  os.remove(os.path.join(copy, "train_GitHub.npy"))
  with pytest.raises(ValueError, match="train_GitHub.npy are missing.*prepare_data.py"):
    packed.domains(str(tmp_path), SEQ_LEN, "train")


def test_bad_configs(corpus, tok):
  with pytest.raises(ValueError, match="data.packed is for slimpajama:DIR sources.*'embedded'"):
    pipeline.make_dataset(data_config(SEQ_LEN, packed=True), "train", tok, batch_size=2)
  with pytest.raises(ValueError, match="data.pretokenize False"):
    pipeline.make_dataset(_config(corpus, pretokenize=False), "train", tok, batch_size=2)
  config = _config(corpus)
  config.data.augment.token_mask = 0.1
  with pytest.raises(ValueError, match="data.augment.*data.packed"):
    pipeline.make_dataset(config, "train", tok, batch_size=2)
  config = data_config(32, source=_config(corpus).data.source, cache_dir=corpus[0] / "tfds",
                       packed=True)  # seq_len 32 was never packed
  with pytest.raises(ValueError, match="no rows packed for seq_len 32.*prepare_data.py"):
    pipeline.make_dataset(config, "train", tok, batch_size=2, process_count=2)
