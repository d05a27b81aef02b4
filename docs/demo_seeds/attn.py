"""Where the base's heads look when it writes the carrier and the month of a shipped-order reply
(the first such held-out ticket, thread format; transformers, eager attention):

  PYTHONPATH=. python docs/demo_seeds/attn.py
"""
import json
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch  # noqa: E402
import transformers as T  # noqa: E402
from ftjax.tasks import support
from ftjax.tokenizer import load_tokenizer
from ftjax.recipes import demo
base = demo.BASE_DIR
tok = load_tokenizer(base)
m = T.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
rows = [json.loads(l) for l in open(support.DATA_DIR + "/eval.jsonl")]
r = [r for r in rows if len(r["meta"]["required"]) == 4][0]
system, user, reply = (x["content"] for x in r["messages"])
text = f"Support ticket. {system[len(support.SYSTEM) + 1:]}\nMessage: {user}\nReply:\n{reply}"
ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
toks = tok.convert_ids_to_tokens(ids)
with torch.no_grad():
  out = m(torch.tensor([ids]), output_attentions=True)
def show(pos, what):
  print(what, "query at", pos, repr(toks[pos]), "-> next", repr(toks[pos + 1]))
  for l, a in enumerate(out.attentions):
    for h in range(a.shape[1]):
      w = a[0, h, pos]
      top = torch.topk(w, 4)
      print(f"  L{l}H{h}", [(int(i), toks[int(i)], round(float(v), 2))
                            for v, i in zip(top.values, top.indices)])
n = len(ids)
wpos = max(i for i in range(n) if toks[i] == "Ġwith")
show(wpos, "carrier")
opos = max(i for i in range(n) if toks[i] == "Ġon")
show(opos, "month")
print([(i, t) for i, t in enumerate(toks)][:45])
