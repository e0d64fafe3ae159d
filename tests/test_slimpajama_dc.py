"""SlimPajama-DC: the mixture presets, the reproduction configs, and the time-to-train estimates."""

import json
import os
import sys

import pytest

from configs import slimpajama_dc
from spjax.data import mixtures
from spjax.model.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import slimpajama_dc as experiment  # noqa: E402  (experiments/ is a folder of scripts)

# Zeng et al. 2025 (arXiv 2504.12491), Appendix Table 3 (Shen et al.'s configurations), in percent.
TABLE = {
    "DC-1": {"CommonCrawl": 100.0},
    "DC-2": {"CommonCrawl": 90.9, "GitHub": 9.1},
    "DC-3": {"CommonCrawl": 75.8, "GitHub": 24.2},
    "DC-4": {"CommonCrawl": 75.8, "Wikipedia": 24.2},
    "DC-5": {"CommonCrawl": 75.8, "GitHub": 9.1, "Book": 7.9, "Wikipedia": 7.3},
    "DC-6": {"CommonCrawl": 52.2, "C4": 26.7, "GitHub": 5.2, "Book": 4.2, "ArXiv": 4.6,
             "Wikipedia": 3.8, "StackExchange": 3.3},
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_dc_preset_matches_the_table(name):
  parsed = mixtures.parse(name)
  assert set(parsed) == set(TABLE[name])
  for domain, percent in TABLE[name].items():
    assert abs(parsed[domain] * 100 - percent) <= 0.05 + 1e-9, (name, domain)  # to the table's 0.1%


@pytest.mark.parametrize("name", ["DC-1", "DC-2", "DC-3", "DC-4", "DC-5"])
def test_dc_shares_are_whole_billions_of_330b(name):
  # The old DC-4 of 75/25 made 247.5B + 82.5B and fails here.
  billions = [share * 330 for share in mixtures.parse(name).values()]
  assert billions == pytest.approx([round(b) for b in billions], abs=1e-9), billions


@pytest.mark.parametrize("name", slimpajama_dc.NAMES)
def test_reproduction_configs(name):
  c = slimpajama_dc.get_config(f"{name}:/data/sp")
  assert c.data.source == "slimpajama:/data/sp" and c.data.mixture == name
  model = ModelConfig.from_config(c.model)
  assert 1.25e9 < model.num_params() < 1.35e9  # the study's "1.3B"
  assert (model.num_layers, model.d_model, model.num_heads, model.mlp_dim) == (24, 2048, 16, 5461)
  assert model.tie_embeddings and model.norm == "layernorm" and model.gated_mlp
  assert c.seq_len == 2048
  assert c.per_device_batch_size * 64 * c.grad_accum_steps == slimpajama_dc.GLOBAL_BATCH
  tokens = c.num_train_steps * slimpajama_dc.GLOBAL_BATCH * c.seq_len
  assert 330e9 <= tokens < 330e9 + slimpajama_dc.GLOBAL_BATCH * c.seq_len


def test_config_errors_name_the_choice():
  with pytest.raises(ValueError, match="valid: DC-1, DC-2"):
    slimpajama_dc.get_config("DC-7")
  with pytest.raises(ValueError, match="does not split over 48 chips"):
    slimpajama_dc.batch_for(48)
  assert slimpajama_dc.batch_for(256) == (4, 2) and slimpajama_dc.batch_for(64, 8) == (8, 4)


def fake_aot(calls):
  """Stands in for tools/aot_tpu.py: writes the JSON it would, with a step time per chip count."""
  def run(topology, layout, per_device, accum, out_json):
    calls.append((topology, layout))
    chips = experiment.chips_of(topology)
    result = {"chips": chips, "layout": layout, "per_device_batch_size": per_device,
              "grad_accum_steps": accum, "tokens_per_step": per_device * chips * accum * 2048,
              "fits": layout != "dp", "memory_gib_per_device": 9.0,
              "estimated_step_seconds": 64.0 / chips * (1.5 if layout == "fsdp_tp" else 1.0),
              "estimated_mfu": 0.5, "compile_seconds": 100.0}
    with open(out_json, "w") as f:
      json.dump(result, f)
  return run


def test_estimates_compile_once_per_topology_and_layout_then_reuse(tmp_path):
  calls = []
  topologies = ["v5e:8x8", "v5e:16x16"]
  results = experiment.rows(list(slimpajama_dc.NAMES), topologies, ["dp", "fsdp", "fsdp_tp"],
                            str(tmp_path), runner=fake_aot(calls))
  # six configurations share each compile: 2 topologies x 3 layouts, not x 6
  assert sorted(calls) == sorted((t, l) for t in topologies for l in ("dp", "fsdp", "fsdp_tp"))
  assert len(results) == 12 and {r["layout"] for r in results} == {"fsdp"}  # fastest that fits
  row = next(r for r in results if r["config"] == "DC-4" and r["topology"] == "v5e:16x16")
  steps = slimpajama_dc.get_config("DC-4").num_train_steps
  assert row["batch"] == "4 x 256 x 2" and row["steps"] == steps
  assert row["days"] == pytest.approx(steps * 0.25 / 86400)
  assert row["chip_hours"] == pytest.approx(steps * 0.25 * 256 / 3600)
  again = experiment.rows(["DC-1"], topologies, ["fsdp"], str(tmp_path), runner=fake_aot(calls))
  assert len(calls) == 6 and again[0]["step_seconds"] == 1.0  # all from the cache
  table = experiment.table(results)
  assert table.count("\n") == 13 and "| DC-5 | v5e:8x8 | 64 | fsdp | 4 x 64 x 8 |" in table


def test_estimates_refuse_a_batch_that_is_not_the_studys(tmp_path):
  def wrong(topology, layout, per_device, accum, out_json):
    fake_aot([])(topology, layout, per_device * 2, accum, out_json)
  with pytest.raises(RuntimeError, match="not the study's 4194304"):
    experiment.rows(["DC-1"], ["v5e:8x8"], ["fsdp"], str(tmp_path), runner=wrong)
