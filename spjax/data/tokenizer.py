"""SentencePiece tokenizer: load one, or train one from an iterable of texts.

The shipped `embedded.model` (about 15 KB) is a 1024-piece BPE model with byte fallback, trained on
`embedded.documents("train")` by `python -m spjax.data.tokenizer`, which rewrites it. Byte fallback
makes every string encodable (an unseen character becomes its UTF-8 bytes); identity normalization
and kept whitespace make `decode(encode(text)) == text`, indentation and newlines included, which
matters for a corpus full of code.
"""

from collections.abc import Iterable, Iterator
import io
import os

import sentencepiece as spm

EMBEDDED_MODEL = os.path.join(os.path.dirname(__file__), "embedded.model")
MODEL_TYPES = ("bpe", "unigram")


class Tokenizer:
  """A loaded SentencePiece model; ids are plain Python ints."""

  def __init__(self, processor: spm.SentencePieceProcessor):
    self._sp = processor

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def ordinary_ids(self) -> list[int]:
    """Ids of the pieces text is made of: no control, unknown or byte-fallback pieces."""
    sp = self._sp
    return [i for i in range(sp.vocab_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]

  @property
  def model_proto(self) -> bytes:
    """The serialized model: what identifies this tokenizer (and rebuilds it in another process)."""
    return self._sp.serialized_model_proto()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each one's [begin, end) UTF-8 byte span in `text` (empty for a byte-fallback
    token before the last of its character, and for the dummy-prefix space)."""
    pieces = self._sp.encode_as_proto(text).pieces
    return [p.id for p in pieces], [(p.begin, p.end) for p in pieces]

  def piece_id(self, piece: str) -> int | None:
    """The id of a piece (a control or user-defined symbol such as "<|im_start|>"), or None."""
    i = self._sp.piece_to_id(piece)
    return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i


def load(path: str = "") -> Tokenizer:
  """Loads a SentencePiece `.model` file; "" = the tokenizer shipped for the embedded corpus."""
  path = path or EMBEDDED_MODEL
  try:
    with open(path, "rb") as f:
      return Tokenizer(spm.SentencePieceProcessor(model_proto=f.read()))
  except (OSError, RuntimeError) as e:  # RuntimeError: sentencepiece rejects the bytes
    raise ValueError(f"cannot load the SentencePiece tokenizer {path!r} (--config.data.tokenizer): "
                     f"{e}") from e


def _paragraphs(texts: Iterable[str]) -> Iterator[str]:
  # SentencePiece trains on bounded "sentences"; paragraphs (split at blank lines) keep the newlines
  # inside them, so pieces such as ":\n" can be learned.
  for text in texts:
    yield from (p for p in text.split("\n\n") if p)


def train(texts: Iterable[str], model_prefix: str, vocab_size: int, model_type: str = "bpe",
          byte_fallback: bool = True) -> str:
  """Trains a tokenizer on `texts` and writes `<model_prefix>.model`; returns that path."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"unknown model_type {model_type!r}; valid: {', '.join(MODEL_TYPES)}")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_paragraphs(texts), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=byte_fallback,
      normalization_rule_name="identity",  # no NFKC: decode must give back the exact text
      remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,  # indentation is text
      max_sentence_length=1 << 16,  # bytes; longer paragraphs (rare) are skipped by the trainer
      minloglevel=2)
  path = model_prefix + ".model"
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


if __name__ == "__main__":
  from spjax.data import embedded  # only needed to regenerate the shipped model
  print(train(embedded.documents("train"), EMBEDDED_MODEL.removesuffix(".model"), vocab_size=1024))
