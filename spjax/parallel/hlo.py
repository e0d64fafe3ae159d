"""What a compiled step does, read from its optimized HLO text: collectives, cost-model time.

Works on `compiled.as_text()` of any backend (CPU with simulated devices, TPU compiled ahead of
time). Counts are *executed* counts: an op inside a `while` body (a scanned layer stack, gradient
accumulation, a windowed einsum) counts once per iteration of the loop.
"""

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2,
          "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
          "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
# `%name = <type> opcode(operands), attributes`; the type may be a tuple and hold layouts like
# {1,0:T(8,128)(2,1)}, so it is matched lazily up to the first ` opcode(`.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLS = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|called_computations|"
                    r"true_computation|false_computation)"
                    r"=(\{[^}]*\}|%[\w.\-]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_EINSUM = re.compile(r"\(([a-z]+,[a-z]+->[a-z]+)\)")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')


def shape_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (a tuple type counts all its elements)."""
  return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _SHAPE.findall(text))


@dataclasses.dataclass
class _Instr:
  name: str
  type: str
  opcode: str
  operands: list  # names of the operand instructions
  args: str  # the text between the parentheses: a constant's literal
  attrs: str


def _split_operands(rest: str):
  """'%a, f32[2]{0} %b), attrs' -> (['a', 'b'], '%a, f32[2]{0} %b', ', attrs'): stops at the
  matching ')'."""
  depth, end = 0, len(rest)
  for i, ch in enumerate(rest):
    depth += ch in "({["
    if ch in ")}]":
      if depth == 0:
        end = i
        break
      depth -= 1
  return re.findall(r"%([\w.\-]+)", rest[:end]), rest[:end], rest[end + 1:]


def _parse(hlo_text: str):
  """{computation: [instructions]} and the name of the entry computation."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    line = _COMMENT.sub("", line)  # /*index=5*/ markers in long signatures
    m = _INSTR.match(line)
    if m and current is not None:
      computations[current].append(_Instr(m.group(1), m.group(2), m.group(3),
                                          *_split_operands(m.group(4))))
      continue
    c = _COMPUTATION.match(line)
    if c and "=" not in line.split("{")[0]:
      current = c.group(1)
      computations[current] = []
      if line.lstrip().startswith("ENTRY"):
        entry = current
  return computations, entry


def _multipliers(computations, entry):
  """How many times each computation runs per call of the entry (while trip counts multiply)."""
  times = collections.Counter({entry: 1})
  order = [entry]
  for name in order:  # breadth first; HLO call graphs are acyclic
    for instr in computations.get(name, ()):
      for kind, callees in _CALLS.findall(instr.attrs):
        for callee in (c.strip(" {}%") for c in callees.split(",")):
          if callee not in computations:
            continue
          n = _trip_count(instr, computations) if kind == "body" else 1
          times[callee] += times[name] * n
          if callee not in order:
            order.append(callee)
  return times


def _trip_count(loop: _Instr, computations) -> int:
  """Iterations of a while loop: XLA's known_trip_count where the backend records it (CPU), else
  the constant its condition compares the counter against (`i < N`: JAX loops count from 0)."""
  known = _TRIPS.search(loop.attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", loop.attrs)
  instrs = computations.get(cond.group(1), []) if cond else []
  constants = {i.name: i.args.strip() for i in instrs if i.opcode == "constant"}
  for i in instrs:
    if i.opcode == "compare" and "direction=LT" in i.attrs:
      bounds = [constants[o] for o in i.operands if constants.get(o, "").isdigit()]
      if bounds:
        return int(bounds[0])
  return 1


def _collective_kind(opcode: str):
  base = opcode.removesuffix("-start")
  return base if base in COLLECTIVES else None


@dataclasses.dataclass
class Collectives:
  """Per collective kind: executed count and bytes per device.

  Bytes are the full buffer of each op on one device: the gathered output of an all-gather, the
  input of a reduce-scatter, the operand of an all-reduce, all-to-all or collective-permute.
  """
  count: dict
  bytes: dict

  def format(self) -> str:
    return "\n".join(f"  {k:<19} {self.count[k]:>6} ops  {fmt_bytes(self.bytes[k]):>10}"
                     for k in COLLECTIVES)


def collectives(hlo_text: str) -> Collectives:
  computations, entry = _parse(hlo_text)
  times = _multipliers(computations, entry)
  types = {i.name: i.type for instrs in computations.values() for i in instrs}
  count, nbytes = dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(COLLECTIVES, 0)
  for comp, instrs in computations.items():
    for instr in instrs:
      kind = _collective_kind(instr.opcode)
      if kind is None or not times[comp]:
        continue
      if kind == "all-gather":
        size = shape_bytes(instr.type) - (shape_bytes(types.get(instr.operands[0], ""))
                                          if instr.opcode.endswith("-start") else 0)
      else:  # the operands: for -start ops the result tuple repeats them with extra context
        size = sum(shape_bytes(types.get(op, "")) for op in instr.operands)
      count[kind] += times[comp]
      nbytes[kind] += times[comp] * size
  return Collectives(count, nbytes)


# At or above this, `estimated_cycles` is the cost model's "no estimate" (libtpu 0.0.52 writes
# INT64_MAX for a gather_offload_custom_fusion), not a duration: flagged, never summed.
SENTINEL_CYCLES = 2**62
# Custom calls XLA's TPU cost analysis sums into `optimal_seconds` at -1 s each (libtpu 0.0.52).
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)


@dataclasses.dataclass
class CycleSum:
  """The cost model's cycles over the executed ops: {category: cycles}, how many ops each
  category's cycles came from ({category: executions}), and the ops it left without an estimate,
  [(op, category, executions)], which are not in `cycles`."""
  cycles: dict
  sentinels: list
  executions: dict


def cycle_sum(hlo_text: str, key=None) -> CycleSum:
  """Per-op `estimated_cycles` of a TPU compile summed over what one step executes: a while body
  once per iteration, a conditional's costliest branch only (the one that updates the state, for
  optax.apply_if_finite). Empty for other backends. Bucketed by `key(op)`: the JAX operation it
  came from by default, or e.g. `op_and_shape` to tell one matmul from another."""
  return _cycle_sum(*_parse(hlo_text), key)


def op_and_shape(instr: _Instr) -> str:
  """A bucket finer than the default: the JAX operation and the op's output shape (a fusion's
  first output: the others are side outputs, or the buffers of a collective it overlaps), layout
  left out, e.g. "backward: dot_general bf16[8,2048,8192]"."""
  first = re.match(r"\(?\s*([a-z0-9]+\[[0-9,]*\])", instr.type)
  return f"{_category(instr)} {first.group(1) if first else instr.type}"


def _cycle_sum(computations, entry, key=None) -> CycleSum:
  key, memo = key or _category, {}

  def cost(comp):
    if comp in memo:
      return memo[comp]
    totals, counts, sentinels = (collections.Counter() for _ in range(3))
    for instr in computations.get(comp, ()):
      m = _CYCLES.search(instr.attrs)
      if m and int(m.group(1)) >= SENTINEL_CYCLES:
        sentinels[(instr.name, key(instr))] += 1
      elif m:
        totals[key(instr)] += int(m.group(1))
        counts[key(instr)] += 1
      called = _callees(instr, computations)
      if instr.opcode == "conditional" and called:
        branches = [cost(c) for _, c in called]
        best = max(branches, key=lambda b: sum(b[0].values()))
        totals.update(best[0])
        counts.update(best[1])
        for _, _, s in branches:  # every branch's unestimated ops get reported
          sentinels.update(s)
        continue
      for kind, callee in called:
        n = _trip_count(instr, computations) if kind == "body" else 1
        for mine, theirs in zip((totals, counts, sentinels), cost(callee)):
          mine.update({k: n * v for k, v in theirs.items()})
    memo[comp] = totals, counts, sentinels
    return memo[comp]

  totals, counts, sentinels = cost(entry) if entry else ({}, {}, {})
  return CycleSum(dict(totals), [(op, cat, n) for (op, cat), n in sentinels.items()],
                  dict(counts))


def cycle_totals(hlo_text: str) -> dict:
  """{category: estimated cycles}: where the cost model thinks the step spends its time."""
  return cycle_sum(hlo_text).cycles


@dataclasses.dataclass
class XlaEstimate:
  """XLA's own `cost_analysis()["optimal_seconds"]`, corrected where it can be, refused (seconds
  None, `refusal` says why) where the number cannot mean a step time."""
  seconds: float | None
  raw_seconds: float | None
  uncosted_calls: int  # custom calls outside conditionals summed at -1 s, each added back as +1 s
  refusal: str = ""
  # Seconds added for conditionals whose costliest branch XLA's max dropped (see xla_estimate).
  branch_correction: float = 0.0


def xla_estimate(optimal_seconds, hlo_text: str, clock: float) -> XlaEstimate:
  """Corrects XLA's figure for what its TPU cost analysis gets wrong about a train step:

  - custom calls in UNCOSTED_CUSTOM_CALLS count -1 s each: +1 s per executed call;
  - a conditional counts its costliest branch, and a branch holding k such calls counts k seconds
    short, so it loses that max to any branch without them whenever it really costs under k
    seconds (optax.apply_if_finite's update branch loses to the skip branch). The total then holds
    the costliest branch without such calls; the difference to the costliest branch is added, in
    the cycle model's terms (its `estimated_cycles` / `clock`, Hz), since XLA's own is lost.
    Refused where that reasoning does not hold (every branch has such calls, or the branch costs
    more than k seconds);
  - a while loop's body is costed once, whatever its trip count: refused (scanned layers and
    gradient accumulation are loops; compile unrolled, without accumulation);
  - Pallas kernels (tpu_custom_call) are outside the cost analysis: refused.
  """
  computations, entry = _parse(hlo_text)
  reachable = _reachable(computations, entry)
  instrs = [i for c in reachable for i in computations[c]]
  if optimal_seconds is None:
    return XlaEstimate(None, None, 0, "cost_analysis() gives no optimal_seconds")
  loops = [i.name for i in instrs if i.opcode == "while"]
  if loops:
    return XlaEstimate(None, optimal_seconds, 0, f"{len(loops)} while loop(s) "
                       f"({', '.join(loops[:3])}): cost_analysis() costs a loop body once, not "
                       "per iteration")
  kernels = [i.name for i in instrs if _is_target(i, "tpu_custom_call")]
  if kernels:
    return XlaEstimate(None, optimal_seconds, 0, f"{len(kernels)} Pallas kernel call(s): not in "
                       "cost_analysis() (model.attention=xla gives XLA's figure)")
  inside = set()  # computations under a conditional: their -1 s calls are handled per branch
  correction = 0.0
  for cond in (i for i in instrs if i.opcode == "conditional"):
    branches = []  # (name, -1 s calls, cycle-model seconds)
    for _, branch in _callees(cond, computations):
      below = _reachable(computations, branch)
      inside.update(below)
      k = sum(_uncosted(i) for c in below for i in computations[c])
      branches.append((branch, k, sum(_cycle_sum(computations, branch).cycles.values()) / clock))
    if not any(k for _, k, _ in branches):
      continue  # XLA's max over branches is right as it stands
    clean = [b for b in branches if not b[1]]
    costly = max(branches, key=lambda b: b[2])
    bad = [b for b in branches if b[1] and b[2] >= b[1]]
    if not clean or bad:
      return XlaEstimate(None, optimal_seconds, 0, f"conditional {cond.name}: its branches hold "
                         "custom calls costed at -1 s in a way the max over branches cannot be "
                         "undone for")
    correction += costly[2] - max(b[2] for b in clean)
  n = sum(_uncosted(i) for c in reachable if c not in inside for i in computations[c])
  return XlaEstimate(optimal_seconds + n + correction, optimal_seconds, n,
                     branch_correction=correction)


def _is_target(instr: _Instr, target: str) -> bool:
  return instr.opcode == "custom-call" and f'custom_call_target="{target}"' in instr.attrs


def _uncosted(instr: _Instr) -> bool:
  return any(_is_target(instr, t) for t in UNCOSTED_CUSTOM_CALLS)


def _callees(instr: _Instr, computations) -> list:
  """[(kind, computation)] that `instr` calls: kind is "body", "condition", "calls", ..."""
  return [(kind, callee) for kind, callees in _CALLS.findall(instr.attrs)
          for callee in (c.strip(" {}%") for c in callees.split(",")) if callee in computations]


def _reachable(computations, entry) -> list:
  """The computations `entry` runs, itself included."""
  order = [entry] if entry in computations else []
  for name in order:
    for _, callee in (cc for i in computations[name] for cc in _callees(i, computations)):
      if callee not in order:
        order.append(callee)
  return order


_GROUPED_MATMUL = "ragged-dot"  # the Mosaic kernels jax.lax.ragged_dot lowers to on TPU


def _executed_kernels(hlo_text: str):
  """(name without its ".N" suffix, executions per step, instr, {name: type} of its computation)
  for every Pallas/Mosaic kernel (`tpu_custom_call`) the program runs."""
  computations, entry = _parse(hlo_text)
  times = _multipliers(computations, entry)
  for comp, instrs in computations.items():
    if not times[comp]:
      continue
    types = {i.name: i.type for i in instrs}
    for instr in instrs:
      if _is_target(instr, "tpu_custom_call"):
        yield re.sub(r"\.\d+$", "", instr.name), times[comp], instr, types


def kernel_calls(hlo_text: str) -> dict:
  """{kernel name: executed count} of the Pallas/Mosaic kernels in a TPU program, e.g.
  {"splash_mha_fwd_segmented_residuals": 32}, except the grouped matmuls (`grouped_matmul_flops`
  counts those from their shapes). The cost model gives these no cycles."""
  calls = collections.Counter()
  for name, n, _, _ in _executed_kernels(hlo_text):
    if not name.startswith(_GROUPED_MATMUL):
      calls[name] += n
  return dict(calls)


def _dims(type_: str) -> list:
  """'bf16[512,128]{1,0:T(8,128)}' -> [512, 128] (the first shape in the type)."""
  m = _SHAPE.search(type_)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def grouped_matmul_flops(hlo_text: str) -> dict:
  """{kernel name: FLOPs per step} of the grouped matmuls that `jax.lax.ragged_dot` becomes on TPU,
  which the cost model, as for every Mosaic kernel, gives no cycles. From the shapes: out [M, N] =
  lhs [M, K] (rows sorted by group) against rhs [G, K, N] is 2 M K N however the rows split into
  groups; "ragged-dot-metadata" (the group offsets) counts nothing. A variant of another shape
  (the weight gradient, if it ever runs as a kernel) is refused, naming it, not guessed."""
  flops = collections.Counter()
  for name, n, instr, types in _executed_kernels(hlo_text):
    if not name.startswith(_GROUPED_MATMUL) or name == _GROUPED_MATMUL + "-metadata":
      continue
    out, lhs, rhs = (_dims(t) for t in (instr.type, types.get(instr.operands[-2], ""),
                                        types.get(instr.operands[-1], "")))
    if not (len(out) == len(lhs) == 2 and len(rhs) == 3 and out[0] == lhs[0]
            and rhs[1:] == [lhs[1], out[1]]):
      raise ValueError(f"no FLOP count for grouped matmul kernel {instr.name!r}: output {out}, "
                       f"operands {lhs} x {rhs} (known: [M, K] x [G, K, N] -> [M, N])")
    flops[name] += n * 2 * out[0] * out[1] * lhs[1]
  return dict(flops)


def _category(instr: _Instr) -> str:
  """A readable bucket for an op: the collective, or the JAX operation it came from (its metadata),
  e.g. "backward: dot_general btkgd,bskd->bkgts"; compiler-inserted ops go by opcode ("copy")."""
  kind = _collective_kind(instr.opcode)
  if kind:
    return kind
  m = _OP_NAME.search(instr.attrs)
  if not m:
    return instr.opcode
  path = m.group(1)
  einsum = _EINSUM.findall(path)
  phase = "backward" if "transpose(" in path else "forward" if "jvp(" in path else "update"
  op = re.sub(r"\.\d+$", "", path.rsplit("/", 1)[-1])  # "reshape.29" -> "reshape"
  return f"{phase}: {op}" + (f" {einsum[-1]}" if einsum else "")


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024

