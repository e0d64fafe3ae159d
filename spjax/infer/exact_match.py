"""Exact match on held-out instruction rows: greedy completions of their prompts vs their answers.

For each example the prompt is everything before its last completion (a chat row's earlier turns
included); the model's greedy completion, cut at a stop token (end-of-sequence, or <|im_end|> under
chatml), must equal the reference answer once surrounding whitespace is stripped.
"""

from collections.abc import Sequence

from flax import nnx

from spjax.data import instruct
from spjax.data import tokenizer as tokenizer_lib
from spjax.infer import decode
from spjax.model import model as model_lib


def exact_match(model: model_lib.Transformer, exs: Sequence[instruct.Example],
                tokenizer: tokenizer_lib.Tokenizer, template: str, *, max_prompt_tokens: int,
                batch_size: int) -> tuple[float, list[str]]:
  """(fraction of `exs` answered exactly, the completions), greedy, `batch_size` prompts at a time.

  Prompts longer than `max_prompt_tokens` keep their first token (bos) and their end.
  """
  if not exs:
    raise ValueError("exact match needs at least one example")
  model = model_lib.unrolled(model)  # what decoding runs on; converted once for all batches
  prompts, references = [], []
  for ex in exs:
    ids, _, _ = instruct.tokenize(ex.parts[:ex.answer_at], tokenizer)
    prompts.append(instruct.truncate((ids,), max_prompt_tokens, tokenizer.bos_id >= 0)[0].tolist())
    references.append(ex.reference().strip())
  # Room for the longest reference and its stop token.
  max_new = max(len(tokenizer.encode(r)) for r in references) + 2
  stops = instruct.stop_tokens(template, tokenizer)
  texts = []
  for start in range(0, len(prompts), batch_size):
    outs = decode.generate(model, prompts[start:start + batch_size], max_new_tokens=max_new,
                           stop_tokens=stops)
    texts += [tokenizer.decode(o) for o in outs]
  hits = sum(t.strip() == r for t, r in zip(texts, references))
  return hits / len(exs), texts


def for_params(graphdef: nnx.GraphDef, params, *args, **kwargs):
  """exact_match of the model a train state's params make."""
  return exact_match(nnx.merge(graphdef, params), *args, **kwargs)


def held_out(config, tokenizer: tokenizer_lib.Tokenizer, process_count: int = 1):
  """The first `config.eval_exact_match` validation examples of an sft: source ([] when 0)."""
  n = config.eval_exact_match
  if n < 0:
    raise ValueError(f"config.eval_exact_match must be >= 0, got {n}")
  if not n:
    return []
  if not config.data.source.startswith("sft:"):
    raise ValueError(f"config.eval_exact_match={n} needs instruction data (data.source=sft:...), "
                     f"not {config.data.source!r}; set it to 0")
  if process_count > 1:
    raise ValueError(f"config.eval_exact_match={n} runs in one process; this run has "
                     f"{process_count}: set it to 0 and evaluate with spjax-generate --prompts_file")
  return instruct.examples(config, "validation", tokenizer)[:n]
