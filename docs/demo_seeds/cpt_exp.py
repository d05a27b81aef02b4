"""Session 7b screen: a pretraining recipe whose base copies carriers and tracking codes.

  PYTHONPATH=. python docs/demo_seeds/cpt_exp.py OUT key=value ...

Trains with the demo's pretraining stage (configs/demo.py:stage=pretrain, the sft trainer on
plain text), then probes every saved checkpoint, teacher-forced, on the 24 held-out tickets of
a shipped order in the base's own thread format ("Support ticket. <facts>\\nMessage: ..\\nReply:
\\n<reply>") and in the chat template: P(right carrier) at the reply's carrier token (0.25 = no
copying), greedy accuracy on the 8 code characters (~0.03-0.06 = no copying), on characters 2-8
(plain induction: the previous character is in the facts) and codes got whole.

Knobs: init=base (continued pretraining of ftjax/demo/base) | scratch (a new model of the shape
layers/heads/kv_heads) | an HF dir (e.g. an earlier run's OUT/base_hf: a curriculum); steps,
lr, sched (cosine|constant|linear), warm, min_lr, save (every K steps), seed; docs=N base
documents (support.make_base_corpus(N, cseed), cseed=1: fresh ones, not the shipped base's);
drill=F: a fraction F of them replaced by copy drills, kinds by `kinds` (comma list, equal
shares): ship = a support thread of a shipped order (the reply quotes
carrier and code), rep = two parcels' codes on file, then a line that quotes both again (the
code is most of the document's loss), codes (session 8) = four names with a carrier and code
each, then all four again in a shuffled order; pairs = the same with each name right before its
carrier ("Max FedEx AP5UB204, ..."), so a carrier (a word token) is copied from the token before.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from absl import logging  # noqa: E402

logging.set_verbosity(logging.WARNING)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ftjax import config as fcfg, workdir as wd  # noqa: E402
from ftjax.recipes import demo  # noqa: E402
from ftjax.tasks import support  # noqa: E402
from ftjax.train import sft  # noqa: E402

out = sys.argv[1]
K = dict(init="base", steps=1000, lr=3e-3, sched="constant", warm=20, min_lr=0.1, save=250,
         seed=0, docs=0, cseed=1, drill=0.5, kinds="ship,rep", layers=2, heads=4, kv_heads=2,
         d=128, mlp=384, bs=16, probe_only="")
for a in sys.argv[2:]:
  k, v = a.split("=", 1)
  K[k] = type(K[k])(v)


def thread(ticket):
  return support._thread_text(ticket)


def drills(n, rng):
  return support.copy_drills(n, rng, tuple(K["kinds"].split(",")))


def probe_rows():
  rows = [json.loads(line) for line in open(os.path.join(support.DATA_DIR, "eval.jsonl"))]
  return [r for r in rows if len(r["meta"]["required"]) == 4]


def probe(model, params, tok):
  res = {}
  carrier_id = {c: tok(" " + c, add_special_tokens=False)["input_ids"][0]
                for c in support.CARRIERS}
  for fmt in ("thread", "chat"):
    pc, acc, acc2, whole = [], [], [], 0
    for r in probe_rows():
      if fmt == "chat":
        ids = tok(tok.apply_chat_template(r["messages"], tokenize=False),
                  add_special_tokens=False)["input_ids"]
      else:
        ids = [tok.bos_token_id] + tok(thread(r), add_special_tokens=False)["input_ids"]
      lg = model.apply({"params": params}, np.array([ids], np.int32))
      lp = np.asarray(jax.nn.log_softmax(lg[0] if isinstance(lg, tuple) else lg, -1))[0]
      _, carrier, track, _ = r["meta"]["required"]
      at = max(i for i, t in enumerate(ids) if t == carrier_id[carrier])
      pc.append(float(np.exp(lp[at - 1, carrier_id[carrier]])))
      code = tok(" " + track, add_special_tokens=False)["input_ids"]
      at = max(i for i in range(len(ids) - len(code)) if ids[i:i + len(code)] == code)
      ok = [np.argmax(lp[at - 1 + j]) == code[j] for j in range(1, len(code))]  # the 8 chars
      acc.append(np.mean(ok))
      acc2.append(np.mean(ok[1:]))
      whole += all(ok)
    res[fmt] = dict(p_carrier=round(float(np.mean(pc)), 3), acc=round(float(np.mean(acc)), 3),
                    acc_2_8=round(float(np.mean(acc2)), 3), whole=whole)
  return res


# The scratch shape, registered before any config names it (load_trained rebuilds from it too).
fcfg.PRESETS["demo_x"] = fcfg.PRESETS["demo"].replace(
    n_layers=K["layers"], d_model=K["d"], n_heads=K["heads"], n_kv_heads=K["kv_heads"],
    mlp_dim=K["mlp"], head_dim=K["d"] // K["heads"])
os.makedirs(out, exist_ok=True)
t0 = time.time()
pre = os.path.join(out, "pretrain")
if not K["probe_only"]:
  cfg = demo.stage_config("demo", "stage=pretrain", False, K["seed"])
  if K["init"] == "base":
    cfg.model.hf_path = demo.BASE_DIR
  elif K["init"] != "scratch":  # an HF dir (a curriculum's first stage: its OUT/base_hf)
    cfg.model.hf_path = K["init"]
  else:
    cfg.model.preset = "demo_x"
    cfg.model.tokenizer = demo.BASE_DIR
  n = K["docs"] or K["steps"] * K["bs"] * 2 + 2000  # ~2 documents a 128-token row: one pass
  docs = support.make_base_corpus(n, K["cseed"])
  rng = np.random.default_rng(9000 + K["cseed"])
  pick = np.flatnonzero(rng.random(n) < K["drill"])
  for i, text in zip(pick, drills(len(pick), rng)):
    docs[i] = {"text": text}
  corpus = os.path.join(out, "corpus.jsonl")
  support.write_jsonl(corpus, docs)
  cfg.data.path = corpus
  cfg.optim.update(lr=K["lr"], warmup_steps=K["warm"], min_lr_ratio=K["min_lr"],
                   schedule=K["sched"])
  cfg.train.update(steps=K["steps"], batch_size=K["bs"], save_every=K["save"], keep=100,
                   log_every=100)
  t1 = time.time()
  sft.run(cfg, pre)
  K["train_s"] = round(time.time() - t1)
  K["cpu_train_s"] = round(sum(os.times()[:2]))
steps = sorted(int(s) for s in os.listdir(os.path.join(pre, "checkpoints")) if s.isdigit())
rows = []
if K["init"] == "base" and not K["probe_only"]:
  from ftjax import hf
  from ftjax.tokenizer import load_tokenizer
  m, p = hf.load_pretrained(demo.BASE_DIR)
  rows.append(dict(step=0, **probe(m, p, load_tokenizer(demo.BASE_DIR))))
  print("PROBE", json.dumps(rows[-1]), flush=True)
for s in steps:
  m, p, tok, _ = wd.load_trained(pre, s)
  rows.append(dict(step=s, **probe(m, p, tok)))
  print("PROBE", json.dumps(rows[-1]), flush=True)
if not K["probe_only"]:  # the last step as an HF base for sft_exp.py base=OUT/base_hf
  from ftjax import export
  export.export(pre, os.path.join(out, "base_hf"), "merged")
K["cpu_s"] = round(sum(os.times()[:2]))
K["wall_s"] = round(time.time() - t0)
json.dump(dict(knobs=K, probes=rows), open(os.path.join(out, "result.json"), "w"), indent=1)
print("RESULT", json.dumps(K))
