"""Test helper: what a function's backward pass keeps, read from jax's print_saved_residuals."""

import contextlib
import dataclasses
import io
import math
import re

import jax

# One line per residual: "f32[2,8,8,16] named 'proj/q' from /path/layers.py:71 (adapted)",
# "f32[4,128] from the argument params[...]", "f32[512,512] output of shard_map from ...".
_LINE = re.compile(r"(\w+)\[([\d,]*)\](?: named '([^']*)')?")


@dataclasses.dataclass(frozen=True)
class Residual:
  dtype: str  # "f32", "bf16", "i32", "bool"
  shape: tuple
  name: str | None  # the checkpoint name a remat policy kept it by, if any
  line: str  # jax's whole description

  @property
  def type(self) -> str:
    return f"{self.dtype}[{','.join(map(str, self.shape))}]"

  @property
  def is_argument(self) -> bool:
    return "from the argument" in self.line

  @property
  def nbytes(self) -> int:
    bits = int(re.sub(r"\D", "", self.dtype) or 8)  # f32, bf16, i32; bool is a byte
    return math.prod(self.shape) * bits // 8


def saved(fn, *args) -> list[Residual]:
  """The residuals jax saves for fn(*args)'s backward pass (arguments included, flagged)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(fn, *args)
  residuals = []
  for line in out.getvalue().splitlines():
    dtype, shape, name = _LINE.match(line).groups()
    residuals.append(Residual(dtype, tuple(int(d) for d in shape.split(",") if d), name, line))
  return residuals
