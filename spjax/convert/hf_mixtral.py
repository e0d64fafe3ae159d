"""Hugging Face Mixtral (MixtralForCausalLM) <-> spjax mixture-of-experts models: what
spjax/convert/hf.py adds to its Llama mapping for this family.

A Mixtral layer is a Llama layer (no biases) whose MLP is `block_sparse_moe`: a router `gate`
[E, D] and E SwiGLU experts, w1 (gate) and w3 (up) [F, D], w2 (down) [D, F]. spjax holds one
tensor per kind with the experts stacked on the `expert` axis (gate/up [E, D, F], down [E, F, D]),
so importing stacks each layer's E tensors into one `...experts.w1` [E, out, in] (a name no
checkpoint has) and exporting splits them again, as hf.py does with GPT-NeoX's fused qkv.

Routing is the same computation on both sides: softmax over all E router logits in fp32, top-k,
the k weights renormalised to sum to 1 (spjax.model.moe.MoE.route). HF runs every token through
its k experts: spjax's dropless path, so imports set model.capacity_factor=0.

Load balance: HF's loss (load_balancing_loss_func) is E * sum_e c_e * P_e, c_e the assignments
expert e got per token (summing to k); spjax's `lb_loss` takes the share of assignments (summing
to 1), so per layer HF's value is k times spjax's and router_aux_loss_coef becomes
model.moe_lb_loss_weight = coef * k. (HF pools the layers' counts before the product, spjax
averages the layers' products: equal for one layer, close for more.) Mixtral trains without a
router z-loss: imports set model.moe_z_loss_weight=0.
"""

import dataclasses
import re

import numpy as np

from spjax.model.config import ModelConfig

# spjax param (under blocks/) -> (HF tensor name in a layer, kind in hf._KINDS)
LAYER = {
    "mlp/router": ("block_sparse_moe.gate.weight", "linear"),  # [E, D] <-> [D, E]
    "mlp/gate": ("block_sparse_moe.experts.w1", "experts"),  # [E, F, D] <-> [E, D, F]
    "mlp/up": ("block_sparse_moe.experts.w3", "experts"),
    "mlp/down": ("block_sparse_moe.experts.w2", "experts"),  # [E, D, F] <-> [E, F, D]
}
_PER_EXPERT = re.compile(r"(.*\.)block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_STACKED = re.compile(r"(.*\.experts\.)(w[123])$")
# transformers >= 5 holds the experts fused in memory (state_dict() names):
# mlp.experts.gate_up_proj [E, 2F, D] (w1 rows, then w3 rows), mlp.experts.down_proj [E, D, F].
_FUSED = re.compile(r"(.*\.)mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def config_from_hf(hf: dict, dense: ModelConfig) -> ModelConfig:
  """`dense`, the Llama reading of a Mixtral config.json, made the mixture of experts it is."""
  window, longest = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096 * 32)
  if window is not None and window < longest:
    raise ValueError(f"sliding_window={window} is smaller than max_position_embeddings={longest}: "
                     "spjax attends over the whole causal context and has no sliding window, so "
                     f"sequences longer than {window} would differ; set sliding_window to null "
                     f"(or max_position_embeddings to at most {window}) in config.json to run "
                     "sequences of at most that length")
  if hf.get("router_jitter_noise", 0.0):
    raise ValueError(f"router_jitter_noise={hf['router_jitter_noise']} is not supported: spjax's "
                     "router has no jitter noise (it only changes HF training); set it to 0.0 in "
                     "config.json")
  k = hf.get("num_experts_per_tok", 2)
  return dataclasses.replace(
      dense, num_experts=hf.get("num_local_experts", 8), experts_per_token=k, moe_every=1,
      capacity_factor=0.0, attn_bias=False, mlp_bias=False,
      moe_lb_loss_weight=hf.get("router_aux_loss_coef", 0.001) * k, moe_z_loss_weight=0.0)


def check(cfg: ModelConfig) -> None:
  """Raises ValueError unless MixtralForCausalLM computes what this MoE config does."""
  needs = {"norm": "rmsnorm", "gated_mlp": True, "parallel_residual": False, "rotary_pct": 1.0,
           "attn_bias": False, "moe_every": 1}
  wrong = [f"model.{name}={want!r} (config has {getattr(cfg, name)!r})"
           for name, want in needs.items() if getattr(cfg, name) != want]
  if wrong:
    raise ValueError("no Hugging Face architecture matches this mixture-of-experts model; "
                     "MixtralForCausalLM needs " + ", ".join(wrong))


def config_to_hf(cfg: ModelConfig) -> dict:
  """The Mixtral entries of config.json, on top of the Llama ones."""
  return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
          "router_aux_loss_coef": cfg.moe_lb_loss_weight / cfg.experts_per_token,
          "router_jitter_noise": 0.0, "sliding_window": None, "output_router_logits": False}


def stack_experts(tensors: dict, num_experts: int, source: str) -> dict:
  """HF Mixtral tensors -> the same with each layer's experts stacked: `...experts.w{1,2,3}`
  [E, out, in]. Reads the per-expert layout of checkpoints (`...experts.{e}.w1.weight` [out, in])
  and the fused one of a transformers >= 5 state_dict()."""
  out, per_expert = {}, {}
  for name, w in tensors.items():
    if m := _PER_EXPERT.match(name):
      per_expert.setdefault((m[1], m[3]), {})[int(m[2])] = w
    elif m := _FUSED.match(name):
      moe = m[1] + "block_sparse_moe."
      if m[2] == "gate.weight":
        out[moe + "gate.weight"] = w
      elif m[2] == "experts.down_proj":
        out[moe + "experts.w2"] = w
      else:
        out[moe + "experts.w1"], out[moe + "experts.w3"] = np.split(np.asarray(w), 2, axis=1)
    else:
      out[name] = w
  for (prefix, kind), experts in per_expert.items():
    if sorted(experts) != list(range(num_experts)):
      missing = sorted(set(range(num_experts)) - set(experts))
      raise ValueError(f"{source}: the experts of {prefix}block_sparse_moe are "
                       f"{sorted(experts)}, config.json's num_local_experts={num_experts} needs "
                       f"0..{num_experts - 1}"
                       + (f" (tensor ...experts.{missing[0]}.{kind}.weight is missing)"
                          if missing else ""))
    out[f"{prefix}block_sparse_moe.experts.{kind}"] = np.stack(
        [np.asarray(experts[e]) for e in range(num_experts)])
  return out


def unstack_experts(tensors: dict) -> dict:
  """The inverse of `stack_experts` for its per-expert layout, the one Hub checkpoints use."""
  out = {}
  for name, w in tensors.items():
    if m := _STACKED.match(name):
      out.update({f"{m[1]}{e}.{m[2]}.weight": np.ascontiguousarray(we) for e, we in enumerate(w)})
    else:
      out[name] = w
  return out
