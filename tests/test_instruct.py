"""Instruction data: row shapes and their errors, templates, loss masks, packing, held-out rows."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx

from data_config import data_config
from spjax.data import files, instruct, pipeline, tokenizer
from spjax.model import model as model_lib

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tok():
  return tokenizer.load("")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def first_batch(config, tok, rows=1):
  return next(iter(pipeline.make_dataset(config, "train", tok, batch_size=rows)))


def test_train_on_prompt_gives_deepspeed_chats_step1_labels(tmp_path, tok):
  row = {"prompt": " Human: Name a Python keyword. Assistant:", "chosen": " yield",
         "rejected": " banana"}
  write_jsonl(tmp_path / "rm.jsonl", [row])
  cfg = data_config(SEQ_LEN, source=f"sft:{tmp_path}/*.jsonl", train_on_prompt=True,
                    eval_source=f"sft:{tmp_path}/*.jsonl")
  got = first_batch(cfg, tok)
  # DeepSpeed-Chat step 1, by hand: tokenize prompt + chosen + end-of-conversation token (here
  # the tokenizer's </s>), pad to the length, labels = input ids where attended, else -100; the
  # causal LM predicts labels[1:] from input_ids[:-1].
  ids = [tok.bos_id] + tok.encode(row["prompt"] + row["chosen"]) + [tok.eos_id]
  input_ids = np.zeros(SEQ_LEN + 1, np.int64)
  attention = np.zeros(SEQ_LEN + 1, bool)
  input_ids[:len(ids)], attention[:len(ids)] = ids, True
  labels = np.where(attention, input_ids, -100)
  # The row repeats (the train split cycles); its first segment is the example, then padding.
  first = got["segment_ids"][0] == 1
  assert first.sum() == attention[1:].sum()
  one = {k: np.where(first, v[0], 0) for k, v in got.items()}
  np.testing.assert_array_equal(one["inputs"][first], input_ids[:-1][attention[1:]])
  np.testing.assert_array_equal(one["loss_mask"], labels[1:] != -100)
  np.testing.assert_array_equal(one["targets"][first], labels[1:][labels[1:] != -100])

  # The default trains on the completion only: " yield" and </s>, nothing of the prompt.
  cfg.data.train_on_prompt = False
  got = first_batch(cfg, tok)
  first = got["segment_ids"][0] == 1
  trained = got["targets"][0][first & (got["loss_mask"][0] == 1)]
  assert tok.decode(trained[:-1]) == "yield" and trained[-1] == tok.eos_id
  assert got["loss_mask"][0][first].sum() == len(tok.encode(row["prompt"] + row["chosen"])) - len(
      tok.encode(row["prompt"])) + 1


def test_chat_rows_train_every_assistant_turn_and_nothing_else(tok):
  row = {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Say one."},
                      {"role": "assistant", "content": "one"},
                      {"role": "user", "content": "Say two."},
                      {"role": "assistant", "content": "two"}]}
  ex = instruct.to_example(row, "chat", "x:1", "plain", tok)
  ids, completion, _ = instruct.tokenize(ex.parts, tok)
  # The </s> decode to nothing; the text after one starts a new SentencePiece run, which gets its
  # dummy-prefix space (in training and at generation alike).
  assert tok.decode(ids) == ("System: Be brief.\n Human: Say one. Assistant: one  Human: Say two. "
                             "Assistant: two")
  assert list(ids).count(tok.eos_id) == 2
  # Trained tokens: exactly " one" </s> and " two" </s>.
  runs = np.split(ids[completion], np.where(np.diff(np.flatnonzero(completion)) > 1)[0] + 1)
  assert [tok.decode(r[:-1]) for r in runs] == ["one", "two"]
  assert all(r[-1] == tok.eos_id for r in runs)
  assert ex.reference() == " two"
  prompt, _, _ = instruct.tokenize(ex.parts[:ex.answer_at], tok)
  assert tok.decode(prompt).endswith("Say two. Assistant:")


def test_chatml_uses_the_tokenizers_own_pieces(tmp_path):
  texts = [f"line {i} of some text to learn pieces from" for i in range(200)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "t"),
                                 vocab_size=50, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                 minloglevel=2)
  tok = tokenizer.load(str(tmp_path / "t.model"))
  assert instruct.resolve_template("auto", tok) == "chatml"
  assert instruct.resolve_template("auto", tokenizer.load("")) == "plain"
  with pytest.raises(ValueError, match="needs the pieces <|im_start|> and <|im_end|>"):
    instruct.resolve_template("chatml", tokenizer.load(""))
  start, end = tok.piece_id("<|im_start|>"), tok.piece_id("<|im_end|>")
  row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "line"}]}
  ids, completion, _ = instruct.tokenize(instruct.to_example(row, "chat", "x", "chatml", tok).parts,
                                         tok)
  assert list(ids).count(start) == 2 and list(ids).count(end) == 2
  assert tok.decode(ids[completion][:-1]) == "line" and ids[completion][-1] == end
  assert instruct.stop_tokens("chatml", tok)[-1] == end


def test_packed_rows_never_attend_across_examples(tok):
  cfg = data_config(SEQ_LEN, source="sft:embedded")
  batch = first_batch(cfg, tok, rows=4)
  row = int(np.argmax(batch["segment_ids"].max(axis=1)))
  seg = batch["segment_ids"][row]
  assert seg.max() >= 2  # short examples: several per row
  cfg.model.dtype = "float32"
  model = model_lib.Transformer(model_lib.ModelConfig.from_config(cfg.model), nnx.Rngs(0))
  packed = model(jnp.asarray(batch["inputs"][row:row + 1]), jnp.asarray(batch["positions"][row:row + 1]),
                 jnp.asarray(seg[None]))[0]  # [T, V]
  for s in range(1, seg.max() + 1):
    where = np.flatnonzero(seg == s)
    assert batch["loss_mask"][row][where].any() and not batch["loss_mask"][row][where].all()
    alone = model(jnp.asarray(batch["inputs"][row, where][None]),
                  jnp.arange(len(where))[None], jnp.ones((1, len(where)), jnp.int32))[0]
    np.testing.assert_allclose(packed[where], alone, atol=2e-5)
  assert batch["loss_mask"][row][seg == 0].sum() == 0


def test_overlong_examples_are_truncated_from_the_prompt_side_or_refused(tmp_path, tok, capfd):
  long = {"prompt": " Human: " + "very " * 80 + "long. Assistant:", "completion": " short"}
  write_jsonl(tmp_path / "a.jsonl", [long, {"prompt": " Human: hi Assistant:", "completion": " yo"}])
  cfg = data_config(SEQ_LEN, source=f"sft:{tmp_path}/a.jsonl", eval_source=f"sft:{tmp_path}/a.jsonl")
  exs = instruct.examples(cfg, "train", tok)
  assert "1 of 2 train examples are longer than seq_len=64" in capfd.readouterr().err
  out = instruct.Tokenize(tok, SEQ_LEN, False).map(exs[0])
  assert len(out["inputs"]) == SEQ_LEN and out["inputs"][0] == tok.bos_id
  assert tok.decode(out["targets"][out["loss_mask"] == 1][:-1]) == "short"  # the answer survives
  assert tok.decode(out["inputs"][1:]).endswith("very long. Assistant: short")
  cfg.data.overlong = "refuse"
  with pytest.raises(ValueError, match=r"a\.jsonl:1: the example is \d+ tokens, longer than seq_len=64"):
    instruct.examples(cfg, "train", tok)
  cfg.data.overlong = "cut"
  with pytest.raises(ValueError, match="unknown data.overlong 'cut'; valid: truncate, refuse"):
    instruct.examples(cfg, "train", tok)


@pytest.mark.parametrize("rows,needle", [
    ([{"prompt": "a", "chosen": "b"}, {"prompt": "a", "rejected": "c"}],
     r"x\.jsonl:2: missing field \"chosen\" \(rows of this file are deepspeed_chat"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}],
     r"x\.jsonl:2: field \"completion\" is a int, not a string"),
    ([{"question": "a", "answer": "b"}], r"x\.jsonl:1: cannot tell the shape of this file"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}],
     r"x\.jsonl:1: messages\[1\] has role 'bot'; valid roles: system, user, assistant"),
    ([{"messages": [{"role": "user", "content": "a"}]}], r"x\.jsonl:1: messages has no assistant"),
    ([{"messages": [{"role": "assistant"}]}], r"x\.jsonl:1: messages\[0\] has no string field"),
    ([{"messages": []}], r"x\.jsonl:1: field \"messages\" must be a non-empty list"),
])
def test_each_bad_row_names_file_line_and_field(tmp_path, tok, rows, needle):
  write_jsonl(tmp_path / "x.jsonl", rows)
  cfg = data_config(SEQ_LEN, source=f"sft:{tmp_path}/x.jsonl")
  with pytest.raises(files.DataError, match=needle):
    instruct.examples(cfg, "train", tok)


def test_bad_lines_and_files_are_named_or_skipped(tmp_path, tok, capfd):
  (tmp_path / "x.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
  cfg = data_config(SEQ_LEN, source=f"sft:{tmp_path}/x.jsonl", eval_source=f"sft:{tmp_path}/x.jsonl")
  with pytest.raises(files.DataError, match=r"x\.jsonl:2: not a JSON line"):
    instruct.examples(cfg, "train", tok)
  cfg.data.bad_records = "skip"
  assert len(instruct.examples(cfg, "train", tok)) == 1
  assert "skipped 1 bad lines" in capfd.readouterr().err
  (tmp_path / "y.json").write_text('{"prompt": "a"}')
  cfg.data.source, cfg.data.bad_records = f"sft:{tmp_path}/y.json", "raise"
  with pytest.raises(files.DataError, match=r"y\.json: a \.json instruction file holds a list"):
    instruct.examples(cfg, "train", tok)
  cfg.data.source = f"sft:{tmp_path}/nothing*.jsonl"
  with pytest.raises(ValueError, match="matches no files"):
    instruct.examples(cfg, "train", tok)


def test_json_lists_zstd_and_held_out_rows(tmp_path, tok):
  import zstandard
  rows = [{"prompt": f" Human: {i}? Assistant:", "completion": f" {i}"} for i in range(200)]
  (tmp_path / "a.json").write_text(json.dumps(rows[:100]))
  (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
      "".join(json.dumps(r) + "\n" for r in rows[100:]).encode()))
  cfg = data_config(SEQ_LEN, source=f"sft:{tmp_path}/*")
  train, val = instruct.examples(cfg, "train", tok), instruct.examples(cfg, "validation", tok)
  assert len(train) + len(val) == 200 and 2 <= len(val) <= 25
  refs = {e.reference() for e in train}
  assert not refs & {e.reference() for e in val}  # disjoint
  assert val[0].where.startswith(str(tmp_path))
  # data.eval_source: every row of data.source trains, every row of eval_source is held out.
  cfg.data.eval_source = f"sft:{tmp_path}/a.json"
  assert len(instruct.examples(cfg, "train", tok)) == 200
  assert len(instruct.examples(cfg, "validation", tok)) == 100
  cfg.data.source, cfg.data.eval_source = "embedded", f"sft:{tmp_path}/a.json"
  with pytest.raises(ValueError, match="data.eval_source is for sft: sources"):
    pipeline.source(cfg, "train", tokenizer=tok)
