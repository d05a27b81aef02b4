"""Session 7 screen: the demo's SFT stage from the shipped base, one knob changed per run.

  PYTHONPATH=. python docs/demo_seeds/sft_exp.py OUT SEED key=value ...

Knobs (default: the demo's config of session 6): steps, lr, warm, min_lr, sched, rank, alpha
(0: 2*rank), targets, full (1: adapter none, lr full_lr), bs, seq; extra=N: N more generated
tickets of a shipped order (support.make_tickets(.., EXTRA_SEED) filtered, never the held-out
ones) appended to train.jsonl (only=1: instead of it); fresh=N: N more generated tickets of any
kind; base=DIR: another HF base (e.g. cpt_exp.py's OUT/base_hf); save=K: a checkpoint every K steps (for copy_tf.py). Prints the SFT
model's counts on all 120 held-out tickets and the misses by kind (why.py's).
"""
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from absl import logging  # noqa: E402

logging.set_verbosity(logging.WARNING)
from ftjax import evaluation, stats, workdir as wd  # noqa: E402
from ftjax.recipes import demo  # noqa: E402
from ftjax.tasks import support  # noqa: E402
from ftjax.train import sft  # noqa: E402

EXTRA_SEED = 11
out, seed = sys.argv[1], int(sys.argv[2])
K = dict(steps=300, lr=6e-3, warm=10, min_lr=0.1, sched="cosine", rank=32, alpha=0.0,
         targets="all-linear", full=0, full_lr=1e-3, bs=8, seq=256, extra=0, fresh=0, ev=0,
         save=0, only=0, base="")
for a in sys.argv[3:]:
  k, v = a.split("=", 1)
  K[k] = type(K[k])(v)
os.makedirs(out, exist_ok=True)
t0 = time.time()
cfg = demo.stage_config("demo", "stage=sft", False, seed)
cfg.model.hf_path = K["base"] or demo.BASE_DIR
if K["extra"] or K["fresh"]:
  rows = [json.loads(line) for line in open(os.path.join(support.DATA_DIR, "train.jsonl"))]
  rows = [] if K["only"] else rows  # only=1: the extra tickets alone
  if K["extra"]:
    gen = support.make_tickets(K["extra"] * 8, EXTRA_SEED)
    rows += [t for t in gen if t["meta"]["intent"] == "status"
             and len(t["meta"]["required"]) == 4][:K["extra"]]
  if K["fresh"]:
    rows += support.make_tickets(K["fresh"], EXTRA_SEED + 1)
  p = os.path.join(out, "train_mix.jsonl")
  support.write_jsonl(p, rows)
  cfg.data.path = p
if K["full"]:
  cfg.adapter.kind = "none"
  K["lr"] = K["full_lr"]
else:
  cfg.adapter.update(rank=K["rank"], alpha=float(K["alpha"] or 2 * K["rank"]),
                     targets=K["targets"])
cfg.optim.update(lr=K["lr"], warmup_steps=K["warm"], min_lr_ratio=K["min_lr"],
                 schedule=K["sched"])
cfg.train.update(steps=K["steps"], batch_size=K["bs"], seq_len=K["seq"],
                 eval_every=K["ev"] or 100000, save_every=K["save"] or K["steps"], keep=20,
                 log_every=50)
sd = os.path.join(out, "sft")
sft.run(cfg, sd)
t_sft = time.time() - t0
t1 = time.time()
model, params, tok, _ = wd.load_trained(sd)
rows = [json.loads(line) for line in open(os.path.join(support.DATA_DIR, "eval.jsonl"))]
prompts = [evaluation.split_chat(r)[0] for r in rows]
replies = evaluation.generate_replies(model, params, tok, prompts, 64, batch_size=120)
m = stats.add_wilson(evaluation.generation_metrics(replies, rows, support.score_reply))
miss = collections.Counter()
for r, rep in zip(rows, replies):
  for q in r["meta"]["required"]:
    if q not in rep:
      kind = ("oid" if q.startswith("#") else "date" if q[:3] in support.MONTHS else
              "carrier" if q in support.CARRIERS else "track" if len(q) == 8 else q)
      miss[kind] += 1
t_eval = time.time() - t1
res = dict(seed=seed, knobs=K, **{k: f"{m[k + '_k']}/{m[k + '_n']}"
                                  for k in ("details", "invented", "escalation_ok", "voice")},
           miss=dict(miss), sft_s=round(t_sft), eval_s=round(t_eval),
           cpu_s=round(sum(os.times()[:2])))
json.dump(dict(res, replies=replies), open(os.path.join(out, "result.json"), "w"), indent=1)
print("RESULT", json.dumps(res))
