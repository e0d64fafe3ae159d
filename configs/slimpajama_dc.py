"""SlimPajama-DC reproduction: `--config=configs/slimpajama_dc.py:DC-1[:DIR]` ... `DC-6[:DIR]`.

The six runs of Shen et al., "SlimPajama-DC: Understanding Data Combinations for LLM Training"
(arXiv 2309.10818): one 1.3B model trained on 330B tokens of each domain combination
(spjax/data/mixtures.py has the shares), evaluated per domain on SlimPajama's validation split.
DIR is SlimPajama-627B in its published layout (default `SlimPajama-627B`, the directory
`huggingface-cli download cerebras/SlimPajama-627B --repo-type=dataset --local-dir SlimPajama-627B`
makes); on a TPU VM fleet give a path every host reads (gs://...).

What follows the study:
- the architecture, from the released checkpoints' config.json (huggingface.co/MBZUAI-LLM/
  SlimPajama-DC): 24 layers, d_model 2048, 16 heads of 128, SwiGLU MLP of width 5461, LayerNorm
  (eps 1e-5), tied input/output embeddings, no dropout, sequence length 2048;
- 330B training tokens at 2048 sequences x 2048 tokens per step (78,679 steps); the global batch and
  the AdamW settings (b1 0.9, b2 0.95, weight decay 0.1) are our reading of the paper and were not
  re-checked against its text when this file was written;
- bfloat16 compute.
What differs, because spjax does not have the study's choice:
- position encoding: rotary (RoPE, theta 10000) instead of ALiBi;
- parameterization: standard, not muP (the checkpoints' embeddings_scale 14.6 / width_scale 0.2775
  are muP multipliers). The study's muP learning rate does not transfer, so the peak learning rate is
  Cerebras-GPT 1.3B's standard-parameterization 2e-4, with cosine (not linear) decay to 10%;
- vocabulary: the study uses GPT-NeoX's BPE (50277 tokens); spjax reads SentencePiece models, so
  train one on SlimPajama (tools/train_tokenizer.py) and pass --config.data.tokenizer=PATH. The
  embedding has 50304 rows (50277 rounded up to a multiple of 128, as GPT-NeoX pads it);
- the biases of the GPT-2-style blocks (attention and MLP) are kept; the hardware (TPU, not CS-2).

Global batch = per_device_batch_size x devices x grad_accum_steps. The defaults (4 x 8) give 2048 on
64 chips (v5p:4x4x4, v5e:8x8); `batch_for(chips)` gives the split for other slice sizes, e.g.
--config.grad_accum_steps=2 on v5e:16x16.
"""

import math

from configs import default
from spjax.data import mixtures

TOKENS = 330_000_000_000
SEQ_LEN = 2048
GLOBAL_BATCH = 2048  # sequences per optimizer step
NAMES = tuple(f"DC-{i}" for i in range(1, 7))


def batch_for(chips: int, per_device: int = 4) -> tuple[int, int]:
  """(per_device_batch_size, grad_accum_steps) that make GLOBAL_BATCH sequences on `chips`."""
  rows = GLOBAL_BATCH // chips if GLOBAL_BATCH % chips == 0 else 0
  if rows == 0:
    raise ValueError(f"the global batch of {GLOBAL_BATCH} sequences does not split over {chips} "
                     "chips; use a slice whose chip count divides it")
  per_device = math.gcd(rows, per_device)
  return per_device, rows // per_device


def get_config(arg: str = "DC-6"):
  name, _, data_dir = arg.partition(":")
  if name.upper() not in NAMES:
    raise ValueError(f"unknown SlimPajama-DC configuration {name!r} in "
                     f"--config=configs/slimpajama_dc.py:<name>[:DIR]; valid: {', '.join(NAMES)}")
  c = default.get_config("1b")
  c.model.update(vocab_size=50304, d_model=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                 head_dim=128, mlp_dim=5461, norm="layernorm", norm_eps=1e-5,
                 mlp_activation="silu", gated_mlp=True, attn_bias=True, mlp_bias=True,
                 dropout_rate=0.0, tie_embeddings=True, dtype="bfloat16",
                 remat_policy="save_dots_no_batch")
  c.seq_len = SEQ_LEN
  c.per_device_batch_size, c.grad_accum_steps = batch_for(64)
  c.num_train_steps = math.ceil(TOKENS / (GLOBAL_BATCH * SEQ_LEN))  # 78,679 steps, 330.0B tokens
  c.layout = "fsdp"  # the layout the TPU estimates (experiments/slimpajama_dc.py) pick for it
  c.data.source = f"slimpajama:{data_dir or 'SlimPajama-627B'}"
  c.data.mixture = name.upper()
  c.data.shards = 64  # fixed: the same global batches on any number of hosts that divides it
  c.eval_every_steps = 2000  # per-domain validation loss, ~4% of the run's time apart
  c.eval_batches = 8
  c.log_every_steps = 50
  c.checkpoint_every_steps = 2000
  c.keep_checkpoint_every_steps = 20_000
  c.optimizer.update(name="adamw", learning_rate=2e-4, warmup_steps=2000, end_lr_ratio=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)
  mixtures.parse(c.data.mixture)  # the preset exists
  return c
