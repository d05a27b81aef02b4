"""The base on the 24 held-out tickets of a shipped order, in its own pretraining format (the
plain-text support thread of support.make_base_corpus), greedy:

  PYTHONPATH=. python docs/demo_seeds/base_thread.py [HF_DIR]     # default: ftjax/demo/base

Prints each reply and how many quote the order number, carrier, tracking code and date.
"""
import json
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
from ftjax import hf, rollout
from ftjax.tokenizer import load_tokenizer
from ftjax.tasks import support
from ftjax.recipes import demo
base = sys.argv[1] if len(sys.argv) > 1 else demo.BASE_DIR
model, params = hf.load_pretrained(base)
tok = load_tokenizer(base)
rows = [json.loads(l) for l in open(support.DATA_DIR + "/eval.jsonl")]
rows = [r for r in rows if len(r["meta"]["required"]) == 4]
ids = []
for r in rows:
  system, user = r["messages"][0]["content"], r["messages"][1]["content"]
  facts = system[len(support.SYSTEM) + 1:]
  text = f"Support ticket. {facts}\nMessage: {user}\nReply:\n"
  ids.append([tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"])
ro = rollout.rollout(model, params, ids, n_samples=1, max_new_tokens=48,
                     rng=jax.random.PRNGKey(0), temperature=0.0,
                     eos_ids=rollout.eos_ids(tok, model), pad_id=rollout.pad_id(tok))
ok = [0] * 4
for r, t in zip(rows, rollout.decode(tok, ro)):
  req = r["meta"]["required"]
  for i, q in enumerate(req):
    ok[i] += q in t
  print(req, repr(t[:110]))
print("copied oid/carrier/track/date", ok, "of", len(rows))
