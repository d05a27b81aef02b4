"""Configs of the reproductions under docs/reproductions/ (run by experiments/repro.py).

  python experiments/repro.py --name=lora_rank        # stage=sft from the shipped demo base
  python experiments/sft.py --config=configs/repro.py:stage=sft,replay=1 --workdir=/tmp/r \
      --config.model.hf_path=/path/to/base_hf

The support demo at CPU scale. experiments/repro.py fine-tunes the session-7 demo base
(ftjax/demo/base_v1) with stage=sft and measures forgetting on fresh documents of that base's
corpus generator (ftjax/recipes/repro.py: general_eval_file). stage=base is the older tiny base
(the first GENERAL_TRAIN rows of pretrain.jsonl; the rest are the general-text split that
replay=W mixes in without replay_from).
Arg keys:
  stage=base|sft   base: the demo base pretrained on the general-text split (full training);
                   sft: LoRA SFT on the support tickets (the demo's sft stage, fewer steps)
  replay=W         sft only: mix the general-text split into the SFT data with weight W against
                   the support tickets' 1 (`data.sources` weights: W / (1 + W) of the mix)
  replay_from=P    sft only: replay the text file P (format text, with BOS) instead of the
                   general-text split (experiments/repro.py: the shipped base's own pretraining
                   documents, WORKDIR/replay_general.jsonl)
  smoke            a few steps (CI)
Print the resolved config with --print_config.
"""

import os

from configs import common
from configs import demo as demo_config
from ftjax.errors import UserError

ARG_KEYS = ("stage", "replay", "replay_from", "smoke")

PRETRAIN = os.path.join(common.DEMO_DATA, "pretrain.jsonl")
GENERAL_TRAIN = 3600  # rows of pretrain.jsonl the base sees; rows after it are held out


def get_config(arg=None):
  a = common.parse_arg(arg, ARG_KEYS, "configs/repro.py")
  stage = a.get("stage", "sft")
  smoke = bool(a.get("smoke"))
  if stage not in ("base", "sft"):
    raise UserError(f"configs/repro.py: stage={stage!r}: expected base or sft")
  # add_bos: the demo's base pretrains on this text with BOS first (configs/demo.py); the
  # replayed rows keep that.
  general = {"path": PRETRAIN, "format": "text", "limit": GENERAL_TRAIN, "add_bos": True}
  if stage == "base":
    if "replay" in a or "replay_from" in a:
      raise UserError("configs/repro.py: replay= and replay_from= apply to stage=sft only")
    c = demo_config.get_config("stage=pretrain")
    c.data.path = ""
    c.data.sources = [general]
    # Far fewer steps than the demo's 1200: a base that already speaks the retail text, so that
    # forgetting it shows, in about a minute of CPU.
    c.train.update(steps=4 if smoke else 150, save_every=4 if smoke else 150)
    return c
  c = demo_config.get_config("stage=sft")
  steps = 3 if smoke else 40
  c.train.update(steps=steps, batch_size=8, eval_every=steps, save_every=steps, log_every=5,
                 eval_batches=2)
  c.optim.update(warmup_steps=1 if smoke else 5)
  if smoke:  # CI's tiny models are narrower than the demo's rank 32
    c.adapter.update(rank=4, alpha=8.0)
  if "replay_from" in a and "replay" not in a:
    raise UserError("configs/repro.py: replay_from= needs replay=W (its weight)")
  if "replay" in a:
    try:
      weight = float(a["replay"])
    except (TypeError, ValueError):
      raise UserError(f"configs/repro.py: replay={a['replay']!r}: expected a number") from None
    if a.get("replay_from"):
      general = {"path": str(a["replay_from"]), "format": "text", "add_bos": True}
    c.data.path = ""
    c.data.sources = [{"path": os.path.join(common.DEMO_DATA, "train.jsonl"), "format": "chat",
                       "weight": 1.0}, {**general, "weight": weight}]
  return c
