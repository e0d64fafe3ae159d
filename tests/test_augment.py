"""Augmentation: deterministic per record and seed, at its rates, train split only, never on
completions."""

import itertools

import grain
import numpy as np
import pytest

from data_config import data_config
from spjax.data import augment, instruct, pipeline, tokenizer


@pytest.fixture(scope="module")
def tok():
  return tokenizer.load("")


def sentences_doc(i):
  return " ".join(f"Sentence {i} number {j} goes here." for j in range(5))


def run(transform, docs, seed):
  return list(grain.MapDataset.source(docs).random_map(transform, seed=seed))


def test_text_transforms_are_deterministic_per_record_and_seed():
  docs = [sentences_doc(i) for i in range(50)]
  for t in (augment.SentenceShuffle(0.5), augment.SentenceReverse(0.5)):
    a, b, c = run(t, docs, 0), run(t, docs, 0), run(t, docs, 1)
    assert a == b and a != c
    assert sum(x != d for x, d in zip(a, docs)) > 10


def test_sentence_rates_within_tolerance():
  docs = [sentences_doc(i) for i in range(1000)]
  shuffled = run(augment.SentenceShuffle(0.3), docs, 0)
  changed = np.mean([s != d for s, d in zip(shuffled, docs)])
  assert abs(changed - 0.3 * (1 - 1 / 120)) < 0.04  # 1/5! of shuffles leave the order as it was
  assert all(sorted(s.split()) == sorted(d.split()) for s, d in zip(shuffled, docs))
  reversed_ = run(augment.SentenceReverse(0.2), docs, 0)
  flips = [s != d for r, doc in zip(reversed_, docs)
           for s, d in zip(r.split(". "), doc.split(". "))]
  assert abs(np.mean(flips) - 0.2) < 0.03
  assert reversed_[0].endswith(".")
  one = augment.SentenceReverse(1.0).random_map("Say one thing now.", np.random.default_rng(0))
  assert one == "now thing one Say."


def test_token_noise_hits_its_rates_on_documents(tok):
  ids = np.asarray(tok.encode(" ".join(sentences_doc(i) for i in range(60))), np.int32)
  doc = {"inputs": np.concatenate([[tok.bos_id], ids]), "targets": np.concatenate([ids, [tok.eos_id]])}
  n = len(ids)
  assert n > 4000
  noise = augment.TokenNoise(tok, delete=0.1, replace=0.15, mask=0.05)
  out = noise.random_map(doc, np.random.default_rng(0))
  again = noise.random_map(doc, np.random.default_rng(0))
  assert all(np.array_equal(out[k], again[k]) for k in out)
  assert out["inputs"][0] == tok.bos_id
  assert abs((n - (len(out["inputs"]) - 1)) / n - 0.1) < 0.015  # deleted
  kept = len(out["inputs"]) - 1
  assert abs(np.mean(out["inputs"][1:] == tok.unk_id) - 0.05 / 0.9) < 0.015  # masked, of the kept
  # Targets are the kept true tokens; inputs differ from them where replaced or masked.
  true_inputs = np.concatenate([[tok.bos_id], out["targets"][:-1]])
  changed = np.mean(out["inputs"][1:] != true_inputs[1:])
  assert abs(changed - 0.2 / 0.9) < 0.02 and kept < n
  assert np.isin(out["inputs"], tok.ordinary_ids() + [tok.bos_id, tok.unk_id]).all()


def test_never_on_completions_or_markers(tok):
  row = {"messages": [{"role": "user", "content": "First ask. Then ask more. Last ask here."},
                      {"role": "assistant", "content": "Keep me. Exactly so."}]}
  ex = instruct.to_example(row, "chat", "x", "plain", tok)
  texts = {augment.SentenceShuffle(1.0).random_map(ex, np.random.default_rng(s)).parts[1][0]
           for s in range(20)}
  assert len(texts) > 1 and all(t.startswith(" Human: ") for t in texts)
  for s in range(20):
    out = augment.SentenceReverse(1.0).random_map(ex, np.random.default_rng(s))
    assert out.parts[3] == (" Keep me. Exactly so.", True) and out.parts[2] == (" Assistant:", False)
  tokenized = instruct.Tokenize(tok, 128, False, text_flags=True).map(ex)
  noise = augment.TokenNoise(tok, delete=0.3, replace=0.3, mask=0.3)
  for s in range(20):
    out = noise.random_map(tokenized, np.random.default_rng(s))
    assert "noisable" not in out
    trained = out["targets"][out["loss_mask"] == 1]
    np.testing.assert_array_equal(trained, tokenized["targets"][tokenized["loss_mask"] == 1])
    # The completion's tokens as inputs are untouched too.
    n = int(tokenized["loss_mask"].sum()) - 1
    np.testing.assert_array_equal(out["inputs"][-n:], tokenized["inputs"][-n:])


def test_only_the_training_split_is_augmented(tok):
  cfg = data_config(64, source="sft:embedded")
  cfg.data.augment.token_mask = 0.5
  train = next(iter(pipeline.make_dataset(cfg, "train", tok, batch_size=4)))
  real = train["segment_ids"] > 0  # <unk> is id 0, as padding is
  assert (train["inputs"][real] == tok.unk_id).mean() > 0.2
  assert not (train["targets"][real] == tok.unk_id).any()
  val = next(iter(pipeline.eval_datasets(cfg, tok, batch_size=4)["sft"]))
  assert not (val["inputs"][val["segment_ids"] > 0] == tok.unk_id).any()
  resumed = data_config(64, source="embedded")  # pretraining documents get it as well
  resumed.data.augment.update(token_replace=0.1, sentence_shuffle=0.5)
  batches = list(itertools.islice(pipeline.make_dataset(resumed, "train", tok, batch_size=4), 2))
  again = list(itertools.islice(pipeline.make_dataset(resumed, "train", tok, batch_size=4), 2))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


@pytest.mark.parametrize("field,value,needle", [
    ("token_mask", 1.5, r"data.augment.token_mask=1.5 must be a probability"),
    ("sentence_shuffle", -0.1, r"data.augment.sentence_shuffle=-0.1 must be a probability"),
    ("token_delete", 0.9, r"token_delete \+ token_replace \+ token_mask must be <= 1"),
])
def test_bad_rates_are_refused(tok, field, value, needle):
  cfg = data_config(64)
  cfg.data.augment.update({"token_replace": 0.2, field: value})
  with pytest.raises(ValueError, match=needle):
    pipeline.make_dataset(cfg, "train", tok, batch_size=4)
