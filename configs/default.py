"""Default experiment config: `--config=configs/default.py:<size>`.

Sizes are the rows of `spjax.model.model.SIZES` (tiny, 125m, 350m, 1b, 7b). Every field below is a key other
parts of spjax rely on; unknown keys given on the command line are an error (the config is locked).
"""

import ml_collections

from spjax.compress import prune
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
  c.plot_every_eval = False         # redraw WORKDIR/metrics.png at every eval (needs spjax[plot])
  c.eval_exact_match = 0            # sft: held-out prompts answered greedily after the last step,
                                    # scored as eval/exact_match (0 = off)
  c.checkpoint_every_steps = 100    # also saves after the last step and when preempted (SIGTERM)
  c.max_checkpoints_to_keep = 3     # the newest N checkpoints survive...
  c.keep_checkpoint_every_steps = 0  # ...plus every multiple of this step, for good (0 = none)
  c.nan_policy = "skip"             # non-finite loss/grads: "skip" the update (train/skipped_steps)
                                    # or "abort": save the last good state and exit with status 3
  c.run_name = ""                   # optional subdirectory of --workdir for this run
  c.init_from = ""                  # weights that start a new run (fine-tuning): a Hugging Face model dir,
                                    # or a spjax workdir (its newest checkpoint, or DIR@STEP); model.*
                                    # must describe it. Ignored once the run has a checkpoint.

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
  # Unembed and score this many positions at a time (a divisor of seq_len), never holding the
  # [B, T, V] float32 logits; costs a second vocabulary matmul forward. 0 = all at once.
  # A distillation run refuses it (an error) and chunks by distill.chunk_size instead.
  c.loss_chunk_size = 0

  # Pipeline parallelism, used when the layout maps `layers` to the `stage` mesh axis (pp, fsdp_pp).
  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.microbatches = 0       # microbatches per step through the stages, a multiple of the
                                    # stage count; 0 = one per stage. Bubble (S-1)/(M*R + S-1)
  c.pipeline.repeats = 1            # circular repeats R: each stage holds R slices of
                                    # num_layers / (stages * R) layers and each microbatch passes R times

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
  # slimpajama with pretokenize: read rows packed for seq_len when the data was prepared (a read is
  # one row, no per-document Python; spjax/data/packed.py). False: pack documents while reading.
  c.data.packed = False
  c.data.bad_records = "raise"      # bad input file or line: "raise" naming it, or "skip" and count
  # Document shards, each packed on its own (0 = one per process). A fixed number (a multiple of
  # the process count) gives the same global batches whatever the number of processes.
  c.data.shards = 0
  # Instruction data (data.source="sft:GLOB", spjax/data/instruct.py):
  c.data.eval_source = ""           # held-out rows from another sft:GLOB; "" = ~5% of data.source by row hash
  c.data.train_on_prompt = False    # False: train on completions only; True: prompt too (DeepSpeed-Chat step 1)
  c.data.chat_template = "auto"     # chat rows: "plain" (Human:/Assistant:), "chatml" (<|im_start|> pieces)
                                    # or "auto" (chatml when the tokenizer has those pieces)
  c.data.overlong = "truncate"      # example longer than seq_len: "truncate" its prompt's start, or "refuse"
  # Augmentation of the training split (spjax/data/augment.py); 0 = off. Never alters completions.
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.sentence_shuffle = 0.0  # probability a text's sentences are put in random order
  c.data.augment.sentence_reverse = 0.0  # probability a sentence's words are put in reverse order
  c.data.augment.token_delete = 0.0      # per prompt/document token: dropped
  c.data.augment.token_replace = 0.0     # per token: input replaced by a random piece
  c.data.augment.token_mask = 0.0        # per token: input replaced by <unk>

  c.model = model_lib.SIZES[arg].to_config()
  if arg in ("1b", "7b"):
    # Without remat the 1B asks for 21 GiB per v5e chip at batch 4 and the 7B for 160 GiB on v5p;
    # keeping only the projections' outputs fits (8.6 and 24.6 GiB, `tools/aot_tpu.py` with libtpu
    # 0.0.52, BENCHMARKS.md) and recomputes the least.
    c.model.remat_policy = "save_dots_no_batch"

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
  c.optimizer.decay_embeddings = True  # False: no weight decay on the token embedding table either
  c.optimizer.momentum = 0.9        # sgd only
  c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; 0 = off

  # Exponential moving average of the params (float32, sharded like them, saved in the checkpoint
  # as state/ema_params, evaluated as eval/ema/loss); 0 = off. ema <- d * ema + (1 - d) * params.
  c.ema_decay = 0.0

  # Magnitude pruning while training (spjax/compress/prune.py); off while sparsity is 0 and the
  # pattern unstructured. Masks live in the optimizer state, so checkpoints and layouts keep them.
  c.prune = ml_collections.ConfigDict()
  c.prune.sparsity = 0.0            # final fraction of zeros per matrix (unstructured); 0 = off
  c.prune.pattern = "unstructured"  # "unstructured" (by magnitude) or "N:M" such as "2:4" (sets
                                    # the sparsity to 1 - N/M; leave prune.sparsity at 0)
  c.prune.start_step = 0            # first update that prunes (N:M prunes only here)
  c.prune.end_step = 0              # the cubic schedule (Zhu & Gupta) reaches prune.sparsity here;
                                    # 0 = start_step (prune all at once)
  c.prune.every_steps = 10          # masks recomputed every this many updates in [start, end]
  c.prune.exclude = prune.DEFAULT_EXCLUDE  # "embed|norm|bias": regex on the param paths never
                                    # pruned (embeddings, norms, biases); 1-D params never are

  # Knowledge distillation (spjax/tune/distill.py): alpha * T^2 * KL(teacher_T || student_T) +
  # (1 - alpha) * CE, masked like the CE; train/kl and train/ce are logged.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""            # spjax workdir (newest checkpoint) or Hugging Face model dir of
                                    # the same vocabulary; frozen, run in the train step; "" = off
  c.distill.temperature = 1.0       # T: both distributions are softmax(logits / T)
  c.distill.alpha = 0.5             # weight of the KL term; 1 - alpha weighs the cross-entropy
  c.distill.top_k = 0               # teacher's k most likely tokens, renormalised; 0 = all of them
  c.distill.chunk_size = 512        # sequence positions whose logits exist at once (both models);
                                    # must divide seq_len if smaller; 0 = the whole sequence;
                                    # governs the run's eval loss too (loss_chunk_size must be 0)
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
