"""DPO (and IPO, hinge, robust/cDPO) from an SFT model, on preference pairs.

  python experiments/dpo.py --config=configs/dpo.py --workdir=/tmp/dpo \
      --config.model.hf_path=/path/to/sft_hf --config.data.path=prefs.jsonl --config.dpo.beta=0.1

`data.path` is required (a comma list of files; `data.eval_path` optional): rows in any of TRL's
preference layouts (`data.format=auto`, the default), or `format=pairs|chat` to insist on one.
`data=support` picks the support demo's pairs instead (the gold reply beats one that invents an
order number, drops the brand voice or escalates wrongly; chat form) and their eval split. The
arg takes the keys of configs/sft.py (model=, adapter=, quant=, format=, smoke) plus
`loss=sigmoid|ipo|hinge|robust` and `data=support`; print the resolved config with
--print_config.
`dpo.reference`: auto (adapters off when training adapters, else a frozen copy of the initial
params) | precomputed (one pass over the data before training).
"""

import os

from configs import sft as sft_config
from ftjax.errors import UserError

ARG_KEYS = sft_config.ARG_KEYS + ("data", "loss")

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ftjax", "demo",
                    "data")


def get_config(arg=None, where="configs/dpo.py", known=ARG_KEYS):
  a = sft_config.parse_arg(arg, known, where)
  c = sft_config.get_config(",".join(p for p in (arg or "").split(",")
                                     if p.strip().partition("=")[0] in sft_config.ARG_KEYS))
  data = a.get("data", "")
  if data not in ("", "support"):
    raise UserError(f"{where}: data={data!r}: expected support (or no data= and "
                    "--config.data.path=FILE)")
  # No default files: a run on the user's data must not evaluate on the demo's.
  c.data.update(format=a.get("format", "auto"), path="", eval_path="")
  if data == "support":
    c.data.update(format="chat", path=os.path.join(DATA, "prefs_train.jsonl"),
                  eval_path=os.path.join(DATA, "prefs_eval.jsonl"))
  c.data.max_prompt_len = 0
  c.dpo = dict(beta=0.1, loss_type=a.get("loss", "sigmoid"), label_smoothing=0.0,
               reference="auto")
  c.optim.update(lr=5e-4 if c.adapter.kind != "none" else 5e-6, warmup_steps=10)
  c.train.update(steps=200, batch_size=8, seq_len=256, eval_every=50, save_every=50)
  if a.get("smoke"):
    c.train.update(steps=4, batch_size=4, seq_len=256, eval_every=2, save_every=2)
  return c
