"""The SFT data pipeline: formats (golden), malformed rows, overflow, packing, the iterator."""

import json

import numpy as np
import pytest

from ftjax.data import formats, packing, pipeline
from ftjax.data import (BatchIterator, DataError, build_dataset, load_records,
                        tokenize_example, tokenize_records)

END, BOS = 2, 1
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It shipped."},
        {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "On Monday."}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
  from ftjax.tokenizer import load_tokenizer
  return load_tokenizer(tiny_tokenizer_dir)


def ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def targets_text(tok, ex):
  return tok.decode(ex["tokens"][ex["loss_mask"]])


def write_jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


# --- formats: golden ---------------------------------------------------------------------------

def test_alpaca_golden(tok):
  # add_bos=True: BOS first although this tokenizer's tokenizer(text) adds none (the default).
  ex = tokenize_example({"instruction": "Say hi", "output": "hello world"}, tok, "alpaca",
                        add_bos=True)
  prompt = formats.ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi")
  np.testing.assert_array_equal(ex["tokens"], [BOS, *ids(tok, prompt), *ids(tok, "hello world"),
                                               END])
  assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == bool
  n_prompt = 1 + len(ids(tok, prompt))
  assert not ex["loss_mask"][:n_prompt].any() and ex["loss_mask"][n_prompt:].all()
  assert targets_text(tok, ex) == "hello world<|end|>"
  assert tok.decode(ex["tokens"]) == "<|bos|>" + prompt + "hello world<|end|>"

  rec = {"instr": "Return it", "ctx": "the blue jacket", "out": "Done."}
  ex = tokenize_example(rec, tok, "alpaca", add_bos=True,
                        fields={"instruction": "instr", "input": "ctx", "output": "out"})
  prompt = formats.ALPACA_PROMPT.format(instruction="Return it", input="the blue jacket")
  assert tok.decode(ex["tokens"]) == "<|bos|>" + prompt + "Done.<|end|>"
  assert "### Input:\nthe blue jacket" in prompt
  assert targets_text(tok, ex) == "Done.<|end|>"


def test_alpaca_with_chat_template(tok):
  rec = {"instruction": "Say hi", "input": "politely", "output": "hello world"}
  ex = tokenize_example(rec, tok, "alpaca", chat_template=True)
  msgs = [{"role": "user", "content": "Say hi\n\npolitely"},
          {"role": "assistant", "content": "hello world"}]
  assert tok.decode(ex["tokens"]) == tok.apply_chat_template(msgs, tokenize=False)
  assert targets_text(tok, ex) == "hello world<|end|>"


def test_prompt_completion_golden(tok):
  rec = {"prompt": "Where is my order?", "completion": " It shipped."}
  ex = tokenize_example(rec, tok, "prompt_completion", add_bos=True)
  p, c = ids(tok, "Where is my order?"), ids(tok, " It shipped.")
  np.testing.assert_array_equal(ex["tokens"], [BOS, *p, *c, END])
  np.testing.assert_array_equal(ex["loss_mask"], [False] * (1 + len(p)) + [True] * (len(c) + 1))
  assert targets_text(tok, ex) == " It shipped.<|end|>"
  ex = tokenize_example(rec, tok, "prompt_completion", loss_on_prompt=True)
  assert ex["loss_mask"].all()
  ex = tokenize_example({"q": "a", "a": "b"}, tok, "prompt_completion",
                        fields={"prompt": "q", "completion": "a"}, add_bos=False)
  np.testing.assert_array_equal(ex["tokens"], [*ids(tok, "a"), *ids(tok, "b"), END])


def test_text_golden(tok):
  ex = tokenize_example({"text": "hello world"}, tok, "text", add_bos=True)
  np.testing.assert_array_equal(ex["tokens"], [BOS, *ids(tok, "hello world"), END])
  assert ex["loss_mask"].all()
  # By default the special tokens are the tokenizer's own: this one adds no BOS.
  ex = tokenize_example({"text": "hello world"}, tok, "text")
  np.testing.assert_array_equal(ex["tokens"], [*tok("hello world")["input_ids"], END])


def test_chat_golden_multi_turn(tok):
  ex = tokenize_example({"messages": CHAT}, tok, "chat")
  rendered = tok.apply_chat_template(CHAT, tokenize=False)
  assert tok.decode(ex["tokens"]) == rendered  # the template is honoured, BOS included
  np.testing.assert_array_equal(ex["tokens"], ids(tok, rendered))
  # Every assistant turn (content + <|end|>) and nothing else.
  assert targets_text(tok, ex) == "It shipped.<|end|>On Monday.<|end|>"
  expected = [*ids(tok, "It shipped."), END, *ids(tok, "On Monday."), END]
  np.testing.assert_array_equal(ex["tokens"][ex["loss_mask"]], expected)
  # Exactly two contiguous target runs, each right after an "<|assistant|>\n" header.
  starts = np.flatnonzero(np.diff(ex["loss_mask"].astype(int)) == 1) + 1
  assert len(starts) == 2
  for s in starts:
    assert tok.decode(ex["tokens"][s - 2:s]) == "<|assistant|>\n"
  for special in (1, 3, 4, 5):  # bos, system, user, assistant headers are never targets
    assert not ex["loss_mask"][ex["tokens"] == special].any()
  ex = tokenize_example({"messages": CHAT}, tok, "chat", loss_on_prompt=True)
  assert ex["loss_mask"].all()


def test_chat_leading_assistant_turn(tok):
  msgs = [{"role": "assistant", "content": "Hi!"}, *CHAT[1:3]]
  ex = tokenize_example({"messages": msgs}, tok, "chat")
  assert tok.decode(ex["tokens"]) == tok.apply_chat_template(msgs, tokenize=False)
  assert targets_text(tok, ex) == "Hi!<|end|>It shipped.<|end|>"


def test_chat_field_mapping(tok):
  conv = [{"from": m["role"], "value": m["content"]} for m in CHAT[:3]]
  ex = tokenize_example({"conversations": conv}, tok, "chat",
                        fields={"messages": "conversations", "role": "from", "content": "value"})
  assert targets_text(tok, ex) == "It shipped.<|end|>"


def test_chat_needs_a_template(tok):
  import copy
  plain = copy.deepcopy(tok)
  plain.chat_template = None
  with pytest.raises(DataError, match="chat template"):
    tokenize_records([{"messages": CHAT}], plain, "chat", 64, skip_malformed=True)


def test_missing_jinja2_is_not_a_data_error(tok, monkeypatch):
  # A fresh `pip install -e .` once lacked jinja2: that must surface as the ImportError it is,
  # not as "row 1: field 'messages' is rejected by the chat template" (nor be skipped).
  from transformers.utils import chat_template_utils as ctu
  monkeypatch.setattr(ctu, "is_jinja_available", lambda: False)
  ctu._compile_jinja_template.cache_clear()
  try:
    with pytest.raises(ImportError, match="jinja2"):
      tokenize_records([{"messages": CHAT}], tok, "chat", 64, skip_malformed=True)
  finally:
    ctu._compile_jinja_template.cache_clear()


# --- malformed rows ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,row,message", [
    ("alpaca", {"instruction": "x"}, "field 'output' is missing"),
    ("alpaca", {"instruction": "x", "output": 3}, "field 'output' should be a string, got int"),
    ("alpaca", {"instruction": "x", "output": "  "}, "field 'output' is empty"),
    ("prompt_completion", {"prompt": "x", "completion": ""}, "field 'completion' is empty"),
    ("text", {"txt": "x"}, "field 'text' is missing"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]},
     "field 'messages[0].role' has unknown role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]},
     "field 'messages' has no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     "field 'messages[1].content' is missing"),
    ("chat", {"messages": "hi"}, "field 'messages' should be a non-empty list"),
])
def test_malformed_row_names_file_row_field(tok, tmp_path, fmt, row, message):
  good = {"alpaca": {"instruction": "a", "output": "b"},
          "prompt_completion": {"prompt": "a", "completion": "b"}, "text": {"text": "a"},
          "chat": {"messages": CHAT[1:3]}}[fmt]
  path = write_jsonl(tmp_path / "train.jsonl", [good, good, row, good])
  with pytest.raises(DataError) as err:
    tokenize_records(load_records({"path": path}), tok, fmt, 256)
  text = str(err.value)
  assert text.startswith(f"{path}: row 3: {message}") and "\n" not in text

  examples, stats = tokenize_records(load_records(path), tok, fmt, 256, skip_malformed=True)
  assert (len(examples), stats.skipped, stats.records) == (3, 1, 4)
  assert stats.errors[0].startswith(f"{path}: row 3: ")


def test_invalid_json_line_and_blank_lines(tok, tmp_path):
  path = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "a"}', "", '{"text": oops}'])
  with pytest.raises(DataError, match=r"bad\.jsonl: row 3: invalid JSON"):
    load_records(path)
  path = write_jsonl(tmp_path / "gap.jsonl", ['{"text": "a"}', "", '{"txt": "b"}'])
  with pytest.raises(DataError, match=r"gap\.jsonl: row 3: field 'text' is missing"):
    tokenize_records(load_records(path), tok, "text", 64)  # row numbers are line numbers


def test_skip_malformed_skips_invalid_json_lines(tok, tmp_path):
  # Line 2 holds a lone "\r" (text mode splits there), line 3 is broken JSON after a non-ASCII
  # prefix, line 4 is not UTF-8; rows keep their line numbers.
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b'{"text": "a"}\n{"text":\r "b"}\n{"text": "\xc3\xa9", oops}\n'
                   b'{"text": "\xff"}\n{"txt": "c"}\n{"text": "d"}\n')
  with pytest.raises(DataError) as err:
    load_records(str(path))
  # Python's own column for line 3 (1-based, in characters).
  with pytest.raises(json.JSONDecodeError) as ref:
    json.loads('{"text": "\u00e9", oops}')
  assert str(err.value) == (f"{path}: row 3: invalid JSON (Expecting property name enclosed in "
                            f"double quotes, column {ref.value.colno})")
  data = {"sources": [{"path": str(path)}], "format": "text", "skip_malformed": True}
  ds = build_dataset(data, tok, seq_len=16, batch_size=2)
  assert (ds.stats.records, ds.stats.skipped, ds.stats.examples) == (6, 3, 3)
  assert [e.split(": ")[1] for e in ds.stats.errors] == ["row 3", "row 4", "row 5"]
  assert "invalid UTF-8" in ds.stats.errors[1]


def test_data_errors_are_user_errors():
  from ftjax.errors import UserError
  assert issubclass(DataError, UserError)


# --- overflow ----------------------------------------------------------------------------------

def test_overflow_truncate_drop_split(tok):
  long = {"prompt": "hi", "completion": "hello world, this is a tiny corpus. " * 4}
  short = {"prompt": "hi", "completion": "ok"}
  n = len(tokenize_example(long, tok, "prompt_completion")["tokens"])
  seq_len = 16
  assert n > seq_len + 1
  ex, st = tokenize_records([long, short], tok, "prompt_completion", seq_len)
  assert (st.truncated, st.dropped, len(ex)) == (1, 0, 2)
  assert len(ex[0]["tokens"]) == seq_len + 1
  ex, st = tokenize_records([long, short], tok, "prompt_completion", seq_len, overflow="drop")
  assert (st.truncated, st.dropped, len(ex)) == (0, 1, 1)
  ex, st = tokenize_records([long], tok, "prompt_completion", seq_len, overflow="split")
  assert st.truncated == 1 and all(2 <= len(e["tokens"]) <= seq_len + 1 for e in ex)
  # Windows overlap by one token, so together they cover every target exactly once.
  full = tokenize_example(long, tok, "prompt_completion")
  assert sum(int(e["loss_mask"][1:].sum()) for e in ex) == int(full["loss_mask"][1:].sum())
  # A prompt longer than the row leaves no target after truncation: dropped.
  ex, st = tokenize_records([{"prompt": long["completion"], "completion": "ok"}], tok,
                            "prompt_completion", seq_len)
  assert (len(ex), st.dropped) == (0, 1)


# --- packing -----------------------------------------------------------------------------------

def synthetic_examples(lengths, seed=0):
  """Examples with distinct tokens (100 * id + position) and a random loss mask."""
  rng = np.random.default_rng(seed)
  out = []
  for i, n in enumerate(lengths):
    mask = rng.random(n) < 0.6
    mask[-1] = True
    out.append({"tokens": (1000 * (i + 1) + np.arange(n)).astype(np.int32), "loss_mask": mask})
  return out


def segments(batch):
  """(inputs, targets, weights, positions) tuples of every segment in a batch."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      m = seg == s
      out.append(tuple(tuple(batch[k][r, m].tolist())
                       for k in ("inputs", "targets", "weights", "positions")))
  return sorted(out)


def test_packing_layout():
  lengths = [5, 9, 3, 12, 4, 7, 2, 6]
  examples = synthetic_examples(lengths)
  seq_len = 16
  rows = packing.pack_rows([n - 1 for n in lengths], range(len(lengths)), seq_len)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  batch = packing.make_batch(examples, rows, seq_len, pad_id=0)
  assert set(batch) == set(packing.BATCH_KEYS)
  for k, dt in [("inputs", np.int32), ("targets", np.int32), ("weights", np.float32),
                ("segment_ids", np.int32), ("positions", np.int32)]:
    assert batch[k].dtype == dt and batch[k].shape == (len(rows), seq_len)
  for r, row in enumerate(rows):
    seg = batch["segment_ids"][r]
    expected_seg = np.concatenate([np.full(lengths[i] - 1, s) for s, i in enumerate(row, 1)])
    np.testing.assert_array_equal(seg[:len(expected_seg)], expected_seg)
    assert not seg[len(expected_seg):].any()  # right padding
    for s, i in enumerate(row, 1):
      m = seg == s
      tokens, mask = examples[i]["tokens"], examples[i]["loss_mask"]
      np.testing.assert_array_equal(batch["positions"][r, m], np.arange(lengths[i] - 1))
      np.testing.assert_array_equal(batch["inputs"][r, m], tokens[:-1])
      np.testing.assert_array_equal(batch["targets"][r, m], tokens[1:])  # never crosses
      np.testing.assert_array_equal(batch["weights"][r, m], mask[1:])
  # Targets stay inside their example: each target is its input + 1 (distinct token ranges).
  real = batch["segment_ids"] > 0
  np.testing.assert_array_equal(batch["targets"][real], batch["inputs"][real] + 1)
  assert not batch["weights"][~real].any()
  assert batch["weights"].sum() == sum(int(e["loss_mask"][1:].sum()) for e in examples)
  eff = packing.efficiency([n - 1 for n in lengths], rows, seq_len)
  assert eff == pytest.approx(real.sum() / real.size)
  assert len(rows) < len(lengths) and eff > 0.8


def test_packed_equals_unpacked_per_example():
  examples = synthetic_examples([5, 9, 3, 12, 4, 7, 2, 6, 17, 3, 8])
  it_p = BatchIterator(examples, 4, 16, seed=3, packing=True)
  it_u = BatchIterator(examples, 4, 16, seed=3, packing=False)
  packed = [packing.make_batch(examples, it_p.layout(0), 16)]
  unpacked = [packing.make_batch(examples, it_u.layout(0), 16)]
  assert segments(packed[0]) == segments(unpacked[0])
  assert len(segments(packed[0])) == len(examples)
  assert it_p.efficiency(0) > it_u.efficiency(0)
  with pytest.raises(ValueError, match="tokens"):
    BatchIterator(synthetic_examples([18]), 2, 16)


# --- the resumable iterator --------------------------------------------------------------------

def test_iterator_resumes_exactly():
  examples = synthetic_examples([3 + (i * 7) % 11 for i in range(23)])
  it = BatchIterator(examples, 4, 16, seed=7)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.state))  # JSON-able
  assert set(state) == {"epoch", "row"}
  after = [next(it) for _ in range(3)]
  resumed = BatchIterator(examples, 4, 16, seed=7, state=state)
  for a, b in zip(after, [next(resumed) for _ in range(3)]):
    for k in packing.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
  assert it.state == resumed.state


def test_iterator_epochs_and_shards():
  examples = synthetic_examples([4] * 10)
  it = BatchIterator(examples, 4, 8, seed=1, packing=False)
  batches = [next(it) for _ in range(5)]  # 20 rows: two epochs, batch 3 straddles them
  assert it.state == {"epoch": 2, "row": 0}
  first = [b["inputs"][:, 0] for b in batches]
  seen = np.concatenate(first)
  assert sorted(seen[:10]) == sorted(seen[10:]) == [1000 * (i + 1) for i in range(10)]
  assert not np.array_equal(seen[:10], seen[10:])  # reshuffled per epoch
  # Shards: disjoint row slices that make up the global batch.
  for packed in (False, True):
    glob = BatchIterator(examples, 4, 8, seed=1, packing=packed)
    shards = [glob.shard(i, 2) for i in range(2)]
    for _ in range(3):
      g = next(glob)
      parts = [next(s) for s in shards]
      for k in packing.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
    assert shards[0].state == shards[1].state == glob.state
  with pytest.raises(ValueError, match="divisible"):
    BatchIterator(examples, 3, 8, process_count=2)


def test_eval_batches_cover_all_once():
  examples = synthetic_examples([5, 6, 7, 3, 4])
  batches = pipeline.eval_batches(examples, 2, 8)
  assert len(batches) == 3 and not batches[-1]["segment_ids"][1].any()  # padding row
  total = sum(b["weights"].sum() for b in batches)
  assert total == sum(int(e["loss_mask"][1:].sum()) for e in examples)


# --- build_dataset end to end ------------------------------------------------------------------

def test_build_dataset(tok, tmp_path):
  import ml_collections
  alpaca = write_jsonl(tmp_path / "alpaca.jsonl",
                       [{"instr": f"Say {i}", "output": f"order {i} shipped"} for i in range(12)]
                       + [{"instr": "broken"}])
  chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
  cfg = ml_collections.ConfigDict({"data": {
      "sources": [{"path": alpaca, "weight": 1.0, "fields": {"instruction": "instr"}},
                  {"path": chat, "weight": 1.0, "format": "chat"}],
      "format": "alpaca", "packing": True, "overflow": "truncate", "skip_malformed": True,
      "loss_on_prompt": False, "eval_fraction": 0.25}})
  cfg.lock()
  data = build_dataset(cfg.data, tok, seq_len=128, batch_size=4, seed=0)
  st = data.stats
  assert st.records + data.eval_stats.records == 17  # 13 -> 3 eval, 4 -> 1 eval
  assert st.skipped + data.eval_stats.skipped == 1
  assert st.examples == st.records - st.skipped  # the mix keeps the epoch's size
  assert len(data.eval_examples) == 4 - data.eval_stats.skipped
  assert 0 < st.packing_efficiency <= 1 and st.rows >= 1
  assert "packing_efficiency" in str(st)
  b = next(data.train)
  assert b["inputs"].shape == (4, 128) and b["weights"].sum() > 0
  state = data.train.state
  nxt = next(data.train)
  again = build_dataset(cfg.data, tok, seq_len=128, batch_size=4, seed=0, state=state)
  np.testing.assert_array_equal(next(again.train)["inputs"], nxt["inputs"])
  ev = data.eval_batches(3)
  assert sum(e["weights"].sum() for e in ev) == data.eval_stats.target_tokens
