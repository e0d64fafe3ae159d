"""Default experiment config: `--config=configs/default.py:<size>`.

Sizes are the rows of `spjax.model.model.SIZES` (tiny, 125m, 350m, 1b, 7b). Every field below is a key other
parts of spjax rely on; unknown keys given on the command line are an error (the config is locked).
"""

import ml_collections

from spjax.model import model as model_lib


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in model_lib.SIZES:
    raise ValueError(f"unknown size {arg!r} in --config=configs/default.py:<size>; "
                     f"valid sizes: {', '.join(model_lib.SIZES)}")
  c = ml_collections.ConfigDict()
  c.seed = 0                        # one seed for init, dropout (folded with the step) and data order
  c.num_train_steps = 200 if arg == "tiny" else 100_000
  c.log_every_steps = 10            # train metrics cadence (metrics.jsonl, TensorBoard, stdout)
  c.eval_every_steps = 100          # also evaluates after the last step
  c.eval_batches = 4                # batches of the held-out split per evaluation
  c.checkpoint_every_steps = 100    # also saves after the last step and when preempted (SIGTERM)
  c.max_checkpoints_to_keep = 3     # the newest N checkpoints survive...
  c.keep_checkpoint_every_steps = 0  # ...plus every multiple of this step, for good (0 = none)
  c.nan_policy = "skip"             # non-finite loss/grads: "skip" the update (train/skipped_steps)
                                    # or "abort": save the last good state and exit with status 3
  c.run_name = ""                   # optional subdirectory of --workdir for this run
  c.init_from = ""                  # Hugging Face model dir whose weights start a new run (fine-tuning);
                                    # model.* must describe it. Ignored once the run has a checkpoint.

  # Sharding: a preset name (spjax/parallel/layouts.py), a "logical:mesh,mesh;..." string, or a rules file.
  c.layout = "fsdp"
  # Mesh axis sizes. 0 = take the layout preset's size (or 1); -1 = all remaining devices (one per group).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.ici = ml_collections.ConfigDict({a: 0 for a in ("data", "fsdp", "tensor", "sequence",
                                                         "expert", "stage")})
  c.mesh.dcn = ml_collections.ConfigDict({a: 0 for a in ("data", "fsdp", "tensor", "sequence",
                                                         "expert", "stage")})

  # Batch: global batch = per_device_batch_size * devices * grad_accum_steps sequences of seq_len.
  c.per_device_batch_size = 2 if arg == "tiny" else 4
  c.seq_len = 128 if arg == "tiny" else 2048
  c.grad_accum_steps = 1            # microbatches per optimizer step (scanned, summed gradients)
  c.z_loss = 0.0                    # weight of log(Z)^2 (PaLM); keeps logits from drifting in bf16

  c.data = ml_collections.ConfigDict()
  # "embedded" (Python's own docs, shipped with every install), "slimpajama:DIR" (the published
  # layout, prepared once into cache_dir), "tfds:NAME" (prepared in array_record) or "files:GLOB"
  # (.jsonl, .jsonl.zst, text). See spjax/data/sources.py.
  c.data.source = "embedded"
  # SlimPajama domain token shares: "" = as published, "DC-1".."DC-6" (SlimPajama-DC), or
  # "CommonCrawl:0.7,GitHub:0.3". Must be "" for sources with one domain.
  c.data.mixture = ""
  c.data.tokenizer = ""             # SentencePiece .model path; "" = the tokenizer of the embedded corpus
  c.data.cache_dir = ""             # TFDS data_dir for prepared datasets; "" = ~/tensorflow_datasets
  c.data.pretokenize = True         # slimpajama: store token ids when preparing (False: keep text)
  c.data.bad_records = "raise"      # bad input file or line: "raise" naming it, or "skip" and count
  # Document shards, each packed on its own (0 = one per process). A fixed number (a multiple of
  # the process count) gives the same global batches whatever the number of processes.
  c.data.shards = 0

  c.model = model_lib.SIZES[arg].to_config()

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"        # adamw | adam | sgd | adafactor
  c.optimizer.learning_rate = 3e-3 if arg == "tiny" else 3e-4   # peak, reached after warmup
  c.optimizer.warmup_steps = 20 if arg == "tiny" else 2000
  c.optimizer.decay_steps = 0       # cosine decay length after warmup; 0 = until num_train_steps
  c.optimizer.end_lr_ratio = 0.1    # final learning rate / peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1    # decoupled; never applied to norm scales or biases
  c.optimizer.momentum = 0.9        # sgd only
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 = off

  # LoRA (spjax/tune/lora.py): only low-rank adapters beside the targeted kernels train; the base
  # weights (init_from's, else the seed's) stay as they are. Checkpoints hold the adapters only;
  # spjax-generate and spjax-convert-hf merge them into the kernels (W + A @ B * alpha / rank).
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0                   # r of adapters A [in, r], B [r, out]; 0 = off (all weights train)
  c.lora.alpha = 16.0               # adapters' output is scaled by alpha / rank
  c.lora.dropout = 0.0              # dropout on each adapter's input in training steps
  # Regexes (re.search) over kernel paths: blocks/attn/{q,k,v,o}, blocks/mlp/{gate,up,down}
  # (blocks/<i>/... when model.scan_layers=False); each must match at least one kernel.
  c.lora.targets = ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")
  # NEFTune (Jain et al. 2023): noise uniform in +-alpha / sqrt(seq_len * d_model) added to the
  # input embeddings in training steps only, for fine-tuning; 0 = off (the paper uses 5 to 15).
  c.neftune_alpha = 0.0

  c.peak_tflops_per_device = 0.0    # for train/mfu; 0 = look up the device kind (measured on CPU)
  return c
