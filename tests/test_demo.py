"""The support demo: its scorer, its shipped data, and the smoke config end to end."""

import json
import os

import numpy as np

from ftjax.recipes import demo
from ftjax.tasks import support
from tests.conftest import xla_defaults


def test_score_reply_catches_invented_and_missing_details():
  ex = support.make_tickets(40, 3)
  status = next(e for e in ex
                if e["meta"]["intent"] == "status" and len(e["meta"]["required"]) == 4)
  gold = status["messages"][-1]["content"]
  assert support.score_reply(gold, status) == {"details": 1.0, "invented": 0.0,
                                               "escalation_ok": 1.0, "voice": 1.0}
  oid = status["meta"]["required"][0]
  bad = gold.replace(oid, "#12345" if oid != "#12345" else "#54321")
  s = support.score_reply(bad, status)
  assert s["invented"] == 1.0 and s["details"] == 0.0
  s = support.score_reply(gold + " " + support.ESCALATION, status)
  assert s["escalation_ok"] == 0.0
  s = support.score_reply(gold.replace(support.SIGNATURE, "Bye"), status)
  assert s["voice"] == 0.0
  unknown = next(e for e in ex if e["meta"]["intent"] == "unknown")
  assert support.score_reply(unknown["messages"][-1]["content"], unknown)["escalation_ok"] == 1.0


def test_shipped_data_is_what_the_generator_makes(tmp_path):
  support.regenerate(str(tmp_path))
  for name in ("train", "eval", "pretrain"):
    assert (open(tmp_path / f"{name}.jsonl").read()
            == open(os.path.join(support.DATA_DIR, f"{name}.jsonl")).read()), name
  # Held-out tickets are not in the training set.
  train = {json.dumps(r["messages"]) for r in map(json.loads, open(tmp_path / "train.jsonl"))}
  ev = [json.dumps(r["messages"]) for r in map(json.loads, open(tmp_path / "eval.jsonl"))]
  assert not train.intersection(ev)


def test_demo_smoke_end_to_end(tmp_path):
  """The smoke with --pretrain: tokenizer, pretraining on the generated corpus, export, SFT,
  evals (CI's .ci/run runs the default smoke, from the shipped base)."""
  with xla_defaults():  # the demo's wider model and its generation: -O3 pays for its compile
    report = demo.run(str(tmp_path / "demo"), smoke=True, eval_examples=8, pretrain=True)
  assert report["pretrain_s"] > 0
  assert os.path.exists(tmp_path / "demo" / "base_corpus.jsonl")
  for stage in ("before", "after"):
    names = {k for k, _, _ in demo.METRICS}
    rates = names - {"eval_loss"}  # each rate comes with its counts, for its interval
    assert set(report[stage]) == names | {f"{k}_{c}" for k in rates for c in "kn"}
    for k in rates:
      assert report[stage][k] == report[stage][f"{k}_k"] / report[stage][f"{k}_n"]
    assert np.isfinite(report[stage]["eval_loss"])
  assert report["after"]["eval_loss"] < report["before"]["eval_loss"]
  assert os.path.exists(os.path.join(report["merged"], "model.safetensors"))
  assert os.path.exists(os.path.join(report["adapter"], "adapter_model.safetensors"))
  text = demo.format_report(report)
  assert "order details quoted correctly" in text and "customer:" in text
  n = report["after"]["invented_n"]
  assert n == 8 and f"invented {report['after']['invented_k']}/{n} (" in text


def test_seed_reaches_every_stage(tmp_path, monkeypatch):
  """--seed=7 sets train.seed, model.seed and data.seed (where a stage has one) of every stage
  the demo runs: pretraining, SFT, and the RL stages (the trainers are stubbed: no training)."""
  seen = []

  def record(name):
    def run(cfg, workdir):
      seen.append((name, cfg))
      return {}
    return run

  fake = {k: 0.5 for k, _, _ in demo.METRICS} | {"samples": []}
  monkeypatch.setattr(demo, "train_tokenizer", lambda d: d)
  monkeypatch.setattr(demo.sft, "run", record("sft"))
  monkeypatch.setattr(demo.grpo, "run", record("grpo"))
  monkeypatch.setattr(demo.reward, "run", record("reward"))
  monkeypatch.setattr(demo.ppo, "run", record("ppo"))
  monkeypatch.setattr(demo.export, "export", lambda src, out, kind: out)
  monkeypatch.setattr(demo, "load_pretrained", lambda path: (None, None))
  monkeypatch.setattr(demo, "load_tokenizer", lambda path: None)
  monkeypatch.setattr(demo.wd, "load_trained", lambda path: (None, None, None, None))
  monkeypatch.setattr(demo, "evaluate", lambda loaded, n: fake)
  monkeypatch.setitem(support.COPY_CORPUS, "n", 10)
  for rl in ("grpo", "ppo"):
    demo.run(str(tmp_path / rl), rl=rl, seed=7, pretrain=True)
  stages = [name for name, _ in seen]
  assert stages == ["sft", "sft", "grpo", "sft", "sft", "reward", "ppo"], stages
  for name, cfg in seen:
    assert cfg.train.seed == 7 and cfg.model.seed == 7, name
    # configs/common.py fixes data.seed=0; the demo must not leave it there.
    assert cfg.data.get("seed", 7) == 7, name
  assert "seed" in seen[0][1].data and "seed" in seen[1][1].data


def test_seed_table_flags_a_seed_that_misses_a_claim():
  """The per-seed table marks a seed that misses any claim and names the worst seed's count."""
  def report(seed, invented_k):
    after = {"eval_loss": 0.7}
    for k, n, hits in (("details", 100, 90), ("invented", 120, invented_k),
                       ("escalation_ok", 120, 120), ("voice", 120, 119)):
      after.update({k: hits / n, f"{k}_k": hits, f"{k}_n": n})
    return {"seed": seed, "after": after, "total_s": 100.0}

  reports = [report(0, 2), report(1, 3)]  # 2/120 = 1.7% meets invented <= 2%; 3/120 = 2.5% not
  assert [demo.meets_claims(r["after"]) for r in reports] == [True, False]
  table = demo.format_seed_table(reports)
  assert "1/2 seeds meet the claims" in table
  assert "| 1 | 90/100" in table and "| NO |" in table
  assert "- invented 3/120 (2.5%" in table and "(worst seed, 1)" in table


def test_base_corpus_is_seeded_fresh_text_half_of_it_threads():
  a, b = support.make_base_corpus(400, 0), support.make_base_corpus(400, 0)
  assert a == b and a != support.make_base_corpus(400, 1)
  threads = [d["text"] for d in a if d["text"].startswith("Support ticket. ")]
  assert 0.4 < len(threads) / len(a) < 0.6
  # A thread quotes its own facts in plain text, in the reply format of the chat tickets.
  t = threads[0]
  assert "\nMessage: " in t and "\nReply:\n" in t and t.endswith(support.SIGNATURE)
  assert support.SYSTEM not in t and "<|" not in t


def test_shipped_base_loads_in_transformers_with_its_tokenizer():
  """ftjax/demo/base (what the demo fine-tunes by default) is a plain HF checkpoint: transformers
  loads it, its logits equal ftjax's, and its tokenizer is the one `train_tokenizer` makes
  from the shipped text (so `--pretrain` rebuilds the same vocabulary)."""
  import torch
  import transformers as T
  from ftjax import load_pretrained
  from ftjax.tokenizer import load_tokenizer
  tok = load_tokenizer(demo.BASE_DIR)
  text = tok.apply_chat_template(support.prompt_messages(support.make_tickets(1, 9)[0]),
                                 add_generation_prompt=True, tokenize=False)
  ids = tok(text, add_special_tokens=False)["input_ids"]
  ref = T.AutoModelForCausalLM.from_pretrained(demo.BASE_DIR).eval()
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits.numpy()
  model, params = load_pretrained(demo.BASE_DIR)
  got = model.apply({"params": params}, np.array([ids], np.int32))
  got = got[0] if isinstance(got, tuple) else got
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_shipped_base_tokenizer_is_train_tokenizer_output(tmp_path):
  d = demo.train_tokenizer(str(tmp_path / "tok"))
  assert (json.load(open(os.path.join(d, "tokenizer.json")))
          == json.load(open(os.path.join(demo.BASE_DIR, "tokenizer.json"))))


def test_copy_corpus_repeats_each_drills_facts_later_in_the_document():
  """Half the documents are copy drills; a `codes` drill lists the same four (name, carrier,
  code) triples twice, so its second half is copying; `ship` threads quote the order's code."""
  import re
  a = support.make_copy_corpus(600, 0)
  assert a == support.make_copy_corpus(600, 0) and a != support.make_copy_corpus(600, 1)
  codes = [d["text"] for d in a if d["text"].startswith("Parcels on file. ")]
  ship = [d["text"] for d in a if "tracking" in d["text"].lower() and
          d["text"].startswith("Support ticket. ")]
  assert 0.2 < len(codes) / len(a) < 0.3 and ship
  triple = re.compile(r"(\w+): (UPS|DHL|FedEx|USPS) ([A-Z0-9]{8})\.")
  for t in codes:
    first, again = t.split("\nAgain: ")
    assert len(triple.findall(first)) == 4
    assert sorted(triple.findall(first)) == sorted(triple.findall(again))
