import sys, json, collections
from ftjax import evaluation, workdir as wd
from ftjax.tasks import support
model, params, tok, _ = wd.load_trained(sys.argv[1])
rows = [json.loads(l) for l in open(support.DATA_DIR + "/eval.jsonl")]
prompts = [evaluation.split_chat(r)[0] for r in rows]
replies = evaluation.generate_replies(model, params, tok, prompts, 64, batch_size=120)
miss = collections.Counter(); ex = {}
for r, rep in zip(rows, replies):
  for q in r["meta"]["required"]:
    if q not in rep:
      kind = "oid" if q.startswith("#") else ("date" if q[:3] in support.MONTHS else ("carrier" if q in support.CARRIERS else ("track" if len(q) == 8 else q)))
      miss[kind] += 1; ex.setdefault(kind, (q, rep))
print(miss); [print(k, v) for k, v in ex.items()]
