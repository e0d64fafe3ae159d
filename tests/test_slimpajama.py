"""SlimPajama end to end on a small generated corpus: reading, preparing, mixing, packing, eval."""

import collections
import itertools
import json
import os
import re

import numpy as np
import pytest
import zstandard

from spjax.data import files
from spjax.data import mixtures
from spjax.data import pipeline
from spjax.data import sampling
from spjax.data import synthetic
from spjax.data import tokenizer as tokenizer_lib

from data_config import assert_resumes_exactly, data_config

SEQ_LEN = 64
MIXTURE = "CommonCrawl:0.4,C4:0.3,Book:0.2,GitHub:0.1"


def _config(source, cache_dir, **data):
  return data_config(SEQ_LEN, source=source, cache_dir=cache_dir, **data)


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The published layout, two files a split, and a third test file cut off mid-frame."""
  root = tmp_path_factory.mktemp("slimpajama")
  docs = synthetic.write(str(root / "DIR"), {"train": 1400, "validation": 140, "test": 70},
                         scale=0.05)
  cut = synthetic.documents(1500, scale=0.05, seed=99)  # several zstd blocks
  data = zstandard.ZstdCompressor().compress("".join(
      json.dumps({"text": t, "meta": {"redpajama_set_name": mixtures.DOMAINS[d]}}) + "\n"
      for d, t in cut).encode())
  bad = root / "DIR" / "test" / "chunk2" / "example_holdout_9.jsonl.zst"
  bad.parent.mkdir()
  bad.write_bytes(data[:len(data) * 2 // 3])
  docs["test"] += cut  # its first two thirds, give or take, are readable
  return root, docs, str(bad)


@pytest.fixture(scope="module")
def prepared(corpus, tok):
  """Prepared with token ids: stopped by the bad file, then resumed skipping its bad rest."""
  from spjax.data import slimpajama
  root, _, bad = corpus
  logs = []
  with pytest.raises(files.DataError, match=f"{re.escape(bad)}: unreadable after line .*truncated"):
    slimpajama.prepare(str(root / "DIR"), str(root / "tfds"), tok.model_proto, workers=1)
  b = slimpajama.prepare(str(root / "DIR"), str(root / "tfds"), tok.model_proto,
                         bad_records="skip", workers=1, log=logs.append)
  return b, logs


def _doc_pieces(docs, tok):
  """{first tokens of a piece: (domain, inputs, targets)} for every piece of every document."""
  index = {}
  for domain, text in docs:
    toks = np.array([tok.bos_id, *tok.encode(text), tok.eos_id], np.int32)
    inputs, targets = toks[:-1], toks[1:]
    for i in range(0, len(inputs), SEQ_LEN):
      piece = (domain, inputs[i:i + SEQ_LEN], targets[i:i + SEQ_LEN])
      index.setdefault(tuple(piece[1][:12]), []).append(piece)
  return index


def _segments(batch):
  for r, seg in enumerate(batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      (idx,) = np.nonzero(seg == s)
      yield batch["inputs"][r, idx], batch["targets"][r, idx], batch["positions"][r, idx]


def _domains_of_segment(index, inputs, targets) -> set[str]:
  """The domains of the document pieces this segment is; fails if it is no whole piece of one."""
  found = {domain for domain, want_in, want_tg in index.get(tuple(inputs[:12]), [])
           if np.array_equal(inputs, want_in) and np.array_equal(targets, want_tg)}
  assert found, f"segment {inputs[:12]}... is no whole piece of any one document"
  return found  # a short last piece ("\n" + eos) can be the end of documents of several domains


# --- reading ---

def _write(path, lines, compress=True):
  data = "".join(l + "\n" for l in lines).encode()
  path.write_bytes(zstandard.ZstdCompressor().compress(data) if compress else data)
  return str(path)


@pytest.mark.parametrize("line, problem", [
    ('{"text": "a", "meta": {"redpajama_set_name": "RedPajamaC4"}', "not a JSON line"),
    ('{"txt": "a", "meta": {"redpajama_set_name": "RedPajamaC4"}}', 'no string field "text"'),
    ('{"text": "a"}', "meta.redpajama_set_name is None"),
    ('{"text": "a", "meta": {"redpajama_set_name": "Reddit"}}',
     "meta.redpajama_set_name is 'Reddit', not"),
])
def test_bad_line_names_file_and_line(tmp_path, line, problem):
  good = '{"text": "fine", "meta": {"redpajama_set_name": "RedPajamaGithub"}}'
  path = _write(tmp_path / "x.jsonl.zst", [good, line, good])
  with pytest.raises(files.DataError, match=f"{re.escape(path)}:2: {problem}"):
    list(files.records(path, domains=mixtures.DOMAIN_OF_SET_NAME))
  skipped = files.Skipped()
  got = list(files.records(path, bad_records="skip", skipped=skipped,
                           domains=mixtures.DOMAIN_OF_SET_NAME))
  assert [(n, t, d) for n, t, d in got] == [(1, "fine", "GitHub"), (3, "fine", "GitHub")]
  assert (skipped.lines, skipped.files) == (1, 0) and f"{path}:2" in str(skipped)


def test_corrupt_and_truncated_files(tmp_path):
  lines = [json.dumps({"text": f"document {i} " * 50}) for i in range(2000)]
  data = zstandard.ZstdCompressor().compress("".join(l + "\n" for l in lines).encode())
  (tmp_path / "cut.jsonl.zst").write_bytes(data[:len(data) // 2])
  (tmp_path / "bad.jsonl.zst").write_bytes(data[:100] + b"\0" * 64 + data[164:])
  second_frame = zstandard.ZstdCompressor().compress(b'{"text": "x"}\n')
  (tmp_path / "two.jsonl.zst").write_bytes(data + second_frame)
  for name, why in [("cut", "truncated"), ("bad", "")]:
    path = str(tmp_path / f"{name}.jsonl.zst")
    with pytest.raises(files.DataError,
                       match=f"{re.escape(path)}: unreadable after line \\d+.*{why}"):
      list(files.records(path))
    skipped = files.Skipped()
    kept = list(files.records(path, bad_records="skip", skipped=skipped))
    assert skipped.files == 1 and len(kept) < 2000
  assert len(list(files.records(str(tmp_path / "two.jsonl.zst")))) == 2001  # frames in sequence


# --- preparing ---

def test_prepare_resumes_and_counts_skipped(prepared, corpus):
  b, logs = prepared
  _, docs, bad = corpus
  assert "7 files, 6 already done" in logs[0]  # the good files were not read again
  skipped = b.info.metadata["skipped"]
  assert skipped["files"] == 1 and bad in skipped["first"] and "skipped" in logs[-1]
  splits = b.info.metadata["splits"]
  assert set(splits) == {f"{s}_{d}" for s in ("train", "validation", "test")
                         for d in mixtures.DOMAINS}
  assert sum(v["docs"] for k, v in splits.items() if k.startswith("validation")) == 140
  assert sum(v["docs"] for k, v in splits.items() if k.startswith("train")) == 1400
  assert 70 < sum(v["docs"] for k, v in splits.items() if k.startswith("test")) < 70 + 1500
  assert not os.path.exists(b.work_dir)  # the work files are gone once the splits are written


# --- pipeline ---

def test_mixture_proportions_and_no_cross_document_segments(prepared, corpus, tok):
  config = _config(f"slimpajama:{corpus[0] / 'DIR'}", corpus[0] / "tfds", mixture=MIXTURE)
  index = _doc_pieces(corpus[1]["train"], tok)
  tokens = collections.Counter()
  for batch in itertools.islice(pipeline.make_dataset(config, "train", tok, batch_size=16), 200):
    for inputs, targets, positions in _segments(batch):
      np.testing.assert_array_equal(positions, np.arange(len(inputs)))
      domains = _domains_of_segment(index, inputs, targets)
      tokens[domains.pop() if len(domains) == 1 else "?"] += len(inputs)
  total = sum(tokens.values())
  assert tokens.pop("?", 0) / total < 0.01
  assert set(tokens) == set(mixtures.parse(MIXTURE))
  for domain, weight in mixtures.parse(MIXTURE).items():
    assert abs(tokens[domain] / total - weight) < 0.03, (domain, tokens[domain] / total)


def test_text_source_packs_the_same_documents(prepared, corpus, tok):
  # Kept as text, tokenized on the fly: validation pieces are whole pieces of one document each.
  config = _config(f"slimpajama:{corpus[0] / 'DIR'}", corpus[0] / "tfds", pretokenize=False,
                   bad_records="skip")
  index = _doc_pieces(corpus[1]["validation"], tok)
  ds = pipeline.make_dataset(config, "validation", tok, batch_size=8)
  batches = list(itertools.islice(ds, 5))
  domains = set().union(*(_domains_of_segment(index, i, t) for b in batches
                          for i, t, _ in _segments(b)))
  assert len(domains) > 3


def test_process_shards_disjoint_and_cover(prepared, corpus, tok):
  config = _config(f"slimpajama:{corpus[0] / 'DIR'}", corpus[0] / "tfds", mixture="Book:1")
  shards = [[tuple(d) for d in pipeline.source(config, "validation", tokenizer=tok,
                                               process_index=i, process_count=3, num_epochs=1)]
            for i in range(3)]
  everything = [tuple(tok.encode(t)) for d, t in corpus[1]["validation"] if d == "Book"]
  assert sorted(sum(shards, [])) == sorted(everything)
  assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])


def test_iterator_state_resumes_exact_next_batch(prepared, corpus, tok):
  config = _config(f"slimpajama:{corpus[0] / 'DIR'}", corpus[0] / "tfds", mixture="DC-2")
  assert_resumes_exactly(config, tok, batch_size=8, skip=30)


def test_eval_per_domain(prepared, corpus, tok):
  config = _config(f"slimpajama:{corpus[0] / 'DIR'}", corpus[0] / "tfds", mixture="DC-3")
  datasets = pipeline.eval_datasets(config, tok, batch_size=4, process_index=1, process_count=2)
  assert list(datasets) == list(mixtures.DOMAINS)  # all domains, also those DC-3 leaves out
  index = _doc_pieces(corpus[1]["validation"], tok)
  for domain, ds in datasets.items():
    first = next(iter(ds))
    assert first["inputs"].shape == (4, SEQ_LEN)
    assert all(domain in _domains_of_segment(index, i, t) for i, t, _ in _segments(first))
    np.testing.assert_array_equal(next(iter(ds))["inputs"], first["inputs"])  # starts over
  weights = pipeline.eval_weights(config, tok)
  assert weights == pytest.approx({"CommonCrawl": 250 / 330, "GitHub": 80 / 330})  # DC-3


@pytest.mark.parametrize("mixture, error", [
    ("CommonCrawl:1,Reddit:1", "bad data.mixture.*'Reddit:1'"),
    ("GitHub:-1", "bad data.mixture"),
    ("C4:0", "every domain weight 0"),
    ("DC-7", "bad data.mixture"),
])
def test_bad_mixtures(mixture, error):
  with pytest.raises(ValueError, match=error):
    mixtures.parse(mixture)


def test_presets_are_shares():
  for name, preset in mixtures.PRESETS.items():
    assert set(preset) <= set(mixtures.DOMAINS)
    total = 330 if name in ("dc-1", "dc-2", "dc-3", "dc-4", "dc-5") else 100  # billions | percent
    assert sum(preset.values()) == pytest.approx(total, abs=0.05), name
  assert mixtures.parse("") == mixtures.parse("slimpajama") == mixtures.parse("dc-6")


def test_mixture_needs_domains_the_data_has(tmp_path, tok):
  root = tmp_path / "DIR"
  synthetic.write(str(root), {"train": 40, "validation": 20}, scale=0.02,
                  domains=("CommonCrawl", "C4"))
  config = _config(f"slimpajama:{root}", tmp_path / "tfds", mixture="DC-2")
  with pytest.raises(ValueError, match="not prepared.*prepare_data"):
    pipeline.make_dataset(config, "train", tok, batch_size=2, process_count=2)
  with pytest.raises(ValueError, match="weighs GitHub.*no train documents of it; it has "
                                       "CommonCrawl, C4"):
    pipeline.make_dataset(config, "train", tok, batch_size=2)
  with pytest.raises(ValueError, match="data.mixture 'DC-2' is for sources with domains"):
    pipeline.make_dataset(_config("embedded", "", mixture="DC-2"), "train", tok, batch_size=2)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    pipeline.make_dataset(_config(f"slimpajama:{root}", tmp_path / "tfds"), "dev", tok,
                          batch_size=2)


def test_missing_layout(tmp_path, tok):
  (tmp_path / "train").mkdir()
  with pytest.raises(ValueError, match="no SlimPajama files for split train, validation.*"
                                       "published layout"):
    pipeline.make_dataset(_config(f"slimpajama:{tmp_path}", tmp_path / "tfds"), "train", tok,
                          batch_size=2)


# --- tokenizer sample ---

def test_tokenizer_sample_follows_mixture(corpus, tmp_path):
  config = _config(f"slimpajama:{corpus[0] / 'DIR'}", "", mixture="DC-3", bad_records="skip")
  sample = list(sampling.texts(config, 20_000))
  chars = collections.Counter()
  for text in sample:
    chars[text.split(":", 1)[0]] += len(text)  # synthetic lines start with their domain
  assert set(chars) == {"CommonCrawl", "GitHub"}
  assert abs(chars["GitHub"] / sum(chars.values()) - 0.242) < 0.05
  path = tokenizer_lib.train(sample, str(tmp_path / "sp"), vocab_size=500, model_type="unigram")
  assert tokenizer_lib.load(path).vocab_size == 500
