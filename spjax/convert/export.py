"""Export a trained spjax checkpoint as a Hugging Face model directory.

  spjax-convert-hf --workdir=/tmp/run --out=/tmp/run_hf [--step=N]

A LoRA run is exported with its adapters merged into the kernels (W + A @ B * alpha / rank).
Writes OUT/config.json (LlamaForCausalLM; GPTNeoXForCausalLM for a NeoX-shaped model,
MixtralForCausalLM for a mixture of experts),
OUT/model.safetensors and OUT/tokenizer.model (the run's SentencePiece model), so that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` and `spjax-generate --hf_dir=OUT` load it.
The other direction needs no tool: `spjax.convert.hf.from_pretrained(hf_dir)` reads HF directories.
"""

import os
import shutil
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "spjax run directory (config.json, checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the Hugging Face model to.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every array at INFO
  from spjax.convert import hf, workdir
  from spjax.data import tokenizer as tokenizer_lib
  try:
    model, config = workdir.load(_WORKDIR.value, _STEP.value)
    tokenizer = tokenizer_lib.load(config.data.tokenizer)
    model_cfg = model.cfg
    # HF reads these for generation defaults; the ids are the ones training documents were framed by.
    extra = {"max_position_embeddings": config.seq_len, "bos_token_id": tokenizer.bos_id,
             "eos_token_id": tokenizer.eos_id}
    hf.save_pretrained(model, model_cfg, _OUT.value, extra_config=extra)
    shutil.copyfile(config.data.tokenizer or tokenizer_lib.EMBEDDED_MODEL,
                    os.path.join(_OUT.value, "tokenizer.model"))
  except ValueError as e:
    print(f"convert_hf: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"convert_hf: wrote {hf.family_of(model_cfg)} model "
        f"({model_cfg.num_params() / 1e6:.1f}M params) to {_OUT.value}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
