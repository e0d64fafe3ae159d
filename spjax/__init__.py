"""spjax: Transformer language models on JAX meshes, every parallelism a layout."""

import os

# XLA:CPU's concurrency-optimized scheduler lets the simulated devices of one program start two
# independent collectives in different orders; each device then waits at a different rendezvous
# and the process aborts (seen with fsdp_sp on 8 simulated devices, jaxlib 0.10.2 and 0.12). The
# flag is read when the first backend starts, so setting it on import is in time; TPU and GPU
# ignore it, and a value the user set wins.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=false".strip()
