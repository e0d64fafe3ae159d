"""Read and write the safetensors format with numpy alone (bfloat16 via ml_dtypes, which JAX ships).

A file is an 8-byte little-endian header size N, N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw little-endian bytes of every
tensor. The `safetensors` package's numpy API has no bfloat16, the dtype of most LLM checkpoints.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}


def load(path: str) -> dict[str, np.ndarray]:
  """{name: array}; arrays are read-only views of a memory map, read from disk on first use."""
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  data = np.memmap(path, np.uint8, mode="r", offset=8 + size)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which spjax cannot read")
    begin, end = info["data_offsets"]
    out[name] = data[begin:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None):
  header, offset = {}, 0
  for name, array in tensors.items():
    dtype = np.dtype(array.dtype)
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
    header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # readers expect the data to start 8-byte aligned
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for array in tensors.values():  # native order: every host JAX runs on is little-endian
      f.write(np.ascontiguousarray(array).tobytes())
