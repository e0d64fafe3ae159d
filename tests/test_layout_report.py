"""Layout report: bytes per device equal the real shards; HLO collectives counted right."""

import os
import sys

import jax
import pytest
from flax import nnx

from configs import default
from spjax.parallel import footprint
from spjax.parallel import hlo
from spjax.train import program

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import layout_report  # noqa: E402  (tools/ is a folder of scripts, not a package)

# A scheduled module: a while loop running 3 times around an all-gather (trip count recorded, as on
# CPU), one running 5 times around a costed op (trip count only in its condition, as on TPU), plus
# a reduce-scatter, an async all-reduce and an all-gather-start in the entry. Known answer below.
HLO = """HloModule toy, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[2,128])) -> (s32[], f32[2,128]) {
  %p = (s32[], f32[2,128]{1,0}) parameter(0)
  %x = f32[2,128]{1,0} get-tuple-element(%p), index=1
  %all-gather.1 = f32[8,128]{1,0:T(8,128)} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[2,128]{1,0}) tuple(%i, %x)
}

%body5 (q: (s32[], f32[2,128])) -> (s32[], f32[2,128]) {
  %q = (s32[], f32[2,128]{1,0}) parameter(0)
  %y = f32[2,128]{1,0} get-tuple-element(%q), index=1
  %z = f32[2,128]{1,0} exponential(%y), metadata={op_name="jit(f)/jvp()/exp"}, backend_config={"estimated_cycles":"100"}
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %u = (s32[], f32[2,128]{1,0}) tuple(%j, %z)
}

%cond5 (q: (s32[], f32[2,128])) -> pred[] {
  %five = s32[]{:T(128)} constant(5)
  %q = (s32[], f32[2,128]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %five), direction=LT
}

%cond (p: (s32[], f32[2,128])) -> pred[] {
  %p = (s32[], f32[2,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (arg: f32[2,128], big: bf16[64,32]) -> f32[2,128] {
  %arg = f32[2,128]{1,0} parameter(0)
  %big = bf16[64,32]{1,0} parameter(1), /*index=1*/
  %zero = s32[] constant(0)
  %init = (s32[], f32[2,128]{1,0}) tuple(%zero, %arg)
  %loop = (s32[], f32[2,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %loop5 = (s32[], f32[2,128]{1,0}) while(%init), condition=%cond5, body=%body5
  %dot = f32[2,2]{1,0} dot(%arg, %arg), lhs_contracting_dims={1}, rhs_contracting_dims={1}, metadata={op_name="jit(f)/transpose(jvp(ab,cb->ac))/dot_general"}, backend_config={"estimated_cycles":"7"}
  %rs = bf16[16,32]{1,0} reduce-scatter(%big), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  %ar = bf16[64,32]{1,0} all-reduce-start(%big), channel_id=3, to_apply=%add
  %ard = bf16[64,32]{1,0} all-reduce-done(%ar)
  %ags = (f32[2,128]{1,0}, f32[8,128]{1,0}) all-gather-start(%arg), channel_id=4, dimensions={0}
  %agd = f32[8,128]{1,0} all-gather-done(%ags)
  ROOT %out = f32[2,128]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_collectives_of_a_known_module():
  c = hlo.collectives(HLO)
  assert c.count == {"all-gather": 4, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                     "collective-permute": 0}
  # all-gather: the gathered f32[8,128] (4 KiB), 3 times in the loop + once async; reduce-scatter
  # and all-reduce: their bf16[64,32] input (4 KiB).
  assert c.bytes == {"all-gather": 4 * 4096, "reduce-scatter": 4096, "all-reduce": 4096,
                     "all-to-all": 0, "collective-permute": 0}


def test_cost_model_cycles_count_loop_bodies_per_iteration():
  assert hlo.cycle_totals(HLO) == {"forward: exp": 5 * 100, "backward: dot_general ab,cb->ac": 7}


def tiny(layout):
  cfg = default.get_config("tiny")
  cfg.layout = layout
  return cfg


@pytest.fixture(scope="module")
def reports():
  progs = {name: program.build(tiny(name)) for name in ("dp", "fsdp_tp")}
  return progs, {name: layout_report.report(p) for name, p in progs.items()}


def test_dp_gathers_no_parameters_and_fsdp_does(reports):
  _, r = reports
  dp, sharded = r["dp"]["collectives"], r["fsdp_tp"]["collectives"]
  assert dp.count["all-gather"] == 0 and dp.count["all-reduce"] > 0  # gradients only
  # Each of the 2 scanned layers gathers its 7 weight matrices at least once (forward).
  assert sharded.count["all-gather"] >= 2 * 7


def test_report_bytes_per_device_equal_the_real_shards(reports):
  progs, r = reports
  prog = progs["fsdp_tp"]
  with prog.activate():
    state = prog.jit_init()()
  real = {"/".join(map(str, path)): var.get_value()
          for path, var in nnx.to_flat_state(state["params"])}
  rows = r["fsdp_tp"]["rows"]
  assert sorted(row.name for row in rows) == sorted(real)
  for row in rows:
    shards = {s.data.nbytes for s in real[row.name].addressable_shards}
    assert shards == {row.bytes_per_device}, row.name
  opt_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state["opt_state"]))
  assert r["fsdp_tp"]["totals"]["opt_state"] == opt_bytes
  assert r["fsdp_tp"]["totals"]["params"] == sum(row.bytes_per_device for row in rows)
  # dp replicates: every device holds every fp32 parameter.
  assert r["dp"]["totals"]["params"] == 4 * progs["dp"].model_cfg.num_params()


def test_report_text_single_and_side_by_side(reports):
  progs, r = reports
  one = layout_report.format_one(progs["fsdp_tp"], r["fsdp_tp"])
  assert "blocks/mlp/down" in one and "(layers, mlp, embed)" in one
  assert "(None, tensor, fsdp)" in one and "all-gather" in one
  both = layout_report.format_compare([progs["dp"], progs["fsdp_tp"]],
                                      [r["dp"], r["fsdp_tp"]])
  assert "A: layout dp" in both and "B: layout fsdp_tp" in both
  assert footprint.shard_bytes(progs["dp"].abstract_batch()["inputs"]) == 2 * 128 * 4
