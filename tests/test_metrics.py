"""FLOPs per token, peak FLOP/s lookup, MetricWriter outputs, config.json."""

import json
import re
import types

import jax
import ml_collections
import pytest

from configs import default
from spjax.train import metrics
from spjax.train import program


def test_flops_per_token_by_hand():
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=100, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=32, tie_embeddings=True, gated_mlp=True))
  # Per layer: q 16*32 + o 32*16 = 1024, k + v 2*16*16 = 512, MLP 3*16*32 = 1536 -> 3072.
  # N = 2 layers * 3072 + unembedding 16*100 = 7744. Attention: 6 * 2 * 64 * 4 * 8 = 24576.
  assert metrics.flops_per_token(cfg, seq_len=64) == 6 * 7744 + 24576
  cfg.gated_mlp = False  # GPT-NeoX MLP: up and down only, one 16*32 = 512 matrix fewer per layer
  assert metrics.flops_per_token(cfg, seq_len=64) == 6 * (7744 - 2 * 512) + 24576


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
])
def test_peak_flops_table(kind, peak):
  device = types.SimpleNamespace(device_kind=kind, platform="tpu")
  assert metrics.peak_flops_per_device(device) == peak
  assert metrics.peak_flops_per_device(device, override_tflops=2.5) == 2.5e12


def test_peak_flops_on_cpu_is_measured_once():
  cpu = jax.devices()[0]
  measured = metrics.peak_flops_per_device(cpu)
  assert 1e8 < measured < 1e15
  assert metrics.peak_flops_per_device(cpu) == measured  # cached, not re-timed


def test_metric_writer_outputs(tmp_path, capsys):
  writer = metrics.MetricWriter(tmp_path, total_steps=200, is_primary=True)
  writer.write(10, {"train/loss": 4.5, "train/mfu": 0.25})
  writer.write(20, {"eval/loss": 4.0, "eval/perplexity": 54.6})
  writer.progress(110, 4.2, 999.0)
  writer.progress(120, 4.1234, 12345.4)
  writer.close()

  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 10, "train/loss": 4.5, "train/mfu": 0.25},
                   {"step": 20, "eval/loss": 4.0, "eval/perplexity": 54.6}]
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

  first, second = capsys.readouterr().out.splitlines()
  assert first == "step 110/200 | loss 4.200 | 999 tok/s | ETA ?"
  assert re.fullmatch(r"step 120/200 \| loss 4\.123 \| 12,345 tok/s \| ETA \d+:\d\d:\d\d", second)


def test_metric_writer_non_primary_writes_nothing(tmp_path, capsys):
  writer = metrics.MetricWriter(tmp_path / "run", total_steps=10, is_primary=False)
  writer.write(1, {"train/loss": 1.0})
  writer.progress(1, 1.0, 1.0)
  writer.close()
  assert not (tmp_path / "run").exists()
  assert capsys.readouterr().out == ""


def test_write_config(tmp_path):
  config = ml_collections.ConfigDict({"seed": 3, "optimizer": {"name": "adamw"}})
  metrics.write_config(tmp_path, config)
  assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()


@pytest.mark.parametrize("rank", [0, 8])
def test_flops_per_token_of_a_program_counts_lora_honestly(rank):
  """Under LoRA the frozen base costs 4 FLOPs per weight (forward, input gradients), adapters 6."""
  config = default.get_config("tiny")
  config.lora.rank = rank
  prog = program.build(config)
  m = prog.model_cfg
  D, F, L, V, T = m.d_model, m.mlp_dim, m.num_layers, m.vocab_size, config.seq_len
  q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  n = L * (2 * D * q + 2 * D * kv + 3 * D * F) + D * V  # q, o, k, v, gate, up, down; unembedding
  # rank r adapters on every default target: A [in, r] + B [r, out] per kernel per layer.
  adapters = L * rank * (2 * (D + q) + 2 * (D + kv) + 3 * (D + F))
  attention = 6 * L * T * q
  expected = (4 * n + 6 * adapters if rank else 6 * n) + attention
  assert prog.flops_per_token() == expected
  assert m.gated_mlp and config.lora.targets == ("attn/(q|k|v|o)$", "mlp/(gate|up|down)$")


def test_flops_per_token_of_a_program_adds_the_teachers_forward(tmp_path):
  """A distillation teacher runs forward only: 2 FLOPs per weight, 2 L T H Dh for attention."""
  teacher = default.get_config("tiny")
  teacher.model.num_layers = 3
  metrics.write_config(tmp_path, teacher)  # config.json is all the shapes need
  config = default.get_config("tiny")
  student = program.build(config).flops_per_token()
  config.distill.teacher = str(tmp_path)
  prog = program.build(config)
  m = prog.model_cfg
  D, F, V, T = m.d_model, m.mlp_dim, m.vocab_size, config.seq_len
  q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  forward = 3 * (2 * (2 * D * q + 2 * D * kv + 3 * D * F) + 2 * T * q) + 2 * D * V
  assert prog.flops_per_token() == student + forward
