"""Fine-tuning end to end: configs/sft.py:tiny learns the embedded instruction set (exact match),
init_from a spjax workdir, spjax-generate --prompts_file."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from spjax.convert import workdir as workdir_lib
from spjax.data import instruct, tokenizer
from spjax.infer import decode, exact_match
from spjax.model import model as model_lib
from spjax.train import loop as train
from spjax.train import program

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import sft  # noqa: E402  (configs/ is not a package)

# configs/sft.py:tiny reaches 0.641 on its held-out prompts (README, "Fine-tune"); the untrained
# model gets none right.
STATED_EXACT_MATCH = 0.6


def sft_tiny(**overrides):
  cfg = sft.get_config("tiny")
  cfg.update_from_flattened_dict(overrides)
  return cfg


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """A workdir of configs/sft.py:tiny as shipped, and its final metrics."""
  workdir = str(tmp_path_factory.mktemp("sft"))
  return workdir, train.train_and_evaluate(sft_tiny(log_every_steps=50), workdir)


def test_fine_tuned_tiny_reaches_the_stated_exact_match(tuned):
  workdir, final = tuned
  cfg = sft_tiny()
  tok = tokenizer.load("")
  held_out = exact_match.held_out(cfg, tok)
  assert len(held_out) == cfg.eval_exact_match
  untrained = model_lib.Transformer(model_lib.ModelConfig.from_config(cfg.model), nnx.Rngs(0))
  before, _ = exact_match.exact_match(untrained, held_out[:32], tok, "plain",
                                      max_prompt_tokens=cfg.seq_len, batch_size=32)
  assert before <= 0.05
  assert final["eval/exact_match"] >= STATED_EXACT_MATCH
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    scores = [m["eval/exact_match"] for m in map(json.loads, f) if "eval/exact_match" in m]
  assert scores == [final["eval/exact_match"]]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["data"]["chat_template"] == "plain"  # "auto", as resolved for the run
  # Loss on held-out completions fell well below the untrained level (log 1024 = 6.9).
  assert final["eval/loss"] < 0.6


def test_init_from_a_workdir_starts_from_its_checkpoint(tuned, tmp_path):
  source, _ = tuned
  trained, _ = workdir_lib.load(source)
  cfg = sft_tiny(num_train_steps=1, eval_every_steps=1, eval_batches=1, eval_exact_match=0,
                 **{"optimizer.learning_rate": 0.0})  # the step leaves the params as loaded
  last = sft_tiny().num_train_steps
  for spec in (source, f"{source}@{last}"):
    cfg.init_from = spec
    run = str(tmp_path / spec.replace("@", "_").replace("/", "_"))
    train.train_and_evaluate(cfg, run)
    got, _ = workdir_lib.load(run)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(got, nnx.Param),
                 nnx.state(trained, nnx.Param))
  cfg.init_from = f"{source}@7"
  with pytest.raises(ValueError, match=rf"has no checkpoint at step 7; it has \[{last}\]"):
    program.build(cfg)
  cfg.init_from = source
  cfg.model.mlp_dim = 256
  with pytest.raises(ValueError, match=r"holds a different model; to load it set "
                                       r"--config.model.mlp_dim=512 \(config has 256\)"):
    program.build(cfg)
  cfg.init_from = f"{tmp_path}@3"
  with pytest.raises(ValueError, match="is not an spjax workdir"):
    program.build(cfg)


def test_generate_from_a_prompts_file(tuned, tmp_path):
  workdir, _ = tuned
  tok = tokenizer.load("")
  rows = [{"prompt": " Human: Repeat: def class Assistant:", "id": 1},
          {"messages": [{"role": "user", "content": "Reverse: if else"}]},
          {"prompt": " Human: What is 2 plus 3? Assistant:", "chosen": " 5", "rejected": " 6"}]
  (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(
      [sys.executable, "-m", "spjax.infer.generate", f"--workdir={workdir}",
       f"--prompts_file={tmp_path / 'p.jsonl'}", f"--output={tmp_path / 'o.jsonl'}",
       "--max_new_tokens=12", "--batch_size=2"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "wrote 3 rows" in result.stdout
  with open(tmp_path / "o.jsonl") as f:
    out = [json.loads(line) for line in f]
  assert [{k: v for k, v in o.items() if k != "completion"} for o in out] == rows
  # Each completion is what the tuned model generates greedily from that row's rendered prompt.
  model, _ = workdir_lib.load(workdir)
  ids = [instruct.generation_prompt(r, "plain", tok, "row") for r in rows]
  want = decode.generate(model_lib.unrolled(model), ids, max_new_tokens=12,
                         stop_tokens=[tok.eos_id])
  assert [o["completion"] for o in out] == [tok.decode(w) for w in want]
  assert ids[1] == instruct.tokenize(instruct.to_example(
      {"messages": rows[1]["messages"] + [{"role": "assistant", "content": "x"}]}, "chat", "row",
      "plain", tok).parts[:-2], tok)[0].tolist()  # rendered as in training, up to the answer

  (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
  bad = subprocess.run(
      [sys.executable, "-m", "spjax.infer.generate", f"--workdir={workdir}",
       f"--prompts_file={tmp_path / 'bad.jsonl'}", f"--output={tmp_path / 'x.jsonl'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert 'bad.jsonl:1: a prompt row needs a string field "prompt"' in bad.stderr
