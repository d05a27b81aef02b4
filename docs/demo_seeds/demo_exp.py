"""Demo recipe screening (issue 19 item 3): knobs for data size, steps, lr; one seed per call.

python exp/demo_exp.py OUT SEED key=value ...
"""
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from absl import logging
logging.set_verbosity(logging.WARNING)
from ftjax import export, load_pretrained, workdir as wd
from ftjax.recipes import demo
from ftjax.tasks import support
from ftjax.tokenizer import load_tokenizer
from ftjax.train import sft

out, seed = sys.argv[1], int(sys.argv[2])
kv = dict(a.split("=", 1) for a in sys.argv[3:])
K = dict(pre_docs=0, pre_steps=1200, pre_lr=3e-3, pre_bs=16, pre_seq=128, sft_tickets=0,
         sft_steps=300, sft_lr=6e-3, rank=32, layers=2, d_model=128, heads=4, kv_heads=2,
         mlp=384, codes=0.0, threads=0.0, base="", save_every=0, pre_sched="", sft_bs=8, n_eval=120, min_lr=0.1, sft_warm=10, alpha=0)
for k, v in kv.items():
  K[k] = type(K[k])(v) if not isinstance(K[k], str) else v
os.makedirs(out, exist_ok=True)
t0 = time.time(); times = {}
tok_dir = demo.train_tokenizer(os.path.join(out, "tokenizer"))
cfg = demo.stage_config("demo", "stage=pretrain", False, seed)
cfg.model.tokenizer = tok_dir
if K["pre_docs"]:
  p = os.path.join(out, "pretrain_gen.jsonl")
  docs = support.make_pretraining_text(K["pre_docs"], 1000 + seed)
  if K["codes"]:
    import numpy as np
    r = np.random.default_rng(5000 + seed)
    al = list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789")
    for i in range(len(docs)):
      if r.random() < K["codes"]:
        c = "".join(r.choice(al, int(r.integers(8, 17))))
        n = support._pick(r, support.NAMES)
        docs[i] = {"text": f"Gift card for {n}: code {c}. To redeem, {n} enters the code {c} at checkout."}
  if K["threads"]:
    import numpy as np
    r = np.random.default_rng(7000 + seed)
    for i in range(len(docs)):
      if r.random() < K["threads"]:
        t = support._ticket(r)
        sys_, user, rep = (m["content"] for m in t["messages"])
        facts = sys_[len(support.SYSTEM) + 1:]
        docs[i] = {"text": f"Support ticket. {facts}\nMessage: {user}\nReply:\n{rep}"}
  support.write_jsonl(p, docs)
  cfg.data.path = p
from ftjax import config as fcfg
fcfg.PRESETS["demo_x"] = fcfg.PRESETS["demo"].replace(n_layers=K["layers"], d_model=K["d_model"], n_heads=K["heads"],
                 n_kv_heads=K["kv_heads"], mlp_dim=K["mlp"], head_dim=K["d_model"] // K["heads"])
cfg.model.preset = "demo_x"
cfg.optim.update(lr=K["pre_lr"], min_lr_ratio=K["min_lr"])
if K["pre_sched"]:
  cfg.optim.schedule = K["pre_sched"]
cfg.train.update(steps=K["pre_steps"], batch_size=K["pre_bs"], seq_len=K["pre_seq"],
                 save_every=K["save_every"] or K["pre_steps"], log_every=100, keep=20)
pre = os.path.join(out, "pretrain")
if K["base"]:
  base = K["base"]
else:
  sft.run(cfg, pre)
  base = export.export(pre, os.path.join(out, "base_hf"), "merged")
times["pre"] = time.time() - t0
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe
pr = probe.probe(base) if not K["base"] else None
if not K["sft_steps"]:
  print("RESULT", json.dumps(dict(seed=seed, probe=pr, pre=round(times["pre"]))))
  sys.exit(0)
t1 = time.time()
cfg = demo.stage_config("demo", "stage=sft", False, seed)
cfg.model.hf_path = base
if K["sft_tickets"]:
  p = os.path.join(out, "train_gen.jsonl")
  support.write_jsonl(p, support.make_tickets(K["sft_tickets"], 2000 + seed))
  cfg.data.path = p
cfg.adapter.update(rank=K["rank"], alpha=float(K["alpha"] or 2 * K["rank"]))
cfg.optim.update(lr=K["sft_lr"], warmup_steps=K["sft_warm"])
cfg.train.update(steps=K["sft_steps"], batch_size=K["sft_bs"], eval_every=100000,
                 save_every=K["sft_steps"], log_every=100)
sd = os.path.join(out, "sft")
sft.run(cfg, sd)
times["sft"] = time.time() - t1
t1 = time.time()
after = demo.evaluate(wd.load_trained(sd)[:3], K["n_eval"])
times["eval"] = time.time() - t1
m = demo._metrics(after)
res = dict(seed=seed, knobs=K, after=m, times=times, total=time.time() - t0,
           samples=after["samples"])
json.dump(res, open(os.path.join(out, "result.json"), "w"), indent=1)
print("RESULT", json.dumps(dict(seed=seed, **{k: m[k] for k in ("details", "invented", "escalation_ok", "voice", "eval_loss")}, **{k: round(v) for k, v in times.items()})))
print(json.dumps(after["samples"][:2], indent=0))
