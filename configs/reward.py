"""Bradley-Terry reward model on preference pairs.

  python experiments/reward.py --config=configs/reward.py --workdir=/tmp/rm \
      --config.model.hf_path=/path/to/hf_dir --config.data.path=prefs.jsonl

Data as in configs/dpo.py: `data.path` is required (TRL's preference layouts, format=auto), or
the arg `data=support` for the demo's pairs.

A scalar `score` head on the decoder, read at the last real token that is not padding (as
transformers' *ForSequenceClassification does); the loss is -log σ(r_chosen - r_rejected -
margin) plus optional centring. Exports to an HF *ForSequenceClassification checkpoint
(`experiments/export.py --format=merged`).
The arg takes the keys of configs/sft.py (model=, adapter=, quant=, format=, smoke) plus
`data=support`. Print the resolved config with --print_config.
"""

from configs import common

ARG_KEYS = common.ARG_KEYS + ("data",)


def get_config(arg=None):
  c = common.preference(common.parse_arg(arg, ARG_KEYS, "configs/reward.py"),
                        "configs/reward.py")
  c.reward = dict(margin=0.0, center_coef=0.0)
  c.model.head = "score"
  # The score head is new: it trains beside the adapter (PEFT's modules_to_save).
  c.adapter.train_extra = "^score$"
  c.optim.lr = 1e-3 if c.adapter.kind != "none" else 1e-5
  return c
