"""Model hyper-parameters: ModelConfig, its validation, and the named sizes.

Sizes (parameters, untied embeddings, vocab 32000 except tiny):

  name   d_model  layers  heads  kv_heads  head_dim  mlp_dim   params
  tiny       128       2      8         4        16      512    0.6M  (vocab 1024; seconds on CPU)
  125m       768      12     12        12        64     2048   0.13B  (GPT-3 Small width, SwiGLU)
  350m      1024      24     16        16        64     2816   0.37B  (GPT-3 Medium width, SwiGLU)
  1b        2048      16     16         8       128     8192   1.1B
  7b        4096      32     32        32       128    11008   6.7B   (llama2-7b)
"""

import dataclasses
import math

import jax
import ml_collections

from spjax.model import attention as attention_lib

_CP = jax.checkpoint_policies
# The matmul policies also keep what the splash kernel's backward reads (its output and log-sum-exp,
# named "attention"), so the fused attention is not run forward twice.
_KEEP_ATTENTION = _CP.save_only_these_names(attention_lib.RESIDUALS)


# The projections are named where they are computed (layers.adapted, moe, tune/lora): "proj/q"
# for q's output, "proj/q_lora" for its adapter's rank-r input, and so on. The matmul-saving
# policies choose by name, not by the shape of the dot: under the pipeline's stage vmap every
# matmul gains a batch dimension, and a policy keeping the dots without batch dimensions kept none.
# down's output is named but never kept: nothing in the backward pass reads it.
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def projection_name(kernel: str) -> str:
  """The checkpoint name of a kernel's product: "proj/q"; "proj/q_lora" for q's adapter input."""
  return "proj/" + kernel


def _names(kernels) -> tuple:  # the checkpoint names of `kernels`' products and adapter inputs
  return tuple(projection_name(k + lora) for k in kernels for lora in ("", "_lora"))


# o's output, a [B, T, D] per layer (1 GiB for the 1B at batch 8), is what sets the policies apart:
# left out, the backward pass redoes o's matmul (from the attention output it reads anyway) before
# the block's second norm. Kept, the 1B on v5e compiled faster (0.863 -> 0.832 s a step), the 7B
# on v5p slower (1.106 -> 1.140 s): BENCHMARKS.md, issue 17.
_PROJECTIONS_BUT_O = _names(k for k in PROJECTIONS if k != "o")
_PROJECTIONS = _names(PROJECTIONS)
_LOW_RANK = 128  # contractions shorter than this (one MXU pass) are not projections: see below


def _unless_low_rank(policy):
  """`policy`, but never an unbatched product contracting fewer than _LOW_RANK elements: a LoRA
  adapter's [B, T, r] x [r, *out] costs 2 r FLOPs per output, cheaper to redo from the saved
  [B, T, r] than to store; saved, it would double every adapted projection's stacked [B, T, out]
  activations. (Batched products, attention's, are left to `policy`; the named policies never
  save that product: only the adapter's input, "proj/<kernel>_lora", is named.)"""
  def saveable(prim, *args, **params):
    if prim is jax.lax.dot_general_p:
      (contract, _), (batch, _) = params["dimension_numbers"]
      if not batch and math.prod(args[0].shape[d] for d in contract) < _LOW_RANK:
        return False
    return policy(prim, *args, **params)
  return saveable


REMAT_POLICIES = {
    "none": None,  # keep every activation for the backward pass
    "full": _CP.nothing_saveable,  # recompute the whole block
    # keep matmul outputs (with batch dims: attention scores too), recompute the rest
    "save_dots": _unless_low_rank(_CP.save_from_both_policies(_CP.checkpoint_dots,
                                                              _KEEP_ATTENTION)),
    # keep the projections' outputs but o's and the fused attention's residuals; recompute einsum
    # attention from q, k and v
    "save_dots_no_batch": _CP.save_only_these_names(*_PROJECTIONS_BUT_O, attention_lib.RESIDUALS),
    # every projection's output, o's too (MaxText's "minimal"); the fused attention's forward kernel
    # runs again in the backward pass (its output, a [B, T, H, Dh] per layer, is not kept)
    "save_projections": _CP.save_only_these_names(*_PROJECTIONS),
    # both: every projection's output and the fused attention's (MaxText's "minimal_with_context")
    "save_projections_attention": _CP.save_only_these_names(*_PROJECTIONS, attention_lib.RESIDUALS),
}
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rotary_pct: float = 1.0        # fraction of each head's features that rotate (GPT-NeoX: 0.25)
  norm: str = "rmsnorm"          # rmsnorm (Llama) | layernorm (mean-centred, with bias: GPT-NeoX)
  norm_eps: float = 1e-5
  mlp_activation: str = "silu"   # silu | gelu (exact erf) | gelu_tanh
  gated_mlp: bool = True         # down(act(x @ gate) * (x @ up)) (SwiGLU); else down(act(x @ up))
  parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) (GPT-J/NeoX): one residual add
  attn_bias: bool = False        # biases on the q, k, v and output projections
  mlp_bias: bool = False         # biases on the MLP matrices
  dropout_rate: float = 0.0      # attention probabilities and residual branches; off in eval
  tie_embeddings: bool = False   # unembed with the transposed embedding table
  dtype: str = "bfloat16"        # compute dtype of matmuls and activations
  param_dtype: str = "float32"   # storage dtype of parameters (and optimizer moments)
  scan_layers: bool = True       # nnx.scan over a stacked layer axis: compile time independent of L
  remat_policy: str = "none"     # one of REMAT_POLICIES
  attention: str = "auto"        # xla (einsums, any backend) | splash (fused Pallas kernel, TPU) |
                                 # auto (program.build: splash on TPU where the run allows it,
                                 # else xla; a model built directly treats it as xla)
  # Mixture of experts (spjax/model/moe.py). 0 experts = a dense MLP in every layer.
  num_experts: int = 0           # experts per MoE layer; their weights carry the `expert` axis
  experts_per_token: int = 2     # top-k: experts each token goes to, weights renormalised over them
  capacity_factor: float = 0.0   # > 0: each expert takes ceil(factor * T * k / E) tokens per
                                 # sequence, the rest are dropped; 0 = dropless (ragged_dot)
  moe_every: int = 1             # layer i (from 0) is MoE when (i + 1) % moe_every == 0; must be
                                 # 1 with scan_layers (the scanned stack holds one kind of block)
  moe_lb_loss_weight: float = 0.01   # load-balance loss (Switch; 1.0 = balanced) in the objective
  moe_z_loss_weight: float = 0.001   # router z-loss (ST-MoE: mean logsumexp(logits)^2)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_pct)  # truncated, as GPT-NeoX does

  def to_config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(self))

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    model_cfg = cls(**dict(cfg))
    model_cfg.validate()
    return model_cfg

  def validate(self):
    """Raises ValueError naming the `model.*` field that cannot work."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                       f"model.num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
    if not 0.0 < self.rotary_pct <= 1.0:
      raise ValueError(f"model.rotary_pct must be in (0, 1], got {self.rotary_pct}")
    if self.rotary_dim < 2 or self.rotary_dim % 2:
      raise ValueError(f"model.head_dim * model.rotary_pct ({self.head_dim} * {self.rotary_pct}) "
                       f"must give an even number (>= 2) of rotary features, got {self.rotary_dim}")
    if self.norm not in NORMS:
      raise ValueError(f"model.norm {self.norm!r} is not one of {', '.join(NORMS)}")
    if self.mlp_activation not in ACTIVATIONS:
      raise ValueError(f"model.mlp_activation {self.mlp_activation!r} is not one of "
                       f"{', '.join(ACTIVATIONS)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"model.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy {self.remat_policy!r} is not one of "
                       f"{', '.join(REMAT_POLICIES)}")
    if self.attention not in attention_lib.IMPLS:
      raise ValueError(f"model.attention {self.attention!r} is not one of "
                       f"{', '.join(attention_lib.IMPLS)}")
    self._validate_moe()
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.{name} must be float32, bfloat16 or float16, "
                         f"got {getattr(self, name)!r}")

  def _validate_moe(self):
    if self.num_experts < 0:
      raise ValueError(f"model.num_experts must be >= 0 (0 = dense), got {self.num_experts}")
    if self.moe_every < 1:
      raise ValueError(f"model.moe_every must be >= 1, got {self.moe_every}")
    if self.num_experts == 0:
      return
    if not 1 <= self.experts_per_token <= self.num_experts:
      raise ValueError(f"model.experts_per_token must be in [1, model.num_experts = "
                       f"{self.num_experts}], got {self.experts_per_token}")
    if self.capacity_factor < 0:
      raise ValueError(f"model.capacity_factor must be >= 0 (0 = dropless), got "
                       f"{self.capacity_factor}")
    if self.moe_every > self.num_layers:
      raise ValueError(f"model.moe_every ({self.moe_every}) exceeds model.num_layers "
                       f"({self.num_layers}): no layer would be MoE")
    if self.scan_layers and self.moe_every != 1:
      raise ValueError(f"model.moe_every={self.moe_every} needs model.scan_layers=False: a "
                       "scanned stack repeats one block, so with scan every layer is MoE "
                       "(moe_every=1)")
    if self.mlp_bias:
      raise ValueError("model.mlp_bias is not supported with model.num_experts > 0 (experts "
                       "have no biases)")
    for name in ("moe_lb_loss_weight", "moe_z_loss_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")

  @property
  def num_moe_layers(self) -> int:
    return self.num_layers // self.moe_every if self.num_experts else 0

  def num_params(self, experts: int | None = None) -> int:
    """Every parameter; `experts` = how many experts of each MoE layer to count (default all)."""
    d, f = self.d_model, self.mlp_dim
    qo, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    attn = 2 * d * (qo + kv) + (2 * qo + 2 * kv + d if self.attn_bias else 0)
    matrices = 3 if self.gated_mlp else 2
    mlp = matrices * d * f + ((matrices - 1) * f + d if self.mlp_bias else 0)
    norm = 2 * d if self.norm == "layernorm" else d
    unembed = 0 if self.tie_embeddings else d * self.vocab_size
    experts = self.num_experts if experts is None else experts
    moe = self.num_moe_layers * ((experts - 1) * mlp + d * self.num_experts)  # + the router
    return self.vocab_size * d + self.num_layers * (attn + mlp + 2 * norm) + norm + unembed + moe

  def num_active_params(self) -> int:
    """Parameters a token uses: MoE layers count experts_per_token experts (and the router)."""
    return self.num_params(self.experts_per_token if self.num_experts else None)


SIZES = {
    "tiny": ModelConfig(vocab_size=1024, d_model=128, num_layers=2, num_heads=8, num_kv_heads=4,
                        head_dim=16, mlp_dim=512),
    "125m": ModelConfig(vocab_size=32000, d_model=768, num_layers=12, num_heads=12,
                        num_kv_heads=12, head_dim=64, mlp_dim=2048),
    "350m": ModelConfig(vocab_size=32000, d_model=1024, num_layers=24, num_heads=16,
                        num_kv_heads=16, head_dim=64, mlp_dim=2816),
    "1b": ModelConfig(vocab_size=32000, d_model=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                      head_dim=128, mlp_dim=8192),
    "7b": ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, mlp_dim=11008),
}
