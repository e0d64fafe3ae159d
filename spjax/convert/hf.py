"""Hugging Face checkpoints <-> spjax models: Llama, GPT-NeoX, Mixtral; safetensors + config.json.

  model, cfg = from_pretrained("path/to/hf_dir")   # Llama-, GPTNeoX- or MixtralForCausalLM
  logits = model(tokens)                           # [B, T, V]
  save_pretrained(model, cfg, "out_dir")           # transformers.AutoModelForCausalLM loads it

Neither direction needs torch or transformers. Weight layouts: HF linear weights are [out, in]; spjax
kernels are [in, out] with heads split out: q [D, H, Dh], k/v [D, K, Dh], o [H, Dh, D]. GPT-NeoX fuses
q, k, v into one matrix interleaved per head ([H, 3, Dh] rows). Both use the rotate_half RoPE
convention, as spjax does, so no permutation of the head features is needed. Mixtral is Llama with
mixture-of-experts MLPs; its expert and router mapping is in spjax/convert/hf_mixtral.py.
"""

import dataclasses
import json
import os
import re

import jax
import numpy as np
from flax import nnx

from spjax import convert
from spjax.convert import hf_mixtral, safetensors_io
from spjax.model import model as model_lib

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
                 "mixtral": "MixtralForCausalLM"}
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_PREFIX = {"llama": "model.", "gpt_neox": "gpt_neox.", "mixtral": "model."}
# Buffers some checkpoints carry that are not weights: recomputed by every implementation.
_BUFFERS = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


# ---------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------


def config_from_hf(hf: dict, *, dtype: str = "float32",
                   param_dtype: str = "float32") -> model_lib.ModelConfig:
  """The spjax ModelConfig of an HF config.json dict; ValueError for what spjax cannot compute."""
  family = hf.get("model_type")
  if family not in ARCHITECTURES:
    raise ValueError(f"model_type {family!r} is not supported; supported: "
                     f"{', '.join(ARCHITECTURES)}")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"RoPE scaling {rope} is not supported; only plain RoPE")
  act = hf.get("hidden_act", "gelu" if family == "gpt_neox" else "silu")
  if act not in _ACT_FROM_HF:
    raise ValueError(f"hidden_act {act!r} is not supported; supported: {', '.join(_ACT_FROM_HF)}")
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  common = dict(vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
                num_heads=heads, mlp_dim=hf["intermediate_size"], mlp_activation=_ACT_FROM_HF[act],
                tie_embeddings=hf.get("tie_word_embeddings", False), dtype=dtype,
                param_dtype=param_dtype)
  if family in ("llama", "mixtral"):
    default_theta = 1e6 if family == "mixtral" else 10_000.0  # what transformers assumes
    cfg = model_lib.ModelConfig(
        **common, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads,
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", default_theta)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), attn_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False))
  else:
    cfg = model_lib.ModelConfig(
        **common, num_kv_heads=heads, head_dim=d // heads,
        rope_theta=rope.get("rope_theta", hf.get("rotary_emb_base", 10_000.0)),
        rotary_pct=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
        norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5), gated_mlp=False,
        parallel_residual=hf.get("use_parallel_residual", True),
        attn_bias=hf.get("attention_bias", True), mlp_bias=True)
  if family == "mixtral":
    cfg = hf_mixtral.config_from_hf(hf, cfg)
  cfg.validate()
  return cfg


def family_of(cfg: model_lib.ModelConfig) -> str:
  """Which HF architecture computes exactly what this config does; ValueError if none."""
  if cfg.num_experts:
    hf_mixtral.check(cfg)
    return "mixtral"
  if (cfg.norm, cfg.gated_mlp, cfg.parallel_residual, cfg.rotary_pct) == ("rmsnorm", True, False,
                                                                          1.0):
    return "llama"
  if cfg.norm == "layernorm" and not cfg.gated_mlp and cfg.mlp_bias:
    if cfg.num_kv_heads != cfg.num_heads or cfg.num_heads * cfg.head_dim != cfg.d_model:
      raise ValueError("GPT-NeoX needs num_kv_heads == num_heads and num_heads * head_dim == "
                       f"d_model; got {cfg.num_kv_heads}, {cfg.num_heads} * {cfg.head_dim} vs "
                       f"{cfg.d_model}")
    return "gpt_neox"
  raise ValueError("no Hugging Face architecture matches this model: Llama needs norm=rmsnorm, "
                   "gated_mlp, no parallel_residual and rotary_pct=1; GPT-NeoX needs "
                   "norm=layernorm, gated_mlp=False and mlp_bias")


def config_to_hf(cfg: model_lib.ModelConfig) -> dict:
  family = family_of(cfg)
  out = {"architectures": [ARCHITECTURES[family]], "model_type": family,
         "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
         "intermediate_size": cfg.mlp_dim, "hidden_act": _ACT_TO_HF[cfg.mlp_activation],
         "attention_bias": cfg.attn_bias, "tie_word_embeddings": cfg.tie_embeddings,
         "max_position_embeddings": 2048, "dtype": cfg.param_dtype,
         "rope_theta": cfg.rope_theta}  # the pre-5.0 spelling, for older transformers
  if family in ("llama", "mixtral"):
    out.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               rms_norm_eps=cfg.norm_eps, mlp_bias=cfg.mlp_bias,
               rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if family == "mixtral":  # no biases anywhere, so no switches for them
      del out["attention_bias"], out["mlp_bias"]
      out.update(hf_mixtral.config_to_hf(cfg))
  else:
    out.update(layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
               rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta,
               rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                "partial_rotary_factor": cfg.rotary_pct})
  return out


# ---------------------------------------------------------------------------------------------------
# Weights: one table per family of spjax param -> (HF tensor name, how the layout changes)
# ---------------------------------------------------------------------------------------------------

# kind: (HF -> spjax, spjax -> HF); w is one layer's tensor, dh = head_dim.
_KINDS = {
    "copy": (lambda w, dh: w, lambda w, dh: w),
    "linear": (lambda w, dh: w.T, lambda w, dh: w.T),  # [out, in] <-> [in, out]
    "heads_in": (lambda w, dh: w.T.reshape(w.shape[1], -1, dh),  # [N*Dh, D] <-> [D, N, Dh]
                 lambda w, dh: w.reshape(w.shape[0], -1).T),
    "heads_out": (lambda w, dh: w.T.reshape(-1, dh, w.shape[0]),  # [D, H*Dh] <-> [H, Dh, D]
                  lambda w, dh: w.reshape(-1, w.shape[-1]).T),
    "heads_bias": (lambda w, dh: w.reshape(-1, dh), lambda w, dh: w.reshape(-1)),  # [N*Dh] <-> [N, Dh]
    "experts": (lambda w, dh: w.transpose(0, 2, 1),  # [E, out, in] <-> [E, in, out]
                lambda w, dh: w.transpose(0, 2, 1)),
}

_LAYER = {
    "llama": {
        "attn_norm/scale": ("input_layernorm.weight", "copy"),
        "mlp_norm/scale": ("post_attention_layernorm.weight", "copy"),
        **{f"attn/{n}": (f"self_attn.{n}_proj.weight", "heads_in") for n in "qkv"},
        **{f"attn/{n}_bias": (f"self_attn.{n}_proj.bias", "heads_bias") for n in "qkv"},
        "attn/o": ("self_attn.o_proj.weight", "heads_out"),
        "attn/o_bias": ("self_attn.o_proj.bias", "copy"),
        **{f"mlp/{n}": (f"mlp.{n}_proj.weight", "linear") for n in ("gate", "up", "down")},
        **{f"mlp/{n}_bias": (f"mlp.{n}_proj.bias", "copy") for n in ("gate", "up", "down")},
    },
    "gpt_neox": {  # attention.{q,k,v}.* are the parts of the fused query_key_value (see _split_qkv)
        "attn_norm/scale": ("input_layernorm.weight", "copy"),
        "attn_norm/bias": ("input_layernorm.bias", "copy"),
        "mlp_norm/scale": ("post_attention_layernorm.weight", "copy"),
        "mlp_norm/bias": ("post_attention_layernorm.bias", "copy"),
        **{f"attn/{n}": (f"attention.{n}.weight", "heads_in") for n in "qkv"},
        **{f"attn/{n}_bias": (f"attention.{n}.bias", "heads_bias") for n in "qkv"},
        "attn/o": ("attention.dense.weight", "heads_out"),
        "attn/o_bias": ("attention.dense.bias", "copy"),
        "mlp/up": ("mlp.dense_h_to_4h.weight", "linear"),
        "mlp/up_bias": ("mlp.dense_h_to_4h.bias", "copy"),
        "mlp/down": ("mlp.dense_4h_to_h.weight", "linear"),
        "mlp/down_bias": ("mlp.dense_4h_to_h.bias", "copy"),
    },
}

_LAYER["mixtral"] = {**{k: v for k, v in _LAYER["llama"].items()
                       if k.startswith(("attn_norm", "mlp_norm", "attn/")) and "bias" not in k},
                    **hf_mixtral.LAYER}

_GLOBAL = {
    "llama": {"embed": ("model.embed_tokens.weight", "copy"),
              "final_norm/scale": ("model.norm.weight", "copy"),
              "unembed": ("lm_head.weight", "linear")},
    # embed_out is the pre-5.0 name of the head; transformers 5 renames it to lm_head on load.
    "gpt_neox": {"embed": ("gpt_neox.embed_in.weight", "copy"),
                 "final_norm/scale": ("gpt_neox.final_layer_norm.weight", "copy"),
                 "final_norm/bias": ("gpt_neox.final_layer_norm.bias", "copy"),
                 "unembed": ("embed_out.weight", "linear")},
}
_GLOBAL["mixtral"] = _GLOBAL["llama"]
_QKV = ("attention.query_key_value.", ("attention.q.", "attention.k.", "attention.v."))


def _split_qkv(tensors: dict, num_heads: int) -> dict:
  """GPT-NeoX's fused rows [H, 3, Dh] -> separate attention.{q,k,v}.{weight,bias} [H*Dh, ...]."""
  out = {}
  for name, w in tensors.items():
    fused, parts = _QKV
    if fused not in name:
      out[name] = w
      continue
    w = np.asarray(w).reshape(num_heads, 3, -1, *w.shape[1:])  # [H, 3, Dh(, D)]
    for i, part in enumerate(parts):
      out[name.replace(fused, part)] = w[:, i].reshape(-1, *w.shape[3:])
  return out


def _fuse_qkv(tensors: dict, num_heads: int) -> dict:
  out = {}
  fused, parts = _QKV
  for name, w in tensors.items():
    if parts[0] in name:
      pieces = [tensors[name.replace(parts[0], p)] for p in parts]
      stacked = np.stack([p.reshape(num_heads, -1, *p.shape[1:]) for p in pieces], axis=1)
      out[name.replace(parts[0], fused)] = stacked.reshape(-1, *w.shape[1:])  # [H*3*Dh(, D)]
    elif not any(p in name for p in parts):
      out[name] = w
  return out


def _hf_name(family: str, key: str, layer: int | None) -> tuple[str, str]:
  if key.startswith("blocks/"):
    name, kind = _LAYER[family][key.removeprefix("blocks/")]
    return f"{_PREFIX[family]}layers.{layer}.{name}", kind
  return _GLOBAL[family][key]


# What an HF checkpoint fixes about the model; the rest (dtypes, scan, remat, attention kernel) is
# how spjax runs it.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                        "head_dim", "mlp_dim", "rope_theta", "rotary_pct", "norm", "norm_eps",
                        "mlp_activation", "gated_mlp", "parallel_residual", "attn_bias", "mlp_bias",
                        "tie_embeddings", "num_experts", "experts_per_token", "moe_every")


def check_matches(hf_dir: str, cfg: model_lib.ModelConfig) -> None:
  """Raises ValueError listing every `model.*` field that differs from the checkpoint's model."""
  hf_cfg = config_from_hf(convert.read_config_json(hf_dir, "a Hugging Face model directory"))
  wrong = [f"--config.model.{f}={getattr(hf_cfg, f)} (config has {getattr(cfg, f)})"
           for f in ARCHITECTURE_FIELDS if getattr(hf_cfg, f) != getattr(cfg, f)]
  if wrong:
    raise ValueError(f"init_from={hf_dir} holds a different model; to load it set "
                     + ", ".join(wrong))


def from_pretrained(hf_dir: str, *, dtype: str = "float32", param_dtype: str = "float32",
                    **overrides):
  """(model, ModelConfig) from an HF directory of config.json and *.safetensors.

  Under an active mesh and logical rules (`Program.activate()`), params are placed sharded.
  `dtype` is the compute dtype, `param_dtype` what the params are stored as; `overrides` set other
  non-architectural ModelConfig fields (scan_layers, remat_policy, attention).
  """
  hf_config = convert.read_config_json(hf_dir, "a Hugging Face model directory")
  cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  if set(overrides) & set(ARCHITECTURE_FIELDS):
    raise ValueError(f"from_pretrained: {sorted(set(overrides) & set(ARCHITECTURE_FIELDS))} come "
                     f"from {hf_dir}/config.json and cannot be overridden")
  cfg = dataclasses.replace(cfg, **overrides)
  family = hf_config["model_type"]
  tensors = _split_qkv(_read_tensors(hf_dir), cfg.num_heads)
  if family == "gpt_neox" and "lm_head.weight" in tensors:  # the transformers 5 name of the head
    tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
  if family == "mixtral":
    tensors = hf_mixtral.stack_experts(tensors, cfg.num_experts, hf_dir)

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Transformer(cfg, nnx.Rngs(0))),
                                 nnx.Param)
  used, flat = set(), []
  for path, var in nnx.to_flat_state(abstract):
    key = "/".join(str(p) for p in path if not isinstance(p, int))
    layers = [p for p in path if isinstance(p, int)] or (range(cfg.num_layers)
                                                         if key.startswith("blocks/") else [None])
    parts = []
    for layer in layers:
      name, kind = _hf_name(family, key, layer)
      if name not in tensors:
        raise ValueError(f"{hf_dir}: tensor {name} is missing (needed for spjax param {key})")
      used.add(name)
      parts.append(_KINDS[kind][0](np.asarray(tensors[name], np.float32), cfg.head_dim))
    value = parts[0] if len(parts) == 1 else np.stack(parts)  # scanned: [L, ...]
    if value.shape != var.shape:
      raise ValueError(f"{hf_dir}: {key} converts to shape {value.shape}, the model expects "
                       f"{var.shape}; is config.json from the same model?")
    flat.append((path, var.replace(value.astype(var.dtype))))
  extra = sorted(n for n in tensors if n not in used and not _BUFFERS.match(n)
                 and not (cfg.tie_embeddings and n in ("lm_head.weight", "embed_out.weight")))
  if extra:
    raise ValueError(f"{hf_dir}: tensors the spjax model has no place for: {', '.join(extra[:5])}"
                     f"{' ...' if len(extra) > 5 else ''}")
  params = jax.device_put(nnx.from_flat_state(flat), convert.target_shardings(abstract))
  return nnx.merge(graphdef, params), cfg


def save_pretrained(model: model_lib.Transformer, cfg: model_lib.ModelConfig, out_dir: str, *,
                    extra_config: dict | None = None) -> None:
  """Writes out_dir/config.json and out_dir/model.safetensors (params in `cfg.param_dtype`).

  `extra_config` entries go into config.json as given, e.g. {"max_position_embeddings": seq_len,
  "bos_token_id": 1, "eos_token_id": 2}. A mixture-of-experts model is written as Mixtral, which
  routes dropless: what spjax computes with model.capacity_factor=0, whatever the run trained with.
  """
  family = family_of(cfg)
  tensors = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key = "/".join(str(p) for p in path if not isinstance(p, int))
    value = np.asarray(jax.device_get(var[...]))
    layer = [p for p in path if isinstance(p, int)]
    if key.startswith("blocks/") and not layer:
      per_layer = enumerate(value)  # scanned stack [L, ...]: one HF tensor per layer
    else:
      per_layer = [(layer[0] if layer else None, value)]
    for layer, w in per_layer:
      name, kind = _hf_name(family, key, layer)
      tensors[name] = np.ascontiguousarray(_KINDS[kind][1](w, cfg.head_dim))
  if family == "gpt_neox":
    tensors = _fuse_qkv(tensors, cfg.num_heads)
  if family == "mixtral":
    tensors = hf_mixtral.unstack_experts(tensors)
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.save(tensors, os.path.join(out_dir, "model.safetensors"), {"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg) | (extra_config or {}), f, indent=2)
    f.write("\n")


def _read_tensors(hf_dir: str) -> dict:
  """Every tensor of the checkpoint, following model.safetensors.index.json when it is sharded."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{hf_dir} has no *.safetensors weights (PyTorch .bin files are not read)")
  tensors = {}
  for name in files:
    tensors.update(safetensors_io.load(os.path.join(hf_dir, name)))
  return tensors
