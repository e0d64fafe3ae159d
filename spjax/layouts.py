"""Named layouts: data, not code. `--config.layout=<name>` picks one.

Each preset is a full rules table (unlisted logical axes are replicated) plus the mesh sizes it was
designed for; `--config.mesh.ici.<axis>` overrides those sizes. The batch always splits over both
`data` and `fsdp`: FSDP is data parallelism whose parameters are sharded too.
"""

from spjax.sharding import Layout

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
}
