"""Data augmentation of the training split (`data.augment.*`), as Grain RandomMap transforms.

Each transform draws from the generator Grain gives it for one record (derived from `config.seed`
and the record's place in the stream), so a record's augmentation is the same on every run and
after a resume, and differs from epoch to epoch. All rates default to 0 (off); validation is never
augmented. Completions are never touched: on instruction examples (instruct.Example) only text
that is not a completion changes, and the Human:/Assistant:/System: markers stay where they are;
a pretraining document is all prompt.

Text, before tokenization:
  sentence_shuffle  probability that a text's sentences are put in a random order
  sentence_reverse  probability that a sentence's words are put in reverse order (the closing
                    punctuation stays at the end)
Tokens, after tokenization (rates per eligible token, drawn exclusively; eligible = prompt text
tokens, never bos, special pieces or completion tokens):
  token_delete      the token is dropped from the sequence
  token_replace     the input becomes a random ordinary piece
  token_mask        the input becomes <unk>
Replaced and masked tokens change the inputs only: a trained target keeps the true token, so the
model learns to continue correctly from a corrupted context.
"""

import dataclasses
import re

import grain
import numpy as np

from spjax.data import instruct
from spjax.data import tokenizer as tokenizer_lib

TEXT_FIELDS = ("sentence_shuffle", "sentence_reverse")
TOKEN_FIELDS = ("token_delete", "token_replace", "token_mask")
_MARKERS = re.compile(r"((?:^|\s)(?:Human|Assistant|System):\s?)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def check(aug) -> None:
  """ValueError naming a rate outside [0, 1], or token rates adding up to more than 1."""
  for field in TEXT_FIELDS + TOKEN_FIELDS:
    if not 0.0 <= aug[field] <= 1.0:
      raise ValueError(f"data.augment.{field}={aug[field]} must be a probability in [0, 1]")
  if sum(aug[f] for f in TOKEN_FIELDS) > 1.0:
    raise ValueError(f"data.augment.token_delete + token_replace + token_mask must be <= 1, got "
                     f"{sum(aug[f] for f in TOKEN_FIELDS)}")


def _each_prompt_text(doc, fn):
  """`fn` applied to every stretch of prompt text between role markers of a document or Example."""
  def on_text(text):
    return "".join(p if i % 2 else fn(p) for i, p in enumerate(_MARKERS.split(text)))
  if isinstance(doc, str):
    return on_text(doc)
  if isinstance(doc, instruct.Example):
    return dataclasses.replace(doc, parts=tuple(
        (on_text(p), c) if isinstance(p, str) and not c else (p, c) for p, c in doc.parts))
  raise ValueError("text augmentation (data.augment.sentence_*) needs text documents; these are "
                   "token ids (data.pretokenize): set the sentence rates to 0 or prepare the "
                   "source as text")


def _sentences(text: str, fn) -> str:
  """`fn(list of sentences) -> list`, keeping the text's leading and trailing whitespace."""
  core = text.strip()
  if not core:
    return text
  lead, trail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
  return lead + " ".join(fn(_SENTENCE_END.split(core))) + trail


class SentenceShuffle(grain.transforms.RandomMap):
  def __init__(self, p: float):
    self._p = p

  def random_map(self, doc, rng: np.random.Generator):
    def shuffle(sentences):
      return [sentences[i] for i in rng.permutation(len(sentences))]
    return _each_prompt_text(doc, lambda t: _sentences(t, shuffle) if rng.random() < self._p else t)


class SentenceReverse(grain.transforms.RandomMap):
  def __init__(self, p: float):
    self._p = p

  def random_map(self, doc, rng: np.random.Generator):
    def reverse(sentences):
      out = []
      for s in sentences:
        if rng.random() < self._p:
          body, end = (s[:-1], s[-1]) if s[-1] in ".!?" else (s, "")
          s = " ".join(reversed(body.split())) + end
        out.append(s)
      return out
    return _each_prompt_text(doc, lambda t: _sentences(t, reverse))


class TokenNoise(grain.transforms.RandomMap):
  """{"inputs", "targets"[, "loss_mask"][, "noisable"]} -> the same keys less "noisable".

  "noisable" [n] (from instruct.Tokenize) marks the inputs that may change; without it (a
  pretraining document) every input but the first (bos) may.
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, delete: float, replace: float,
               mask: float):
    self._rates = np.cumsum([delete, replace, mask])  # u below each bound: delete, replace, mask
    self._pieces = np.asarray(tokenizer.ordinary_ids(), np.int32)
    self._mask_id = tokenizer.unk_id

  def random_map(self, ex, rng: np.random.Generator):
    ex = dict(ex)
    tokens = np.concatenate([ex["inputs"], ex["targets"][-1:]])  # [n + 1]
    eligible = np.zeros(len(tokens), bool)
    eligible[:-1] = ex.pop("noisable") if "noisable" in ex else np.arange(len(tokens) - 1) > 0
    u = rng.random(len(tokens))
    delete = eligible & (u < self._rates[0])
    replace = eligible & (u >= self._rates[0]) & (u < self._rates[1])
    mask = eligible & (u >= self._rates[1]) & (u < self._rates[2])
    noisy = tokens.copy()
    noisy[replace] = rng.choice(self._pieces, int(replace.sum()))
    noisy[mask] = self._mask_id
    keep = ~delete
    out = {"inputs": noisy[keep][:-1], "targets": tokens[keep][1:]}
    if "loss_mask" in ex:  # the weights of tokens[1:]; a deleted token takes its weight along
      weights = np.concatenate([[0], ex["loss_mask"]])[keep]
      out["loss_mask"] = weights[1:].astype(np.int32)
    return out


def text(docs: grain.MapDataset, config) -> grain.MapDataset:
  """Documents with the sentence transforms of `data.augment` applied (those with rate > 0)."""
  aug = config.data.augment
  check(aug)
  for offset, (field, cls) in enumerate(zip(TEXT_FIELDS, (SentenceShuffle, SentenceReverse))):
    if aug[field] > 0:
      docs = docs.random_map(cls(aug[field]), seed=config.seed + 1 + offset)
  return docs


def token_noise_on(config) -> bool:
  return any(config.data.augment[f] > 0 for f in TOKEN_FIELDS)


def tokens(records: grain.MapDataset, config, tokenizer) -> grain.MapDataset:
  """Tokenized records with `data.augment`'s token noise applied, if any rate is > 0."""
  aug = config.data.augment
  if not token_noise_on(config):
    return records
  noise = TokenNoise(tokenizer, *(aug[f] for f in TOKEN_FIELDS))
  return records.random_map(noise, seed=config.seed + 3)
