"""Instruction data (`data.source="sft:GLOB"`): rows -> templated parts -> tokens with a loss mask.

Files: `.jsonl` and `.jsonl.zst` (one JSON object a line) or `.json` (one list of objects). Each
file holds rows of one shape, detected from its first row:

  deepspeed_chat     {"prompt": " Human: ... Assistant:", "chosen": "...", "rejected": "..."}
                     (rejected is for a later preference step and is ignored)
  prompt_completion  {"prompt": "...", "completion": "..."}
  chat               {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

A prompt is used as written (a DeepSpeed-Chat prompt carries its own Human:/Assistant: markers); the
completion follows it directly and ends with the tokenizer's end-of-sequence token, which is trained,
so generation knows where to stop. Chat rows are rendered with `data.chat_template`:

  plain    "System: {system}\n" " Human: {user}" " Assistant:" " {assistant}" </s>   (DeepSpeed-Chat's
           markers; every assistant turn ends with the end-of-sequence token)
  chatml   <|im_start|>{role}\n{content}<|im_end|>\n per message, the markers as the tokenizer's own
           pieces; an assistant turn trains "{content}<|im_end|>"
  auto     chatml when the tokenizer has both pieces, else plain (config.json records the choice)

Every assistant turn is a completion; nothing else is. Loss mask: 1 on the targets of completion
tokens, 0 elsewhere; `data.train_on_prompt=True` trains every token (DeepSpeed-Chat step 1: only
padding is masked). The text of an example is tokenized in one piece, and a token is a completion
token when any byte of it is completion text, so the tokens are those of the whole string whatever
the mask. Examples are [bos] + tokens; one longer than `seq_len` + 1 tokens loses the start of its
prompt (counted and reported) or, with `data.overlong="refuse"`, stops the run naming its row.

Held-out rows: crc32 of the row's canonical JSON divisible by 20 (~5%; equal rows share a split), or
every row of `data.eval_source` (another sft: source) with all of `data.source` for training.
`sft:embedded` is the embedded instruction set (instruct_embedded.py).
"""

import dataclasses
import functools
import glob
import json
import os
import sys
import zlib

import grain
import numpy as np

from spjax.data import files
from spjax.data import tokenizer as tokenizer_lib

SHAPES = {"deepspeed_chat": ("prompt", "chosen"), "prompt_completion": ("prompt", "completion"),
          "chat": ("messages",)}
ROLES = ("system", "user", "assistant")
TEMPLATES = ("auto", "plain", "chatml")
OVERLONG = ("truncate", "refuse")
_CHATML = ("<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class Example:
  """One row, templated: text and token-id parts, each marked completion or not."""
  parts: tuple[tuple[str | int, bool], ...]  # (text or token id, is completion)
  where: str                                 # "file:line", for errors
  answer_at: int  # parts[:answer_at] is the prompt of the last completion (exact-match eval)

  def reference(self) -> str:
    """The last completion's text (what exact match compares a generation with)."""
    return "".join(p for p, _ in self.parts[self.answer_at:] if isinstance(p, str))


# ==================================================================================================
# Rows: reading files, telling their shape, checking their fields.
# ==================================================================================================

def read_rows(path: str):
  """(where, row) for every row of one file; DataError naming the file and line if unreadable."""
  if path.endswith(".json"):
    try:
      with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    except (OSError, ValueError) as e:
      raise files.DataError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(rows, list):
      raise files.DataError(f"{path}: a .json instruction file holds a list of rows, not a "
                            f"{type(rows).__name__}")
    yield from ((f"{path}: item {i + 1}", row) for i, row in enumerate(rows))
    return
  if not (path.endswith(".jsonl") or path.endswith(".jsonl.zst")):
    raise files.DataError(f"{path}: instruction files are .jsonl, .jsonl.zst or .json")
  try:
    for number, line in files.lines(path):
      if line.strip():
        try:
          yield f"{path}:{number}", json.loads(line)
        except ValueError as e:
          yield f"{path}:{number}", files.DataError(f"not a JSON line ({e})")
  except Exception as e:  # zstandard.ZstdError, OSError: the rest of the file is unreadable
    raise files.DataError(f"{path}: unreadable ({e})") from None


def detect_shape(row, where: str) -> str:
  if isinstance(row, dict):
    for shape in ("chat", "deepspeed_chat", "prompt_completion"):
      if all(k in row for k in SHAPES[shape]):
        return shape
  fields = sorted(row) if isinstance(row, dict) else type(row).__name__
  raise files.DataError(
      f"{where}: cannot tell the shape of this file from its first row (it has {fields}); rows "
      f"need \"prompt\" and \"chosen\" (DeepSpeed-Chat), \"prompt\" and \"completion\", or "
      f"\"messages\"")


def check_row(row, shape: str, where: str) -> None:
  """DataError naming the first missing or malformed field of a row of `shape`."""
  if not isinstance(row, dict):
    raise files.DataError(f"{where}: a row is a JSON object, not {type(row).__name__}")
  for field in SHAPES[shape]:
    if field not in row:
      raise files.DataError(f"{where}: missing field \"{field}\" (rows of this file are {shape} "
                            f"rows with {', '.join(SHAPES[shape])}, as its first row is)")
  if shape != "chat":
    for field in SHAPES[shape]:
      if not isinstance(row[field], str):
        raise files.DataError(f"{where}: field \"{field}\" is a {type(row[field]).__name__}, "
                              f"not a string")
    return
  messages = row["messages"]
  if not isinstance(messages, list) or not messages:
    raise files.DataError(f"{where}: field \"messages\" must be a non-empty list of "
                          f"{{\"role\", \"content\"}} objects")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      role = m.get("role") if isinstance(m, dict) else m
      raise files.DataError(f"{where}: messages[{i}] has role {role!r}; valid roles: "
                            f"{', '.join(ROLES)}")
    if not isinstance(m.get("content"), str):
      raise files.DataError(f"{where}: messages[{i}] has no string field \"content\"")
  if not any(m["role"] == "assistant" for m in messages):
    raise files.DataError(f"{where}: messages has no assistant turn, so nothing to train on")


# ==================================================================================================
# Templates: a row -> parts.
# ==================================================================================================

def resolve_template(name: str, tokenizer: tokenizer_lib.Tokenizer) -> str:
  """`data.chat_template` with "auto" decided by the tokenizer's pieces."""
  if name not in TEMPLATES:
    raise ValueError(f"unknown data.chat_template {name!r}; valid: {', '.join(TEMPLATES)}")
  has_chatml = all(tokenizer.piece_id(p) is not None for p in _CHATML)
  if name == "chatml" and not has_chatml:
    raise ValueError(f"data.chat_template='chatml' needs the pieces {' and '.join(_CHATML)}, "
                     f"which the tokenizer does not have; use 'plain' or 'auto'")
  return name if name != "auto" else ("chatml" if has_chatml else "plain")


def stop_tokens(template: str, tokenizer: tokenizer_lib.Tokenizer) -> list[int]:
  """Ids that end a completion: end-of-sequence, and <|im_end|> under chatml."""
  stops = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
  return stops + ([tokenizer.piece_id(_CHATML[1])] if template == "chatml" else [])


def _messages(messages, template: str, tokenizer, generation: bool) -> list[tuple[str | int, bool]]:
  """Parts of a conversation; `generation` appends the opening of the assistant's next turn."""
  eos = [(tokenizer.eos_id, True)] if tokenizer.eos_id >= 0 else []
  parts = []
  if template == "chatml":
    start, end = (tokenizer.piece_id(p) for p in _CHATML)
    for m in messages:
      parts += [(start, False), (f"{m['role']}\n", False)]
      done = m["role"] == "assistant"
      parts += [(m["content"], done), (end, done), ("\n", False)]
    return parts + ([(start, False), ("assistant\n", False)] if generation else [])
  for m in messages:
    if m["role"] == "system":
      parts.append((f"System: {m['content']}\n", False))
    elif m["role"] == "user":
      parts.append((f" Human: {m['content']}", False))
    else:
      parts += [(" Assistant:", False), (f" {m['content']}", True)] + eos
  return parts + ([(" Assistant:", False)] if generation else [])


def to_example(row, shape: str, where: str, template: str,
               tokenizer: tokenizer_lib.Tokenizer) -> Example:
  bos = [(tokenizer.bos_id, False)] if tokenizer.bos_id >= 0 else []
  if shape == "chat":
    parts = bos + _messages(row["messages"], template, tokenizer, generation=False)
  else:
    eos = [(tokenizer.eos_id, True)] if tokenizer.eos_id >= 0 else []
    parts = bos + [(row["prompt"], False), (row[SHAPES[shape][1]], True)] + eos
  # The last completion starts after the last prompt part that precedes a completion part.
  answer_at = max(i for i in range(1, len(parts)) if parts[i][1] and not parts[i - 1][1])
  return Example(tuple(parts), where, answer_at)


def generation_prompt(row, template: str, tokenizer: tokenizer_lib.Tokenizer, where: str):
  """Token ids to generate from for a row of a prompts file: its "prompt" as written, or its
  "messages" rendered with `template` and opened for the assistant's turn."""
  bos = [(tokenizer.bos_id, False)] if tokenizer.bos_id >= 0 else []
  if isinstance(row, dict) and isinstance(row.get("prompt"), str):
    return tokenize(bos + [(row["prompt"], False)], tokenizer)[0].tolist()
  if isinstance(row, dict) and "messages" in row:
    check_row(dict(row, messages=row["messages"] + [{"role": "assistant", "content": ""}]),
              "chat", where)
    parts = bos + _messages(row["messages"], template, tokenizer, generation=True)
    return tokenize(parts, tokenizer)[0].tolist()
  raise files.DataError(f"{where}: a prompt row needs a string field \"prompt\" or a field "
                        f"\"messages\"")


# ==================================================================================================
# Tokens: parts -> ids, completion flags, prompt-text flags; the Grain transform of the pipeline.
# ==================================================================================================

def tokenize(parts, tokenizer: tokenizer_lib.Tokenizer):
  """ids int32 [n], completion bool [n], text bool [n] (prompt text: what augmentation may alter).

  Consecutive text parts are tokenized as one string; a token is completion when any of its bytes
  is completion text (a zero-width token takes the flag of the byte it sits at).
  """
  ids, completion, text = [], [], []

  def flush(run):
    if not run:
      return
    joined = "".join(t for t, _ in run)
    flags = np.concatenate([np.full(len(t.encode("utf-8")), c, bool) for t, c in run] + [[False]])
    run_ids, spans = tokenizer.encode_with_offsets(joined)
    for i, (b, e) in zip(run_ids, spans):
      c = bool(flags[b:max(e, b + 1)].any())
      ids.append(i), completion.append(c), text.append(not c)
    run.clear()

  run = []
  for part, is_completion in parts:
    if isinstance(part, str):
      run.append((part, is_completion))
    else:
      flush(run)
      ids.append(part), completion.append(is_completion), text.append(False)
  flush(run)
  return np.asarray(ids, np.int32), np.asarray(completion, bool), np.asarray(text, bool)


def truncate(arrays, max_tokens: int, keep_first: bool):
  """Drops tokens after the first (bos, when `keep_first`) so at most `max_tokens` remain."""
  cut = len(arrays[0]) - max_tokens
  if cut <= 0:
    return arrays
  head = int(keep_first)
  return tuple(np.concatenate([a[:head], a[head + cut:]]) for a in arrays)


class Tokenize(grain.transforms.Map):
  """Example -> {"inputs", "targets", "loss_mask"} int32 [n <= seq_len], and with `text_flags`
  "noisable" bool [n]: inputs that are prompt text (augment.TokenNoise reads and drops it)."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, seq_len: int, train_on_prompt: bool,
               text_flags: bool = False):
    self._tok, self._seq_len, self._all = tokenizer, seq_len, train_on_prompt
    self._text_flags = text_flags

  def map(self, ex: Example) -> dict[str, np.ndarray]:
    ids, completion, text = truncate(tokenize(ex.parts, self._tok), self._seq_len + 1,
                                     keep_first=self._tok.bos_id >= 0)
    trained = np.ones_like(completion) if self._all else completion
    out = {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": trained[1:].astype(np.int32)}
    if self._text_flags:
      out["noisable"] = text[:-1]
    return out


# ==================================================================================================
# The source: files -> held-out split -> examples, checked for length.
# ==================================================================================================

@functools.lru_cache(maxsize=4)  # train and validation of one run read the files once
def _read(pattern: str, bad_records: str) -> tuple[tuple[str, str, object, bool], ...]:
  """(where, shape, row, held out) for every good row of the files matching `pattern`."""
  if pattern == "embedded":
    from spjax.data import instruct_embedded
    rows = [(f"sft:embedded row {i + 1}", r) for i, r in enumerate(instruct_embedded.rows())]
    return tuple((w, detect_shape(r, w), r, _held_out(r)) for w, r in rows)
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise ValueError(f"data.source sft:{pattern} matches no files")
  out, skipped = [], files.Skipped()
  for path in paths:
    shape, rows = None, read_rows(path)
    while True:
      try:
        where, row = next(rows)
      except StopIteration:
        break
      except files.DataError as e:  # the rest of the file cannot be read
        if bad_records == "raise":
          raise
        skipped.add(str(e), rest_of_file=True)
        break
      try:
        if isinstance(row, Exception):
          raise files.DataError(f"{where}: {row}")
        shape = shape or detect_shape(row, where)
        check_row(row, shape, where)
      except files.DataError as e:
        if bad_records == "raise":
          raise
        skipped.add(str(e))
        continue
      out.append((where, shape, row, _held_out(row)))
  if skipped:
    print(f"spjax: sft:{pattern}: {skipped}", file=sys.stderr, flush=True)
  return tuple(out)


def _held_out(row) -> bool:
  return zlib.crc32(json.dumps(row, sort_keys=True).encode()) % 20 == 0


def examples(config, split: str, tokenizer: tokenizer_lib.Tokenizer) -> list[Example]:
  """The examples of `split` ("train" / "validation") of `data.source`, checked against seq_len."""
  if split not in ("train", "validation"):
    raise ValueError(f"unknown split {split!r}; valid splits: train, validation")
  if config.data.overlong not in OVERLONG:
    raise ValueError(f"unknown data.overlong {config.data.overlong!r}; valid: "
                     f"{', '.join(OVERLONG)}")
  template = resolve_template(config.data.chat_template, tokenizer)
  source = config.data.source
  if config.data.eval_source:
    if not config.data.eval_source.startswith("sft:"):
      raise ValueError(f"data.eval_source {config.data.eval_source!r} must be an sft:GLOB source")
    source = config.data.eval_source if split == "validation" else source
    rows = [r for r in _read(source.removeprefix("sft:"), config.data.bad_records)]
  else:
    rows = [r for r in _read(source.removeprefix("sft:"), config.data.bad_records)
            if r[3] == (split == "validation")]
  if not rows:
    raise ValueError(f"data.source {source!r} has no {split} rows"
                     + ("; give held-out rows with data.eval_source=sft:GLOB"
                        if split == "validation" else ""))
  out = [to_example(row, shape, where, template, tokenizer) for where, shape, row, _ in rows]
  _check_lengths(source, split, tuple(out), tokenizer, config.seq_len, config.data.overlong)
  return out


@functools.lru_cache(maxsize=4)
def _check_lengths(source, split, exs, tokenizer, seq_len: int, overlong: str) -> None:
  """Refuses, or counts and reports, examples longer than seq_len + 1 tokens (bos included)."""
  long = [(ex.where, n) for ex in exs if (n := len(tokenize(ex.parts, tokenizer)[0])) > seq_len + 1]
  if long and overlong == "refuse":
    where, n = long[0]
    raise ValueError(f"{where}: the example is {n - 1} tokens, longer than seq_len={seq_len} "
                     f"({len(long)} {split} examples are); raise seq_len or set "
                     f"data.overlong='truncate' to cut their prompts")
  if long:
    print(f"spjax: {source}: {len(long)} of {len(exs)} {split} examples are longer than "
          f"seq_len={seq_len}; truncated from the prompt side (data.overlong='truncate')",
          file=sys.stderr, flush=True)
