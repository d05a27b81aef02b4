"""Preference data: pair formats (golden), malformed rows, overflow, the paired iterator."""

import json

import numpy as np
import pytest

from ftjax.data import DataError, load_records
from ftjax.data import preference as pref

END, BOS, PAD = 2, 1, 0
PROMPT = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Where is my order?"},
          {"role": "assistant", "content": "It shipped."},
          {"role": "user", "content": "When?"}]
GOOD = {"role": "assistant", "content": "On Monday."}
BAD = {"role": "assistant", "content": "No idea."}
PAIR = {"prompt": "Where is my order?", "chosen": " It shipped.", "rejected": " No idea."}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
  from ftjax.tokenizer import load_tokenizer
  return load_tokenizer(tiny_tokenizer_dir)


def ids(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def response_text(tok, ex, side):
  return tok.decode(ex[side][ex[f"{side}_mask"]])


def assert_shared_prompt(ex):
  p = ex["prompt_len"]
  np.testing.assert_array_equal(ex["chosen"][:p], ex["rejected"][:p])
  for side in ("chosen", "rejected"):
    assert ex[side].dtype == np.int32 and ex[f"{side}_mask"].dtype == bool
    assert not ex[f"{side}_mask"][:p].any() and ex[f"{side}_mask"][p:].all()


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


# --- formats: golden -----------------------------------------------------------------------------

def test_pairs_golden(tok):
  ex = pref.tokenize_preference(PAIR, tok, "pairs", add_bos=True)  # BOS: the override
  p = ids(tok, "Where is my order?")
  np.testing.assert_array_equal(ex["chosen"], [BOS, *p, *ids(tok, " It shipped."), END])
  np.testing.assert_array_equal(ex["rejected"], [BOS, *p, *ids(tok, " No idea."), END])
  assert ex["prompt_len"] == 1 + len(p)
  assert_shared_prompt(ex)
  assert response_text(tok, ex, "chosen") == " It shipped.<|end|>"
  assert response_text(tok, ex, "rejected") == " No idea.<|end|>"

  rec = {"q": "hi", "good": "hello", "bad": "world"}
  ex = pref.tokenize_preference(rec, tok, "pairs", add_bos=False,
                                fields={"prompt": "q", "chosen": "good", "rejected": "bad"})
  np.testing.assert_array_equal(ex["chosen"], [*ids(tok, "hi"), *ids(tok, "hello"), END])


def test_pairs_with_chat_template(tok):
  rec = {"prompt": "Where is my order?", "chosen": "It shipped.", "rejected": "No idea."}
  ex = pref.tokenize_preference(rec, tok, "pairs", chat_template=True)
  user = [{"role": "user", "content": "Where is my order?"}]
  prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
  assert ex["prompt_len"] == len(ids(tok, prompt_text))
  for side, reply in (("chosen", "It shipped."), ("rejected", "No idea.")):
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": reply}],
                                   tokenize=False)
    np.testing.assert_array_equal(ex[side], ids(tok, full.rstrip()))  # ends at <|end|>
    assert response_text(tok, ex, side) == reply + "<|end|>"
  assert_shared_prompt(ex)
  # The chat layout with a prompt string and assistant-only turns is the same pair.
  chat = pref.tokenize_preference({"prompt": rec["prompt"], "chosen": [{**GOOD, "content": "It "
                                   "shipped."}], "rejected": [{**BAD}]}, tok, "chat")
  for k in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
    np.testing.assert_array_equal(chat[k], ex[k])


def test_chat_golden_multi_turn(tok):
  ex = pref.tokenize_preference({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}, tok,
                                "chat")
  prompt_text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  np.testing.assert_array_equal(ex["chosen"][:ex["prompt_len"]], ids(tok, prompt_text))
  assert_shared_prompt(ex)
  full = tok.apply_chat_template(PROMPT + [GOOD], tokenize=False)
  assert tok.decode(ex["chosen"]) == full.rstrip()
  np.testing.assert_array_equal(ex["chosen"], ids(tok, full.rstrip()))  # the template's tokens
  # Only the last assistant turn is the response; the earlier one is prompt.
  assert response_text(tok, ex, "chosen") == "On Monday.<|end|>"
  assert response_text(tok, ex, "rejected") == "No idea.<|end|>"
  np.testing.assert_array_equal(ex["chosen"][ex["chosen_mask"]], [*ids(tok, "On Monday."), END])
  assert tok.decode(ex["chosen"][ex["prompt_len"] - 2:ex["prompt_len"]]) == "<|assistant|>\n"


@pytest.mark.parametrize("record", [
    {"prompt": PROMPT, "chosen": [GOOD], "rejected": [BAD]},                  # separate prompt
    {"prompt": PROMPT, "chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]},  # both given
    {"prompt": "When?", "chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]},  # UltraFeedback
])
def test_chat_layouts_agree(tok, record):
  ref = pref.tokenize_preference({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}, tok,
                                 "chat")
  ex = pref.tokenize_preference(record, tok, "chat")
  assert ex["prompt_len"] == ref["prompt_len"]
  for k in ("chosen", "chosen_mask", "rejected", "rejected_mask"):
    np.testing.assert_array_equal(ex[k], ref[k])


def test_chat_field_mapping(tok):
  conv = lambda msgs: [{"from": m["role"], "value": m["content"]} for m in msgs]
  rec = {"good": conv(PROMPT + [GOOD]), "bad": conv(PROMPT + [BAD])}
  ex = pref.tokenize_preference(rec, tok, "chat", fields={
      "chosen": "good", "rejected": "bad", "role": "from", "content": "value"})
  assert response_text(tok, ex, "chosen") == "On Monday.<|end|>"


def test_chat_boundary_inside_a_token(tok, tiny_tokenizer_dir):
  # A template with no separator: "hello wor" + "ld, this" tokenizes "world" as one token
  # across the prompt/response boundary, so the response is tokenized on its own.
  from ftjax.tokenizer import load_tokenizer
  bare = load_tokenizer(tiny_tokenizer_dir)
  bare.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == "
                        "'assistant' %}<|end|>\n{% endif %}{% endfor %}")
  assert len(ids(bare, "hello world")) < len(ids(bare, "hello wor") + ids(bare, "ld"))
  rec = {"prompt": [{"role": "user", "content": "hello wor"}],
         "chosen": [{"role": "assistant", "content": "ld, this"}],
         "rejected": [{"role": "assistant", "content": "ld!"}]}
  ex = pref.tokenize_preference(rec, bare, "chat")
  np.testing.assert_array_equal(ex["chosen"], [*ids(bare, "hello wor"), *ids(bare, "ld, this"),
                                               END])
  assert_shared_prompt(ex)
  assert response_text(bare, ex, "chosen") == "ld, this<|end|>"


# --- malformed rows ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,row,message", [
    ("pairs", {"prompt": "a", "chosen": "same", "rejected": " same "},
     "field 'rejected' equals 'chosen'"),
    ("pairs", {"prompt": "a", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ("pairs", {"prompt": "a", "chosen": "b"}, "field 'rejected' is missing"),
    ("pairs", {"chosen": "a b", "rejected": "a b c"},
     "field 'chosen' has nothing after the prompt it shares with the other side"),
    ("pairs", {"prompt": "a", "chosen": [GOOD], "rejected": [BAD]},
     "field 'chosen' is a list: message lists take format=chat (or auto)"),
    ("chat", {"prompt": "a", "chosen": "b", "rejected": "c"},
     "field 'chosen' is a string: plain-text pairs take format=pairs (or auto)"),
    ("pairs", {"prompt": "a", "chosen": 3, "rejected": "c"}, "field 'chosen' should be a string"),
    ("chat", {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [GOOD]},
     "field 'rejected' equals 'chosen'"),
    ("chat", {"chosen": PROMPT + [GOOD], "rejected": PROMPT[:3] + [{"role": "user",
                                                                    "content": "Why?"}, BAD]},
     "field 'rejected' has a different prompt from 'chosen' (turn 3 differs)"),
    ("chat", {"chosen": PROMPT + [GOOD], "rejected": PROMPT[1:] + [BAD]},
     "field 'rejected' has a different prompt from 'chosen' (turn 0 differs)"),
    ("chat", {"chosen": PROMPT + [GOOD], "rejected": []},
     "field 'rejected' should be a non-empty list"),
    ("chat", {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [{**BAD, "content": " "}]},
     "field 'rejected[4].content' is empty"),
    ("chat", {"chosen": PROMPT + [GOOD]}, "field 'rejected' is missing"),
    ("chat", {"chosen": PROMPT + [GOOD, PROMPT[1]], "rejected": PROMPT + [BAD]},
     "field 'chosen' should end with an assistant turn"),
    ("chat", {"chosen": [GOOD], "rejected": [BAD]},
     "field 'chosen' has no prompt turns before the response"),
    ("chat", {"prompt": [{"role": "bot", "content": "x"}], "chosen": [GOOD], "rejected": [BAD]},
     "field 'prompt[0].role' has unknown role 'bot'"),
    ("chat", {"prompt": 3, "chosen": [GOOD], "rejected": [BAD]},
     "field 'prompt' should be a string or a list"),
])
def test_malformed_row_names_file_row_field(tok, tmp_path, fmt, row, message):
  good = {"pairs": PAIR, "chat": {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}}[fmt]
  path = write_jsonl(tmp_path / "prefs.jsonl", [good, good, row, good])
  with pytest.raises(DataError) as err:
    pref.tokenize_preference_records(load_records(path), tok, fmt, 256)
  text = str(err.value)
  assert text.startswith(f"{path}: row 3: {message}") and "\n" not in text

  examples, stats = pref.tokenize_preference_records(load_records(path), tok, fmt, 256,
                                                     skip_malformed=True)
  assert (len(examples), stats.skipped, stats.records, stats.examples) == (3, 1, 4, 3)
  assert stats.errors == [text]


def test_config_errors(tok, tiny_tokenizer_dir):
  from ftjax.tokenizer import load_tokenizer
  with pytest.raises(DataError, match="unknown preference format 'dpo'"):
    pref.tokenize_preference_records([PAIR], tok, "dpo", 64)
  with pytest.raises(DataError, match="unknown overflow mode 'split'"):
    pref.tokenize_preference_records([PAIR], tok, "pairs", 64, overflow="split")
  plain = load_tokenizer(tiny_tokenizer_dir)
  plain.chat_template = None
  with pytest.raises(DataError, match="chat template"):  # not hidden by skip_malformed
    pref.tokenize_preference_records([PAIR], plain, "chat", 64, skip_malformed=True)


# --- overflow ------------------------------------------------------------------------------------

LONG = "hello world, this is a tiny corpus. " * 4


def test_overflow_truncate_keeps_the_prompt(tok):
  short = {"prompt": "hi", "chosen": "ok", "rejected": "no"}
  long = {"prompt": "Where is my order?", "chosen": LONG, "rejected": " No."}
  full = pref.tokenize_preference(long, tok, "pairs")
  seq_len = 16
  assert len(full["chosen"]) > seq_len + 1 and len(full["rejected"]) <= seq_len + 1
  ex, st = pref.tokenize_preference_records([long, short], tok, "pairs", seq_len)
  assert (st.truncated, st.dropped, st.examples, len(ex)) == (1, 0, 2, 2)
  t = ex[0]
  assert t["prompt_len"] == full["prompt_len"] and len(t["chosen"]) == seq_len + 1
  np.testing.assert_array_equal(t["chosen"], full["chosen"][:seq_len + 1])
  np.testing.assert_array_equal(t["rejected"], full["rejected"])  # it fitted: unchanged
  assert_shared_prompt(t)
  ex, st = pref.tokenize_preference_records([long, short], tok, "pairs", seq_len,
                                            overflow="drop")
  assert (st.truncated, st.dropped, len(ex)) == (0, 1, 1)


def test_overflow_long_prompt_cut_from_the_left(tok):
  long = {"prompt": LONG, "chosen": " It shipped.", "rejected": " No idea."}
  full = pref.tokenize_preference(long, tok, "pairs", add_bos=True)
  seq_len = 12
  p = full["prompt_len"]
  assert p > seq_len + 1
  # max_prompt_length >= seq_len: the prompt takes all but one position.
  (t,), st = pref.tokenize_preference_records([long], tok, "pairs", seq_len,
                                              max_prompt_length=seq_len, add_bos=True)
  assert st.truncated == 1 and t["prompt_len"] == seq_len
  # BOS stays first, then the end of the prompt, then one response token.
  np.testing.assert_array_equal(t["chosen"], [BOS, *full["chosen"][p - seq_len + 1:p + 1]])
  assert_shared_prompt(t)
  assert t["chosen_mask"].sum() == t["rejected_mask"].sum() == 1

  # max_prompt_length: the prompt gives way to the response, down to max_prompt_length tokens.
  longest = max(len(full["chosen"]), len(full["rejected"])) - p
  for mpl, want in ((4, max(4, seq_len + 1 - longest)),
                    (None, max(seq_len // 2, seq_len + 1 - longest))):  # default: half
    (t,), _ = pref.tokenize_preference_records([long], tok, "pairs", seq_len,
                                               max_prompt_length=mpl)
    assert t["prompt_len"] == want < seq_len
    assert len(t["rejected"]) == seq_len + 1 or len(t["chosen"]) == seq_len + 1
    assert response_text(tok, t, "rejected").startswith(" No")
    assert_shared_prompt(t)
    assert not pref.identical_sides(t)
  with pytest.raises(DataError, match="max_prompt_length=-1"):
    pref.tokenize_preference_records([long], tok, "pairs", seq_len, max_prompt_length=-1)


def test_long_prompt_keeps_its_end_as_trl_does(tok):
  """TRL cuts a long prompt from the left (`prompt_ids[-max_prompt_length:]`) and keeps the
  responses whole when they fit; so do we, BOS kept first."""
  long = {"prompt": LONG * 3, "chosen": " It shipped on Monday.",
          "rejected": " I want to return the jacket."}
  full = pref.tokenize_preference(long, tok, "pairs", add_bos=True)
  p, seq_len, mpl = full["prompt_len"], 48, 20
  prompt = full["chosen"][1:p]  # without BOS, as TRL tokenizes it with this tokenizer
  (t,), _ = pref.tokenize_preference_records([long], tok, "pairs", seq_len, max_prompt_length=mpl,
                                             add_bos=True)
  assert t["prompt_len"] >= mpl
  k = t["prompt_len"] - 1
  np.testing.assert_array_equal(t["chosen"][:t["prompt_len"]], [BOS, *prompt[-k:]])
  for side in ("chosen", "rejected"):  # the responses fit after the prompt: whole
    np.testing.assert_array_equal(t[side][t["prompt_len"]:], full[side][p:])


def test_overflow_empty_prompt(tok):
  # No BOS and an empty prompt: the first response token has no input before it, so a row of one
  # position keeps two response tokens, the second one the only target.
  rec = {"prompt": "", "chosen": "hello world", "rejected": "this is"}
  (ex,), st = pref.tokenize_preference_records([rec], tok, "pairs", 1, add_bos=False)
  assert (ex["prompt_len"], st.truncated, st.target_tokens) == (0, 1, 2)
  np.testing.assert_array_equal(ex["chosen"], ids(tok, "hello world")[:2])


# --- batches -------------------------------------------------------------------------------------

def synthetic_pairs(n, seed=0, max_len=12):
  """Pairs with tokens 1000 * id + 100 * side + position, random prompt and response lengths."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p = int(rng.integers(1, 5))
    ex = {"prompt_len": p}
    for s, side in enumerate(("chosen", "rejected")):
      r = int(rng.integers(1, max_len - p + 1))
      prompt = 1000 * i + np.arange(p)
      resp = 1000 * i + 100 * (s + 1) + np.arange(r)
      ex[side] = np.concatenate([prompt, resp]).astype(np.int32)
      ex[f"{side}_mask"] = np.arange(p + r) >= p
    out.append(ex)
  return out


def test_batch_layout_chosen_rows_first():
  examples = synthetic_pairs(5)
  b, t = 3, 11
  it = pref.PreferenceIterator(examples, b, t, seed=1, pad_id=PAD)
  order = it.layout(0)
  batch = next(it)
  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  assert all(v.shape == (2 * b, t) for v in batch.values())
  assert batch["inputs"].dtype == np.int32 and batch["weights"].dtype == np.float32
  for row in range(b):
    ex = examples[order[row][0]]
    for side, r in (("chosen", row), ("rejected", b + row)):
      tokens, mask = ex[side], ex[f"{side}_mask"]
      n = len(tokens) - 1
      np.testing.assert_array_equal(batch["inputs"][r, :n], tokens[:-1])
      np.testing.assert_array_equal(batch["targets"][r, :n], tokens[1:])
      assert (batch["inputs"][r, n:] == PAD).all() and (batch["segment_ids"][r, n:] == 0).all()
      assert (batch["segment_ids"][r, :n] == 1).all()
      np.testing.assert_array_equal(batch["positions"][r, :n], np.arange(n))
      # Weights exactly on the response targets: the pair's response tokens, nothing else.
      np.testing.assert_array_equal(batch["targets"][r][batch["weights"][r] > 0], tokens[mask])
      p = ex["prompt_len"]
      assert (batch["weights"][r, :p - 1] == 0).all() and (batch["weights"][r, n:] == 0).all()
    # Matching rows: the same pair, so the same prompt.
    p = ex["prompt_len"]
    np.testing.assert_array_equal(batch["inputs"][row, :p], batch["inputs"][b + row, :p])


def test_iterator_resumes_exactly():
  examples = synthetic_pairs(7)
  it = pref.PreferenceIterator(examples, 3, 11, seed=2)
  for _ in range(4):  # crosses an epoch boundary (7 pairs, 3 per batch)
    next(it)
  state = json.loads(json.dumps(it.state))
  assert state == {"epoch": 1, "row": 5}
  expect = [next(it) for _ in range(3)]
  resumed = pref.PreferenceIterator(examples, 3, 11, seed=2, state=state)
  for want in expect:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # Another epoch, another order; another seed, another order.
  other = pref.PreferenceIterator(examples, 3, 11, seed=3)
  assert it.layout(0) != it.layout(1) and other.layout(0) != it.layout(0)


def test_iterator_process_shards():
  examples = synthetic_pairs(8)
  whole = pref.PreferenceIterator(examples, 4, 11, seed=0)
  shards = [whole.shard(i, 2) for i in range(2)]
  for _ in range(3):
    g = next(whole)
    parts = [next(s) for s in shards]
    for k in g:
      assert parts[0][k].shape == (4, 11)
      # Each process: its 2 chosen rows, then their 2 rejected rows.
      np.testing.assert_array_equal(np.concatenate([p[k][:2] for p in parts]), g[k][:4])
      np.testing.assert_array_equal(np.concatenate([p[k][2:] for p in parts]), g[k][4:])
  with pytest.raises(ValueError, match="not divisible"):
    pref.PreferenceIterator(examples, 3, 11, process_count=2)


def test_eval_batches_cover_all_once():
  examples = synthetic_pairs(5)
  batches = pref.eval_batches(examples, 2, 11, pad_id=PAD)
  assert len(batches) == 3 and all(b["inputs"].shape == (4, 11) for b in batches)
  seen = [int(b["inputs"][r, 0]) // 1000 for b in batches for r in range(2)
          if b["segment_ids"][r, 0]]
  assert seen == list(range(5))
  last = batches[-1]
  assert last["weights"][[1, 3]].sum() == 0 and last["segment_ids"][[1, 3]].sum() == 0
  np.testing.assert_array_equal(last["inputs"][0, :2], last["inputs"][2, :2])


# --- prompts for sampling ------------------------------------------------------------------------

def test_prompts_match_their_pairs(tok):
  chat = {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD]}
  for rec, fmt, kw in ((PAIR, "pairs", {}), (PAIR, "pairs", {"chat_template": True}),
                       (chat, "chat", {})):
    ex = pref.tokenize_preference(rec, tok, fmt, **kw)
    np.testing.assert_array_equal(pref.tokenize_prompt(rec, tok, fmt, **kw),
                                  ex["chosen"][:ex["prompt_len"]])
  # Prompt-only records: a message list, or a string.
  p = pref.tokenize_prompt({"prompt": PROMPT}, tok)
  text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  np.testing.assert_array_equal(p, ids(tok, text))
  np.testing.assert_array_equal(pref.tokenize_prompt({"prompt": "hi"}, tok), tok("hi")["input_ids"])
  np.testing.assert_array_equal(pref.tokenize_prompt({"prompt": "hi"}, tok, add_bos=True),
                                [BOS, *ids(tok, "hi")])


def test_prompt_batches_left_padded(tok, tmp_path):
  path = write_jsonl(tmp_path / "prompts.jsonl",
                     [{"prompt": "hi"}, {"prompt": PROMPT}, {"text": "x"}, {"prompt": LONG}])
  with pytest.raises(DataError, match=r"prompts\.jsonl: row 3: field 'prompt' is missing"):
    pref.tokenize_prompts(load_records(path), tok)
  prompts, st = pref.tokenize_prompts(load_records(path), tok, skip_malformed=True, max_len=50,
                                      add_bos=True)
  assert (st.examples, st.skipped, st.truncated) == (3, 1, 1)
  assert len(prompts[2]) == 50 and prompts[2][0] == BOS
  batches = pref.prompt_batches(prompts, 2, pad_id=PAD)
  assert len(batches) == 2
  first, last = batches
  n = [len(p) for p in prompts]
  assert first["tokens"].shape == (2, max(n[:2])) and first["valid"].all()
  for r in range(2):
    np.testing.assert_array_equal(first["tokens"][r, -n[r]:], prompts[r])
    assert first["mask"][r].sum() == n[r] and first["mask"][r, -1]
  assert last["valid"].tolist() == [True, False] and last["mask"][:, -1].all()


# --- the whole dataset ---------------------------------------------------------------------------

def test_build_preference_dataset(tok, tmp_path):
  pairs = [{"prompt": f"Where is order {i}?", "chosen": " It shipped.", "rejected": f" No {i}."}
           for i in range(8)]
  chats = [{"chosen": PROMPT + [{**GOOD, "content": f"On day {i}."}], "rejected": PROMPT + [BAD]}
           for i in range(4)]
  a = write_jsonl(tmp_path / "a.jsonl", pairs + [{"prompt": "x", "chosen": "y", "rejected": "y"}])
  b = write_jsonl(tmp_path / "b.jsonl", chats)
  ev = write_jsonl(tmp_path / "ev.jsonl", pairs[:3])
  cfg = {"sources": [{"path": a, "format": "pairs", "weight": 1.0},
                     {"path": b, "format": "chat", "weight": 3.0}],
         "format": "pairs", "skip_malformed": True, "eval_fraction": 0.25,
         "eval_sources": [{"path": ev}]}
  data = pref.build_preference_dataset(cfg, tok, 48, 4, seed=0)
  st = data.stats
  assert st.skipped + data.eval_stats.skipped == 1
  assert st.examples == st.records - st.skipped and st.rows == 2 * st.examples
  assert 0 < st.packing_efficiency <= 1
  assert len(data.eval_examples) == 2 + 1 - data.eval_stats.skipped + 3
  batch = next(data.train)
  assert batch["inputs"].shape == (8, 48)
  state = data.train.state
  again = pref.build_preference_dataset(cfg, tok, 48, 4, seed=0, state=state)
  np.testing.assert_array_equal(next(again.train)["inputs"], next(data.train)["inputs"])
  evals = data.eval_batches(2)
  assert sum(int((b["segment_ids"][:2, 0] > 0).sum()) for b in evals) == len(data.eval_examples)
  prompts = data.eval_prompt_batches(2)
  assert sum(int(b["valid"].sum()) for b in prompts) == len(data.eval_examples)
  with pytest.raises(DataError, match="no format"):
    pref.build_preference_dataset({"sources": [{"path": a}]}, tok, 48, 4)


# --- the rows TRL takes --------------------------------------------------------------------------

Q = [{"role": "user", "content": "Where is my order?"}]
TRL_LAYOUTS = {  # TRL's four preference layouts (docs: "Dataset formats")
    "standard_explicit": {"prompt": "Where is my order?", "chosen": " It shipped on Monday.",
                          "rejected": " No idea."},
    "standard_implicit": {"chosen": "Where is my order? It shipped on Monday.",
                          "rejected": "Where is my order? No idea."},
    "conversational_explicit": {"prompt": Q, "chosen": [GOOD], "rejected": [BAD]},
    "conversational_implicit": {"chosen": Q + [GOOD], "rejected": Q + [BAD]},
}


def test_auto_takes_trl_layouts_as_trl_does(tok, tmp_path):
  """Each of TRL's layouts through DPOTrainer's own dataset preparation (prompt extraction,
  conversational detection, tokenization) and through format=auto: same prompt and responses."""
  import types
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer
  args = DPOConfig(output_dir=str(tmp_path), dataset_num_proc=None, report_to=[], use_cpu=True,
                   bf16=False)
  for name, row in TRL_LAYOUTS.items():
    trl = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok),
                                      Dataset.from_list([row]), tok, args, name)[0]
    ex = pref.tokenize_preference(row, tok, "auto")
    p = ex["prompt_len"]
    prompt = list(ex["chosen"][:p])
    assert prompt == trl["prompt_ids"], name  # no BOS on plain text: tokenizer(text) adds none
    for side in ("chosen", "rejected"):
      response = list(ex[side][p:])
      # TRL keeps what the chat template puts after the end-of-turn token (a newline), which
      # ftjax leaves out of the sequence: compare up to the end-of-turn / EOS token.
      assert response == trl[f"{side}_ids"][:len(response)] and response[-1] == END, (name, side)
      assert tok.decode(trl[f"{side}_ids"][len(response):]).strip() == "", (name, side)


def test_identical_sides_after_truncation_are_refused_or_counted(tok, tmp_path):
  """A long prompt that leaves both sides the same response tokens: the pair teaches nothing.
  All such pairs: refused naming the file and the count; a budget for the prompt fixes them."""
  same_start = {"prompt": LONG * 2, "chosen": " It shipped on Monday.",
                "rejected": " It shipped never."}
  differ = {"prompt": "Where is my order?", "chosen": " It shipped.", "rejected": " No."}
  seq_len = 24
  (t,), _ = pref.tokenize_preference_records([same_start], tok, "pairs", seq_len,
                                             max_prompt_length=seq_len)
  assert pref.identical_sides(t)  # one response token, the same on both sides
  (t,), _ = pref.tokenize_preference_records([same_start], tok, "pairs", seq_len)
  assert not pref.identical_sides(t)  # the default budget leaves the responses room
  a = write_jsonl(tmp_path / "long.jsonl", [same_start] * 3)
  cfg = {"sources": [{"path": a}], "format": "pairs", "max_prompt_length": seq_len,
         "cache_dir": str(tmp_path / "cache")}
  with pytest.raises(DataError, match=r"long\.jsonl: all 3 preference pairs have identical.*"
                     r"max_prompt_length=24.*lower data\.max_prompt_length"):
    pref.build_preference_dataset(cfg, tok, seq_len, 2)
  assert not (tmp_path / "cache").exists()  # nothing cached for refused data
  b = write_jsonl(tmp_path / "mixed.jsonl", [same_start, differ, differ])
  data = pref.build_preference_dataset({**cfg, "sources": [{"path": b}]}, tok, seq_len, 2)
  assert pref.count_identical(data.train.examples) == 1
  # The older key name still works.
  legacy = {k: v for k, v in cfg.items() if k != "max_prompt_length"}
  with pytest.raises(DataError, match="all 3"):
    pref.build_preference_dataset({**legacy, "max_prompt_len": seq_len}, tok, seq_len, 2)
  pref.build_preference_dataset({**legacy, "cache_dir": "none"}, tok, seq_len, 2)
