"""Does a model copy the carrier and the tracking code? Teacher-forced, on the 24 held-out
tickets of a shipped order (their reference replies in the chat template):

  PYTHONPATH=. python docs/demo_seeds/copy_tf.py ftjax/demo/base          # an HF directory
  PYTHONPATH=. python docs/demo_seeds/copy_tf.py W/sft [STEP]             # an SFT workdir

Prints the mean probability of the right carrier at the reply's carrier token (0.25: no
copying, the four carriers are equally likely) and the greedy accuracy on the tracking code's
tokens (about 0.03-0.06 without copying: 34 symbols).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ftjax import hf, workdir as wd  # noqa: E402
from ftjax.tasks import support  # noqa: E402
from ftjax.tokenizer import load_tokenizer  # noqa: E402

path, step = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
if os.path.exists(os.path.join(path, "checkpoints")):
  model, params, tok, _ = wd.load_trained(path, step)
else:
  model, params = hf.load_pretrained(path)
  tok = load_tokenizer(path)
rows = [json.loads(line) for line in open(os.path.join(support.DATA_DIR, "eval.jsonl"))]
rows = [r for r in rows if len(r["meta"]["required"]) == 4]
carrier_id = {c: tok(" " + c, add_special_tokens=False)["input_ids"][0] for c in support.CARRIERS}
p_carrier, acc_track = [], []
for r in rows:
  ids = tok(tok.apply_chat_template(r["messages"], tokenize=False),
            add_special_tokens=False)["input_ids"]
  logits = model.apply({"params": params}, np.array([ids], np.int32))
  lp = np.asarray(jax.nn.log_softmax(logits[0] if isinstance(logits, tuple) else logits, -1))[0]
  _, carrier, track, _ = r["meta"]["required"]
  at = max(i for i, t in enumerate(ids) if t == carrier_id[carrier])  # the reply's carrier
  p_carrier.append(float(np.exp(lp[at - 1, carrier_id[carrier]])))
  code = tok(" " + track, add_special_tokens=False)["input_ids"]
  at = max(i for i in range(len(ids) - len(code)) if ids[i:i + len(code)] == code)
  acc_track.append(np.mean([np.argmax(lp[at - 1 + j]) == code[j] for j in range(len(code))]))
print(f"P(right carrier) {np.mean(p_carrier):.3f}  tracking-token accuracy "
      f"{np.mean(acc_track):.3f}  ({len(rows)} tickets)")
