"""Print completions of prompts from a trained spjax workdir or a Hugging Face checkpoint.

  spjax-generate --workdir=/tmp/run --prompt="def main(" --max_new_tokens=64
  spjax-generate --hf_dir=path/to/llama --prompt="The capital of France is" \
      --temperature=0.8 --top_k=40 --top_p=0.95

The model is placed on the local devices under a layout (the run's own by default) and decoded with
a KV cache in one compiled loop; all prompts go in one batch. A LoRA run's adapters are merged into
its base weights first (`spjax.convert.workdir.load`). Text goes through the run's SentencePiece
tokenizer, or for --hf_dir its tokenizer.model, else its HF tokenizer (needs `transformers`).
Generation stops at --max_new_tokens or the tokenizer's end-of-sequence token.

  spjax-generate --workdir=/tmp/sft --prompts_file=prompts.jsonl --output=out.jsonl

reads rows in the shapes of instruction data (spjax/data/instruct.py; .jsonl, .jsonl.zst or .json):
a "prompt" is used as written, "messages" are rendered with the chat template the run trained with
(its config.json's data.chat_template) and opened for the assistant's turn. Prompts go through the
model --batch_size at a time; each output line is the input row plus "completion", the generated
text alone (under chatml it also stops at <|im_end|>). This needs a SentencePiece tokenizer.
"""

import os
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "spjax run directory (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir; default the newest.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face directory: config.json, *.safetensors.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None,
                                    "Rows with \"prompt\" or \"messages\" (.jsonl/.jsonl.zst/.json).")
_OUTPUT = flags.DEFINE_string("output", None, "With --prompts_file: .jsonl of rows + completion.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "With --prompts_file: prompts per batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt, at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_LAYOUT = flags.DEFINE_string("layout", None, "Layout preset/rules; default the run's, or fsdp.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece .model to use instead.")


def load_tokenizer(path: str | None):
  """(encode: text -> ids with BOS, decode: ids -> text, end-of-sequence id or None)."""
  from spjax.data import tokenizer as tokenizer_lib
  if path is None and _HF_DIR.value and not os.path.exists(os.path.join(_HF_DIR.value,
                                                                        "tokenizer.model")):
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise ValueError(f"{_HF_DIR.value} has no tokenizer.model: pass --tokenizer or install "
                       "transformers (the [hf] extra) to read its HF tokenizer") from None
    try:
      tok = AutoTokenizer.from_pretrained(_HF_DIR.value)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot load the tokenizer of {_HF_DIR.value} ({e}); pass --tokenizer") from e
    return (tok.encode, lambda ids: tok.decode(ids, skip_special_tokens=True), tok.eos_token_id)
  if path is None and _HF_DIR.value:
    path = os.path.join(_HF_DIR.value, "tokenizer.model")
  tok = tokenizer_lib.load(path or "")
  bos = [tok.bos_id] if tok.bos_id >= 0 else []  # training documents start with BOS
  return (lambda text: bos + tok.encode(text), tok.decode, tok.eos_id if tok.eos_id >= 0 else None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_WORKDIR.value is None) == (_HF_DIR.value is None):
    raise app.UsageError("give exactly one of --workdir and --hf_dir")
  if (_PROMPT.value is None) == (_PROMPTS_FILE.value is None):
    raise app.UsageError("give exactly one of --prompt (repeatable) and --prompts_file")
  if (_PROMPTS_FILE.value is None) != (_OUTPUT.value is None):
    raise app.UsageError("--prompts_file and --output go together")
  if _BATCH_SIZE.value <= 0:
    raise app.UsageError(f"--batch_size must be positive, got {_BATCH_SIZE.value}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every array at INFO
  try:
    for line in generate():
      print(line, flush=True)
  except ValueError as e:
    print(f"generate: {e}", file=sys.stderr)
    sys.exit(2)


def generate():
  import jax
  import ml_collections
  from flax import nnx
  from spjax.convert import hf, workdir
  from spjax.infer import decode
  from spjax.model import model as model_lib
  from spjax.parallel import layouts, sharding

  config = None
  if _WORKDIR.value:  # the run's tokenizer and layout; mesh sizes fit the devices here
    config = ml_collections.ConfigDict(workdir.read_config(_WORKDIR.value))
  layout = layouts.parse(_LAYOUT.value or (config.layout if config else "fsdp"))
  zeros = {axis: 0 for axis in sharding.MESH_AXES}  # 0 = the layout's own sizes
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"ici": zeros, "dcn": dict(zeros)}), layout)
  tokenizer_path = _TOKENIZER.value or (config.data.tokenizer if config else None)
  sampling = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  if _PROMPTS_FILE.value:
    prompts = prompt_rows(config, tokenizer_path)  # reads and checks them before the model loads
  else:
    encode, decode_text, eos = load_tokenizer(tokenizer_path)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(layout.flax_rules()):
    if _WORKDIR.value:
      model, _ = workdir.load(_WORKDIR.value, _STEP.value)
    else:
      model, _ = hf.from_pretrained(_HF_DIR.value)
    model = model_lib.unrolled(model)  # the form decoding runs on; the scanned copy is dropped
    if _PROMPTS_FILE.value:
      yield from write_completions(model, prompts, sampling)
      return
    prompts = [encode(p) for p in _PROMPT.value]
    completions = decode.generate(model, prompts, max_new_tokens=_MAX_NEW.value,
                                  sampling=sampling, stop_tokens=[] if eos is None else [eos],
                                  seed=_SEED.value)
  for i, (prompt, ids) in enumerate(zip(_PROMPT.value, completions)):
    if i:
      yield "-" * 40
    yield prompt + decode_text(ids)


def prompt_rows(config, tokenizer_path):
  """(rows, their token ids, SentencePiece tokenizer, chat template) of --prompts_file."""
  from spjax.data import instruct
  from spjax.data import tokenizer as tokenizer_lib
  if tokenizer_path is None and _HF_DIR.value:
    tokenizer_path = os.path.join(_HF_DIR.value, "tokenizer.model")
    if not os.path.exists(tokenizer_path):
      raise ValueError(f"--prompts_file needs a SentencePiece tokenizer and {_HF_DIR.value} has no "
                       "tokenizer.model: pass --tokenizer")
  tok = tokenizer_lib.load(tokenizer_path or "")
  # The template the run trained with (config.json records it resolved); else the tokenizer's.
  template = instruct.resolve_template(
      config.data.get("chat_template", "auto") if config else "auto", tok)
  rows, ids = [], []
  for where, row in instruct.read_rows(_PROMPTS_FILE.value):
    if isinstance(row, Exception):
      raise ValueError(f"{where}: {row}")
    rows.append(row)
    ids.append(instruct.generation_prompt(row, template, tok, where))
  if not rows:
    raise ValueError(f"--prompts_file {_PROMPTS_FILE.value} has no rows")
  return rows, ids, tok, template


def write_completions(model, prompts, sampling):
  """Generates --batch_size rows at a time and writes them with their completions to --output."""
  import json
  from spjax.data import instruct
  from spjax.infer import decode
  rows, ids, tok, template = prompts
  stops = instruct.stop_tokens(template, tok)
  with open(_OUTPUT.value, "w") as out:
    for start in range(0, len(rows), _BATCH_SIZE.value):
      completions = decode.generate(model, ids[start:start + _BATCH_SIZE.value],
                                    max_new_tokens=_MAX_NEW.value, sampling=sampling,
                                    stop_tokens=stops, seed=_SEED.value + start)
      for row, c in zip(rows[start:start + _BATCH_SIZE.value], completions):
        out.write(json.dumps(dict(row, completion=tok.decode(c))) + "\n")
  yield f"wrote {len(rows)} rows with completions to {_OUTPUT.value}"


def run():
  app.run(main)


if __name__ == "__main__":
  run()
