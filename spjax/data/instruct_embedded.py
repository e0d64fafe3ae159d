"""The embedded instruction set (`data.source="sft:embedded"`): small tasks with checkable answers.

Generated, not stored: `rows()` builds the same NUM_ROWS rows on every run from a fixed seed. Each row
asks one of the TASKS about words drawn from Python's keywords and builtin names (the vocabulary of
the embedded corpus) or about small numbers; its answer follows from the question alone, so exact
match on held-out rows measures whether a model follows the instruction, not what it memorised.

Half the rows are chat rows ({"messages": [user, assistant]}), half DeepSpeed-Chat-style
prompt/completion rows (" Human: ... Assistant:", " answer"), which the plain chat template renders
identically, so both row paths are exercised and the model sees one format.
"""

import builtins
import functools
import keyword
import random

NUM_ROWS = 6000
_SEED = 1234


@functools.cache
def _words() -> tuple[str, ...]:
  names = set(keyword.kwlist) | {n for n in dir(builtins) if n.islower() and n.isalpha()}
  return tuple(sorted(n for n in names if 2 <= len(n) <= 6))


def _some(rng, k):
  return rng.sample(_words(), k)


def _repeat(rng):
  w = _some(rng, rng.randint(2, 3))
  return f"Repeat: {' '.join(w)}", " ".join(w)


def _reverse(rng):
  w = _some(rng, rng.randint(2, 3))
  return f"Reverse: {' '.join(w)}", " ".join(reversed(w))


def _first(rng):
  w = _some(rng, rng.randint(3, 5))
  return f"First word of: {' '.join(w)}", w[0]


def _last(rng):
  w = _some(rng, rng.randint(3, 5))
  return f"Last word of: {' '.join(w)}", w[-1]


def _add(rng):
  a, b = rng.randint(0, 9), rng.randint(0, 9)
  return f"What is {a} plus {b}?", str(a + b)


def _lookup(rng):
  keys = rng.sample("abcdefgh", 3)
  values = [rng.randint(0, 9) for _ in keys]
  k = rng.randrange(3)
  table = " ".join(f"{x}={v}" for x, v in zip(keys, values))
  return f"Given {table}, what is {keys[k]}?", str(values[k])


TASKS = {"repeat": _repeat, "reverse": _reverse, "first": _first, "last": _last, "add": _add,
         "lookup": _lookup}


@functools.cache
def rows() -> tuple[dict, ...]:
  rng = random.Random(_SEED)
  out = []
  for i in range(NUM_ROWS):
    question, answer = rng.choice(list(TASKS.values()))(rng)
    if i % 2:
      out.append({"prompt": f" Human: {question} Assistant:", "completion": f" {answer}"})
    else:
      out.append({"messages": [{"role": "user", "content": question},
                               {"role": "assistant", "content": answer}]})
  return tuple(out)
