"""Named layouts: data, not code. `--config.layout=<name>` picks one.

Each preset is a full rules table (unlisted logical axes are replicated) plus the mesh sizes it was
designed for; `--config.mesh.ici.<axis>` and `--config.mesh.dcn.<axis>` override those sizes. The
batch always splits over both `data` and `fsdp`: FSDP is data parallelism whose parameters are
sharded too (and, in the pipeline presets, over `stage`).
"""

from spjax.parallel.sharding import Layout

_BATCH = {"batch": ("data", "fsdp")}
# Megatron-style tensor parallelism: heads and the MLP hidden dimension split, so each block needs
# one all-reduce after attention and one after the MLP; the vocabulary splits too.
_TENSOR = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
           "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor",
           "act_vocab": "tensor"}
# ZeRO-3 / FSDP: every weight matrix is split along d_model and gathered just before use.
_FSDP = {"embed": "fsdp"}

PRESETS = {
    # Parameters replicated; each device a slice of the batch; gradients all-reduced.
    "dp": Layout.from_rules(_BATCH, "dp", mesh={"data": -1}),
    # Parameters and optimizer state split over all devices.
    "fsdp": Layout.from_rules(_BATCH | _FSDP, "fsdp", mesh={"fsdp": -1}),
    # Tensor parallel within groups of 4 devices, data parallel across groups.
    "tp": Layout.from_rules(_BATCH | _TENSOR, "tp", mesh={"data": -1, "tensor": 4}),
    # 2-way tensor parallel inside FSDP: fewer gathers of the largest weights.
    "fsdp_tp": Layout.from_rules(_BATCH | _FSDP | _TENSOR, "fsdp_tp",
                                 mesh={"fsdp": -1, "tensor": 2}),
    # Sequence (context) parallelism inside FSDP: every activation's `length` splits over
    # `sequence`, so a device holds T / sequence positions of each row. Attention needs every key
    # of the row: the partitioner all-gathers keys and values over `sequence` before the scores
    # (exact, not an approximation). Weights split over `sequence` too, sharing their memory.
    "fsdp_sp": Layout.from_rules(_BATCH | {"embed": ("fsdp", "sequence"), "length": "sequence"},
                                 "fsdp_sp", mesh={"fsdp": -1, "sequence": 2}),
    # Hybrid sharded data parallel: FSDP within a slice (fast ICI), plain data parallelism across
    # slices (slow DCN), so only one gradient all-reduce per step crosses slices.
    "hsdp": Layout.from_rules(_BATCH | _FSDP, "hsdp", mesh={"fsdp": -1}, dcn_mesh={"data": -1}),
    # Expert parallelism inside FSDP (mixture-of-experts models, spjax/model/moe.py): each expert's
    # weights live on one slice of the `expert` axis, which splits the batch everywhere outside
    # the experts; dispatched tokens move to their expert's devices and back (all-to-all; dropless:
    # the expert group's tokens are all-gathered and the outputs reduce-scattered back). Dense
    # weights split over `fsdp` only, so `expert` holds copies of them. With a pipeline:
    # "batch:stage,data,fsdp,expert;expert:expert;layers:stage;embed:fsdp".
    "fsdp_ep": Layout.from_rules({"batch": ("data", "fsdp", "expert"), "expert": "expert"} | _FSDP,
                                 "fsdp_ep", mesh={"fsdp": -1, "expert": 2}),
    # Tensor parallel weights (as fsdp_tp), but the residual stream between matmuls splits along
    # d_model over `tensor` instead of being replicated: parameters' `embed` goes to `fsdp` while
    # activations' `act_embed` goes to `tensor`. Each block's closing all-reduce becomes a
    # reduce-scatter plus an all-gather (same bytes), and norms and the residual memory shrink by
    # the tensor size (Megatron sequence parallelism's trade, on d_model because `length` is shared
    # by every activation).
    "fsdp_tp_rs": Layout.from_rules(_BATCH | _FSDP | _TENSOR | {"act_embed": "tensor"},
                                    "fsdp_tp_rs", mesh={"fsdp": -1, "tensor": 2}),
    # Pipeline parallelism: the layer stack splits into stages over `stage` (spjax/parallel/
    # pipeline.py) and activations pass stage to stage; outside the stack `stage` is one more batch
    # axis (first, so each stage device's rows are whole microbatches). Over slices:
    # --config.mesh.dcn.stage=N --config.mesh.ici.stage=1 puts the stages across DCN.
    "pp": Layout.from_rules({"batch": ("stage", "data", "fsdp"), "layers": "stage"}, "pp",
                            mesh={"data": -1, "stage": 2}),
    # Pipeline stages, each FSDP over its own devices.
    "fsdp_pp": Layout.from_rules(_FSDP | {"batch": ("stage", "data", "fsdp"), "layers": "stage"},
                                 "fsdp_pp", mesh={"fsdp": -1, "stage": 2}),
}


def parse(spec: str) -> Layout:
  """What `--config.layout` accepts: a preset name above, a rules string or a rules file."""
  return Layout.parse(spec, PRESETS)
